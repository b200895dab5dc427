"""The outbound actor: `{channel_id}.outbound` -> transport.send -> ack/nack event, then ack.

Up to the transport's `max_in_flight` sends run at once, started in queue order; each
delivery is acked as soon as its own outcome is known. With a transport that dedupes
redeliveries (SMPP), a send's place in that window is free once the transport has answered:
publishing its event and acking it (durable writes, which may wait for a group commit)
overlap the next sends instead of holding the provider's window. A send that fails in a way
a retry may fix stops new sends until those in flight are done, then the failed ones go
again, in queue order, before anything newer.

A consumer lost to a broker outage is replaced in place once the sends in flight are done;
the messages it held (failed sends waiting for their retry included) come again from the
queue, in order.

While the channel drains a backlog (channel_proc.priority), its event publishes and acks wait
longer to be committed with others (channel_proc.priority.apply_backlog), so with a transport
that dedupes redeliveries the consumer may then hold BACKLOG_PREFETCH more messages: answered
ones waiting for those writes. The consumer is reopened with the new prefetch when the backlog
starts and ends (the messages it held go back to the queue, in order).

Queue control (issue 7): while the channel is paused no message is taken; a cancelled or
expired message is answered with a nack (reason "cancelled"/"expired") instead of being sent;
`rate_limit_count` provider parts per `rate_limit_window` seconds bound the sends.

With a store: each send attempt is a "send_attempt" entry of the message's timeline, and
poison messages are caught. A redelivered message (it was taken before and not acked) has its
sends counted in the store (scope "{cid}:send_attempts") while they run, and cleared when
they return; one whose count shows MAX_SEND_CRASHES sends that never returned (each crashed
the process) is not sent again: it is dead-lettered and rejected ("send_crashed"). First
deliveries are not counted, as they cannot have crashed before: that keeps two store writes
off every normal send, at the price of one uncounted crash (1 + MAX_SEND_CRASHES in all).
A message with a crash on record is sent alone, so that a crash counts against it only.
Every log line written while a message is handled carries its id (channel_proc.logs).
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio

from channel_proc.backoff import Backoff
from channel_proc.control_state import (
    REFRESH_INTERVAL,
    SEND_CRASHED,
    send_attempts_scope,
)
from channel_proc.deadletter import dead_letter
from channel_proc.logs import message_context
from channel_proc.transports.errors import ProviderThrottled, SendError
from ipc.broker import MAX_PRIORITY
from ipc.codec import decode_vumi_message, encode_payload
from ipc.errors import ConsumerLostError, ProtocolError, StoreUnavailableError
from ipc.payloads import EventType, VumiEvent, parse_vumi_timestamp, vumi_timestamp

if TYPE_CHECKING:
    from channel_proc.control_state import ControlState
    from channel_proc.counters import Counters
    from channel_proc.lifecycle import Shutdown
    from channel_proc.metrics import SendRate
    from channel_proc.transports.base import Transport
    from ipc.broker import Broker, Consumer, Delivery
    from ipc.names import Namespace
    from ipc.payloads import VumiMessage
    from ipc.state import StateStore

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

#: Deliveries prefetched beyond the sends in flight: hides broker latency, while a message
#: of higher priority published later still overtakes everything but these few (and, during
#: a backlog, the BACKLOG_PREFETCH more).
OUTBOUND_PREFETCH: Final = 8
#: More deliveries held while draining a backlog, when answered sends leave the window: each
#: answered message then waits up to BACKLOG_QUEUE_LINGER for its event's publish and again
#: for its ack, so at ~1,000 sends/s about 100 are answered and unacked at any moment.
#: Without room for them a drain with 50 ms waits fell from 750 to 260/s (28 per 100 ms).
BACKLOG_PREFETCH: Final = 256
#: What `_send` returns for a message the transport accepted without an ack (disable_ack).
SILENT: Final = VumiEvent(event_type=EventType.ACK, user_message_id=None)
#: Sends of one message that may crash the process before it is no longer sent.
MAX_SEND_CRASHES: Final = 3
#: The timeline stage of each send attempt (api/timeline.py renders it).
TIMELINE_STAGE: Final = "send_attempt"
#: Seconds message records are kept when the process does not say (Settings' default).
RECORD_TTL: Final = 172800.0


@dataclass(eq=False, slots=True)
class _Item:
    """One delivery on its way; `position` is its place in queue order."""

    position: int
    delivery: Delivery
    msg: VumiMessage
    #: Its entry in the rate limiter's window ([time, parts]), once it has a turn.
    slot: list[float] | None = None
    #: Sends started for it: by this process, plus those on record that crashed one.
    attempts: int = 0
    #: Its send is counted in the store (to be cleared once the send returns).
    counted: bool = False
    #: A crash is on record for it: it is sent with nothing else in flight.
    suspect: bool = False
    #: It holds a place in the window (from its turn until its send returns).
    in_window: bool = False

    def __lt__(self, other: _Item) -> bool:
        return self.position < other.position


@dataclass(frozen=True, slots=True)
class _Attempt:
    """What one send came to: the event to publish (None: retry), the provider parts, and
    the timeline details (result, reason, provider ids)."""

    event: VumiEvent | None
    parts: int
    details: JsonObject


@dataclass(slots=True)
class _Window:
    """The sends in flight, and those that must go again before anything new."""

    size: int
    in_flight: int = 0
    #: Failed with a retryable error in the current round (not sent again yet).
    failed: list[_Item] = field(default_factory=list)
    #: To send again, in queue order, before taking more from the queue.
    redo: list[_Item] = field(default_factory=list)
    #: A suspect is in flight: nothing else starts until it is done.
    exclusive: bool = False
    changed: trio.Event = field(default_factory=trio.Event)

    def take(self, item: _Item) -> None:
        item.in_window = True
        self.in_flight += 1

    def release(self, item: _Item) -> None:
        """The item's send is over: its place is free (a second call does nothing)."""
        if not item.in_window:
            return
        item.in_window = False
        self.in_flight -= 1
        if item.suspect:
            self.exclusive = False
        self.notify()

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
        store: StateStore | None = None,
        record_ttl: float = RECORD_TTL,
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
        self._store = store
        self._record_ttl = record_ttl
        self._attempts_scope = send_attempts_scope(channel_id)
        #: Position -> vumi timestamp of every message taken and not yet acked.
        self._held: dict[int, str] = {}
        self._backlog = False
        #: The prefetch of the consumer open now (0: none open).
        self._open_prefetch = 0

    @property
    def answered_leave_window(self) -> bool:
        """Whether an answered send frees its window place before its event and ack."""
        return self._transport.dedupes_redeliveries

    @property
    def window_size(self) -> int:
        """Sends in flight at once."""
        return max(1, self._transport.max_in_flight)

    @property
    def prefetch(self) -> int:
        """Deliveries the consumer may hold: room for a window of sends (and as many answered
        ones awaiting their event and ack, when those are out of the window), a few ready,
        and BACKLOG_PREFETCH more answered ones while draining a backlog."""
        size = self.window_size
        if not self.answered_leave_window:
            return size + OUTBOUND_PREFETCH
        return 2 * size + OUTBOUND_PREFETCH + (BACKLOG_PREFETCH if self._backlog else 0)

    def set_backlog(self, backlog: bool) -> None:
        """Told by the channel's BacklogPriority; the consumer takes the new prefetch when it
        is next handed a message."""
        self._backlog = backlog

    def oldest_outbound_age(self) -> float | None:
        """Seconds since the oldest message this actor holds was created; None if none."""
        stamps = [t for t in map(parse_vumi_timestamp, self._held.values()) if t is not None]
        if not stamps:
            return None
        return max(0.0, (dt.datetime.now(dt.UTC) - min(stamps)).total_seconds())

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Consume until a stop is requested; unacked messages go back to the queue.

        While paused the consumer is closed, so that nothing sits prefetched: every message
        stays in the queue (and its length says so) until resumed.
        """
        await self._broker.declare_queue(self._queue, max_priority=MAX_PRIORITY)
        started = False
        while not self._shutdown.requested:
            if await self._paused():
                if not started:
                    task_status.started()
                    started = True
                await self._shutdown.sleep(REFRESH_INTERVAL)
                continue
            window = _Window(self.window_size)
            self._open_prefetch = self.prefetch
            async with self._broker.consume(self._queue, prefetch=self._open_prefetch) as consumer:
                if not started:
                    task_status.started()
                    started = True
                # The sends finish (under the stop's grace) before the consumer closes.
                async with trio.open_nursery() as sends:
                    while (item := await self._next(consumer, window)) is not None:
                        window.take(item)
                        await sends.start(self._process, consumer, window, item)
            # Stopping, paused, lost or to be reopened: what was taken and not acked is back
            # in the queue.
            self._held.clear()
            self._open_prefetch = 0
        if not started:
            task_status.started()

    async def _next(self, consumer: Consumer, window: _Window) -> _Item | None:
        """The next message to send, once the window has room; None once stopping."""
        while not self._shutdown.requested:
            if window.failed:
                if not await self._recover(window):
                    return None
                continue
            if window.in_flight >= window.size or window.exclusive:
                await self._wait_change(window)
                continue
            if await self._paused():
                # run() closes the consumer; messages stay queued until resumed.
                return None
            if window.redo:
                item = window.redo.pop(0)
            else:
                waited_from = trio.current_time()
                try:
                    delivery = await self._shutdown.receive(consumer)
                except ConsumerLostError as exc:
                    # run() opens a new one once the sends in flight are done: their
                    # messages come again, and the transport knows what it sent already.
                    log.warning("consumer of %s lost (%s); opening a new one", self._queue, exc)
                    return None
                if delivery is None:
                    return None
                if self.prefetch != self._open_prefetch:
                    # A backlog started or ended: run() reopens the consumer once the sends
                    # in flight are done; this message comes again, in its place.
                    log.info(
                        "reopening the consumer of %s with prefetch %d (backlog %s)",
                        self._queue,
                        self.prefetch,
                        "started" if self._backlog else "over",
                    )
                    await consumer.nack(delivery, requeue=True)
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
            crashes = await self._crashes(item)
            if crashes >= MAX_SEND_CRASHES:
                await self._reject_crashed(consumer, item, crashes)
                continue
            if crashes:
                # Alone: if it crashes the process again, no other message is blamed.
                if not await self._wait_alone(window):
                    return None
                if window.failed:
                    bisect.insort(window.redo, item)
                    continue
            await self._count_send(item, crashes)
            if self._limiter.enabled:
                item.slot = await self._limiter.turn(self._shutdown)
                if item.slot is None:
                    # Stopping: unacked, it goes back to the queue.
                    return None
            window.exclusive = item.suspect
            return item
        return None

    async def _wait_alone(self, window: _Window) -> bool:
        """Wait until no send is in flight; False when a stop came first."""
        while window.in_flight and not self._shutdown.requested:
            await self._wait_change(window)
        return not self._shutdown.requested

    async def _crashes(self, item: _Item) -> int:
        """Sends of this redelivered message that never returned (0 for a first delivery)."""
        if self._store is None or not item.delivery.redelivered:
            return 0
        record = await self._store.kv_get(self._attempts_scope, item.msg.message_id)
        started = record.get("started") if record is not None else None
        return started if isinstance(started, int) and started > 0 else 0

    async def _count_send(self, item: _Item, crashes: int) -> None:
        """Record the send about to start (redelivered messages only; see the module doc)."""
        item.attempts = max(item.attempts, crashes)
        item.suspect = crashes > 0
        if self._store is None or not item.delivery.redelivered:
            return
        await self._store.kv_put(
            self._attempts_scope,
            item.msg.message_id,
            {"started": crashes + 1},
            self._record_ttl,
        )
        item.counted = True

    async def _uncount_send(self, item: _Item) -> None:
        if self._store is None or not item.counted:
            return
        try:
            await self._store.kv_delete(self._attempts_scope, item.msg.message_id)
        except StoreUnavailableError as exc:
            # Sent already: a stale count only makes a later redelivery a suspect sooner.
            log.warning("send count of message %s not cleared: %s", item.msg.message_id, exc)
            return
        item.counted = False

    async def _reject_crashed(self, consumer: Consumer, item: _Item, crashes: int) -> None:
        """A poison message: dead-lettered (for an operator to look at or replay) and
        rejected, instead of crashing the channel forever."""
        message_id = item.msg.message_id
        with message_context(message_id):
            await dead_letter(
                self._broker,
                self._namespace,
                self._channel_id,
                item.delivery.body,
                source_queue=self._queue,
                store=self._store,
                reason=f"{SEND_CRASHED}: {crashes} sends of message {message_id} crashed "
                "the channel process",
            )
            event = VumiEvent(
                event_type=EventType.NACK,
                user_message_id=message_id,
                nack_reason=SEND_CRASHED,
                transport_name=self._channel_id,
            )
            await self._broker.publish(self._event_queue, encode_payload(event))
            await consumer.ack(item.delivery)
            self._held.pop(item.position, None)
            item.counted = True
            await self._uncount_send(item)

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
                store=self._store,
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
        item.attempts += 1
        started_at = vumi_timestamp()
        try:
            done = await self._attempt(consumer, window, item)
        finally:
            window.release(item)
        if done is None:
            # Cut short by a hurried stop: unacked, it goes back to the queue.
            return
        attempt, latency = done
        # Bookkeeping after the window has room again: it does not hold up the next send.
        with self._shutdown.busy(), message_context(item.msg.message_id):
            await self._uncount_send(item)
            await self._record_attempt(item, attempt, started_at, latency)

    async def _attempt(
        self, consumer: Consumer, window: _Window, item: _Item
    ) -> tuple[_Attempt, float] | None:
        """Send, publish its event and ack (or mark it failed); the attempt and its latency,
        None when a hurried stop cut the send short."""
        started = trio.current_time()
        done: tuple[_Attempt, float] | None = None
        with self._shutdown.busy(), message_context(item.msg.message_id):
            attempt = await self._send(item.msg)
            latency = trio.current_time() - started
            self._limiter.settle(item.slot, attempt.parts)
            event = attempt.event
            if event is None:
                window.failed.append(item)
            else:
                if self._transport.dedupes_redeliveries:
                    window.release(item)
                self._retry.reset()
                if event is SILENT or event.event_type == EventType.ACK:
                    self._record_sent(attempt.parts, latency)
                if event is not SILENT:
                    await self._broker.publish(self._event_queue, encode_payload(event))
                await consumer.ack(item.delivery)
                self._held.pop(item.position, None)
            done = attempt, latency
        return done

    async def _record_attempt(
        self, item: _Item, attempt: _Attempt, started_at: str, latency: float
    ) -> None:
        """One "send_attempt" timeline entry, stored with the message's events."""
        if self._store is None:
            return
        entry = {
            "message_type": "timeline",
            # When it started: it sorts before the ack or nack it led to.
            "timestamp": started_at,
            "stage": TIMELINE_STAGE,
            "details": {
                "attempt": item.attempts,
                **attempt.details,
                "parts": attempt.parts,
                "latency_seconds": round(latency, 6),
            },
        }
        try:
            await self._store.add_event(
                self._channel_id, item.msg.message_id, uuid.uuid4().hex, entry, self._record_ttl
            )
        except StoreUnavailableError as exc:
            # The send is done; crashing now would only send it again.
            log.warning("send attempt of message %s not recorded: %s", item.msg.message_id, exc)

    def _record_sent(self, parts: int, latency: float) -> None:
        if self._counters is not None:
            self._counters.inc("messages_out_total")
            self._counters.inc("parts_out_total", amount=parts)
            self._counters.observe("send_latency_seconds", latency)
        if self._send_rate is not None:
            self._send_rate.record()

    async def _send(self, msg: VumiMessage) -> _Attempt:
        """The ack or nack event for `msg` (None when a retry may help), the provider parts
        it took (as the transport reports them, else 1), and what to say in the timeline."""
        try:
            receipt = await self._transport.send(msg)
        except SendError as err:
            details: JsonObject = {"reason": err.reason, "code": err.code}
            if err.retryable:
                log.warning(
                    "message %s not sent (%s): %s; will retry", msg.message_id, err.code, err
                )
                throttled = isinstance(err, ProviderThrottled)
                details["result"] = "throttled" if throttled else "transport_error"
                return _Attempt(None, 1, {**details, "retry": True})
            log.warning("message %s rejected (%s): %s", msg.message_id, err.code, err)
            event = VumiEvent(
                event_type=EventType.NACK,
                user_message_id=msg.message_id,
                nack_reason=err.reason,
                transport_name=self._channel_id,
            )
            return _Attempt(event, 1, {"result": "rejected", **details, "retry": False})
        reported = getattr(receipt, "parts", None)
        parts = reported if isinstance(reported, int) and reported >= 1 else 1
        provider_ids = receipt.provider_message_id.split(",") if receipt.provider_message_id else []
        details = {"result": "submitted", "provider_message_ids": provider_ids, "retry": False}
        if not receipt.publish_ack:
            return _Attempt(SILENT, parts, details)
        event = VumiEvent(
            event_type=EventType.ACK,
            timestamp=receipt.accepted_at or vumi_timestamp(),
            user_message_id=msg.message_id,
            sent_message_id=receipt.provider_message_id or msg.message_id,
            transport_name=self._channel_id,
        )
        return _Attempt(event, parts, details)
