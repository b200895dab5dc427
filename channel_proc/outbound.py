"""The outbound actor: `{channel_id}.outbound` -> transport.send -> ack/nack event, then ack.

Up to the transport's `max_in_flight` sends run at once, started in queue order; each
delivery is acked as soon as its own outcome is known. A send that fails in a way a retry
may fix stops new sends until those in flight are done, then the failed ones go again, in
queue order, before anything newer.

Queue control (issue 7): while the channel is paused no message is taken; a cancelled or
expired message is answered with a nack (reason "cancelled"/"expired") instead of being sent;
`rate_limit_count` provider parts per `rate_limit_window` seconds bound the sends.
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio

from channel_proc.backoff import Backoff
from channel_proc.control_state import REFRESH_INTERVAL, parse_timestamp
from channel_proc.deadletter import dead_letter
from channel_proc.transports.errors import SendError
from ipc.broker import MAX_PRIORITY
from ipc.codec import decode_vumi_message, encode_payload
from ipc.errors import ProtocolError
from ipc.payloads import EventType, VumiEvent, vumi_timestamp

if TYPE_CHECKING:
    from channel_proc.control_state import ControlState
    from channel_proc.counters import Counters
    from channel_proc.lifecycle import Shutdown
    from channel_proc.metrics import SendRate
    from channel_proc.transports.base import Transport
    from ipc.broker import Broker, Consumer, Delivery
    from ipc.names import Namespace
    from ipc.payloads import VumiMessage

log = logging.getLogger(__name__)

#: Deliveries prefetched beyond the sends in flight: hides broker latency, while a message
#: of higher priority published later still overtakes everything but these few.
OUTBOUND_PREFETCH: Final = 8
#: What `_send` returns for a message the transport accepted without an ack (disable_ack).
SILENT: Final = VumiEvent(event_type=EventType.ACK, user_message_id=None)


@dataclass(eq=False, slots=True)
class _Item:
    """One delivery on its way; `position` is its place in queue order."""

    position: int
    delivery: Delivery
    msg: VumiMessage
    #: Its entry in the rate limiter's window ([time, parts]), once it has a turn.
    slot: list[float] | None = None

    def __lt__(self, other: _Item) -> bool:
        return self.position < other.position


@dataclass(slots=True)
class _Window:
    """The sends in flight, and those that must go again before anything new."""

    size: int
    in_flight: int = 0
    #: Failed with a retryable error in the current round (not sent again yet).
    failed: list[_Item] = field(default_factory=list)
    #: To send again, in queue order, before taking more from the queue.
    redo: list[_Item] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class RateLimiter:
    """At most `count` provider parts per `window` seconds (a sliding window log).

    A send takes a slot counted as one part before it starts; the parts the transport
    reports replace that once it is done. `count` or `window` None/0: unlimited.
    """

    def __init__(self, count: int | None, window: float | None) -> None:
        self._count = count or 0
        self._window = float(window or 0)
        self._slots: deque[list[float]] = deque()

    @property
    def enabled(self) -> bool:
        return self._count > 0 and self._window > 0

    def _used(self, now: float) -> float:
        while self._slots and self._slots[0][0] <= now - self._window:
            self._slots.popleft()
        return sum(slot[1] for slot in self._slots)

    async def turn(self, shutdown: Shutdown) -> list[float] | None:
        """Wait for room and take a slot; None when unlimited or a stop cut the wait short
        (check `shutdown.requested`)."""
        if not self.enabled:
            return None
        while True:
            now = trio.current_time()
            if self._used(now) < self._count:
                slot = [now, 1.0]
                self._slots.append(slot)
                return slot
            if not await shutdown.sleep(self._slots[0][0] + self._window - now):
                return None

    @staticmethod
    def settle(slot: list[float] | None, parts: int) -> None:
        if slot is not None:
            slot[1] = float(parts)


class OutboundActor:
    """Sends each queued message through the transport and records the outcome as an event."""

    def __init__(
        self,
        *,
        broker: Broker,
        namespace: Namespace,
        channel_id: str,
        transport: Transport[Any],
        shutdown: Shutdown,
        retry: Backoff | None = None,
        control: ControlState | None = None,
        rate_limit: RateLimiter | None = None,
        counters: Counters | None = None,
        send_rate: SendRate | None = None,
    ) -> None:
        self._broker = broker
        self._namespace = namespace
        self._channel_id = channel_id
        self._transport = transport
        self._shutdown = shutdown
        self._retry = retry or Backoff(initial=0.5, cap=30.0)
        self._queue = namespace.outbound_queue(channel_id)
        self._event_queue = namespace.event_queue(channel_id)
        self._position = 0
        self._control = control
        self._limiter = rate_limit or RateLimiter(None, None)
        self._counters = counters
        self._send_rate = send_rate
        #: Position -> vumi timestamp of every message taken and not yet acked.
        self._held: dict[int, str] = {}

    def oldest_outbound_age(self) -> float | None:
        """Seconds since the oldest message this actor holds was created; None if none."""
        stamps = [t for t in map(parse_timestamp, self._held.values()) if t is not None]
        if not stamps:
            return None
        return max(0.0, (dt.datetime.now(dt.UTC) - min(stamps)).total_seconds())

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Consume until a stop is requested; unacked messages go back to the queue.

        While paused the consumer is closed, so that nothing sits prefetched: every message
        stays in the queue (and its length says so) until resumed.
        """
        size = max(1, self._transport.max_in_flight)
        await self._broker.declare_queue(self._queue, max_priority=MAX_PRIORITY)
        prefetch = size + OUTBOUND_PREFETCH
        started = False
        while not self._shutdown.requested:
            if await self._paused():
                if not started:
                    task_status.started()
                    started = True
                await self._shutdown.sleep(REFRESH_INTERVAL)
                continue
            window = _Window(size)
            async with self._broker.consume(self._queue, prefetch=prefetch) as consumer:
                if not started:
                    task_status.started()
                    started = True
                # The sends finish (under the stop's grace) before the consumer closes.
                async with trio.open_nursery() as sends:
                    while (item := await self._next(consumer, window)) is not None:
                        window.in_flight += 1
                        await sends.start(self._process, consumer, window, item)
            # Stopping or paused: what was taken and not acked is back in the queue.
            self._held.clear()
        if not started:
            task_status.started()

    async def _next(self, consumer: Consumer, window: _Window) -> _Item | None:
        """The next message to send, once the window has room; None once stopping."""
        while not self._shutdown.requested:
            if window.failed:
                if not await self._recover(window):
                    return None
                continue
            if window.in_flight >= window.size:
                await self._wait_change(window)
                continue
            if await self._paused():
                # run() closes the consumer; messages stay queued until resumed.
                return None
            if window.redo:
                item = window.redo.pop(0)
            else:
                waited_from = trio.current_time()
                delivery = await self._shutdown.receive(consumer)
                if delivery is None:
                    return None
                if trio.current_time() - waited_from >= REFRESH_INTERVAL and await self._paused(
                    force=True
                ):
                    # Paused while we were idle: the cached state predates this message.
                    await consumer.nack(delivery, requeue=True)
                    return None
                decoded = await self._decode(consumer, delivery)
                if decoded is None:
                    continue
                item = decoded
            if await self._screen(consumer, item):
                continue
            if window.failed:
                # A send failed while we waited: this one goes after the failed ones.
                bisect.insort(window.redo, item)
                continue
            if self._limiter.enabled:
                item.slot = await self._limiter.turn(self._shutdown)
                if item.slot is None:
                    # Stopping: unacked, it goes back to the queue.
                    return None
            return item
        return None

    async def _paused(self, *, force: bool = False) -> bool:
        if self._control is None:
            return False
        await self._control.refresh(force=force)
        return self._control.paused

    async def _screen(self, consumer: Consumer, item: _Item) -> bool:
        """True when `item` is cancelled or expired: its nack is published and it is acked."""
        if self._control is None:
            return False
        reason = await self._control.verdict(item.msg)
        if reason is None:
            return False
        log.info("message %s not sent: %s", item.msg.message_id, reason)
        event = VumiEvent(
            event_type=EventType.NACK,
            user_message_id=item.msg.message_id,
            nack_reason=reason,
            transport_name=self._channel_id,
        )
        await self._broker.publish(self._event_queue, encode_payload(event))
        await consumer.ack(item.delivery)
        self._held.pop(item.position, None)
        return True

    async def _wait_change(self, window: _Window) -> None:
        with self._shutdown.idle():
            await window.changed.wait()

    async def _recover(self, window: _Window) -> bool:
        """After a retryable failure: let the other sends finish, wait, queue the failed ones
        again ahead of the rest. False when a stop cut the wait short."""
        while window.in_flight and not self._shutdown.requested:
            await self._wait_change(window)
        if self._shutdown.requested:
            return False
        for item in window.failed:
            bisect.insort(window.redo, item)
        window.failed.clear()
        return await self._shutdown.sleep(self._retry.next_delay())

    async def _decode(self, consumer: Consumer, delivery: Delivery) -> _Item | None:
        try:
            msg = decode_vumi_message(delivery.body)
        except ProtocolError as exc:
            await dead_letter(
                self._broker,
                self._namespace,
                self._channel_id,
                delivery.body,
                source_queue=self._queue,
                reason=str(exc),
            )
            await consumer.ack(delivery)
            return None
        self._position += 1
        self._held[self._position] = msg.timestamp
        return _Item(self._position, delivery, msg)

    async def _process(
        self,
        consumer: Consumer,
        window: _Window,
        item: _Item,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        # started() comes first and send() is called with no checkpoint in between: the
        # next message is only taken once this send has run up to its first checkpoint, so
        # a transport sees the calls in queue order and may fix its place in line there.
        task_status.started()
        try:
            with self._shutdown.busy():
                started = trio.current_time()
                event, parts = await self._send(item.msg)
                self._limiter.settle(item.slot, parts)
                if event is None:
                    window.failed.append(item)
                    return
                self._retry.reset()
                if event is SILENT or event.event_type == EventType.ACK:
                    self._record_sent(parts, trio.current_time() - started)
                if event is not SILENT:
                    await self._broker.publish(self._event_queue, encode_payload(event))
                await consumer.ack(item.delivery)
                self._held.pop(item.position, None)
        finally:
            window.in_flight -= 1
            window.notify()

    def _record_sent(self, parts: int, latency: float) -> None:
        if self._counters is not None:
            self._counters.inc("messages_out_total")
            self._counters.inc("parts_out_total", amount=parts)
            self._counters.observe("send_latency_seconds", latency)
        if self._send_rate is not None:
            self._send_rate.record()

    async def _send(self, msg: VumiMessage) -> tuple[VumiEvent | None, int]:
        """The ack or nack event for `msg` (None when a retry may help), and the provider
        parts it took (as the transport reports them, else 1)."""
        try:
            receipt = await self._transport.send(msg)
        except SendError as err:
            if err.retryable:
                log.warning(
                    "message %s not sent (%s): %s; will retry", msg.message_id, err.code, err
                )
                return None, 1
            log.warning("message %s rejected (%s): %s", msg.message_id, err.code, err)
            return VumiEvent(
                event_type=EventType.NACK,
                user_message_id=msg.message_id,
                nack_reason=err.reason,
                transport_name=self._channel_id,
            ), 1
        reported = getattr(receipt, "parts", None)
        parts = reported if isinstance(reported, int) and reported >= 1 else 1
        if not receipt.publish_ack:
            return SILENT, parts
        return VumiEvent(
            event_type=EventType.ACK,
            timestamp=receipt.accepted_at or vumi_timestamp(),
            user_message_id=msg.message_id,
            sent_message_id=receipt.provider_message_id or msg.message_id,
            transport_name=self._channel_id,
        ), parts
