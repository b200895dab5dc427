"""The outbound actor: `{channel_id}.outbound` -> transport.send -> ack/nack event, then ack.

Up to the transport's `max_in_flight` sends run at once, started in queue order; each
delivery is acked as soon as its own outcome is known. A send that fails in a way a retry
may fix stops new sends until those in flight are done, then the failed ones go again, in
queue order, before anything newer.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio

from channel_proc.backoff import Backoff
from channel_proc.deadletter import dead_letter
from channel_proc.transports.errors import SendError
from ipc.broker import MAX_PRIORITY
from ipc.codec import decode_vumi_message, encode_payload
from ipc.errors import ProtocolError
from ipc.payloads import EventType, VumiEvent, vumi_timestamp

if TYPE_CHECKING:
    from channel_proc.lifecycle import Shutdown
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

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Consume until a stop is requested; unacked messages go back to the queue."""
        window = _Window(max(1, self._transport.max_in_flight))
        await self._broker.declare_queue(self._queue, max_priority=MAX_PRIORITY)
        prefetch = window.size + OUTBOUND_PREFETCH
        async with self._broker.consume(self._queue, prefetch=prefetch) as consumer:
            task_status.started()
            # The sends finish (under the stop's grace) before the consumer closes.
            async with trio.open_nursery() as sends:
                while (item := await self._next(consumer, window)) is not None:
                    window.in_flight += 1
                    await sends.start(self._process, consumer, window, item)

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
            if window.redo:
                return window.redo.pop(0)
            delivery = await self._shutdown.receive(consumer)
            if delivery is None:
                return None
            item = await self._decode(consumer, delivery)
            if item is None:
                continue
            if window.failed:
                # A send failed while we waited: this one goes after the failed ones.
                bisect.insort(window.redo, item)
                continue
            return item
        return None

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
                event = await self._send(item.msg)
                if event is None:
                    window.failed.append(item)
                    return
                self._retry.reset()
                if event is not SILENT:
                    await self._broker.publish(self._event_queue, encode_payload(event))
                await consumer.ack(item.delivery)
        finally:
            window.in_flight -= 1
            window.notify()

    async def _send(self, msg: VumiMessage) -> VumiEvent | None:
        """The ack or nack event for `msg`; None when a retry may help."""
        try:
            receipt = await self._transport.send(msg)
        except SendError as err:
            if err.retryable:
                log.warning(
                    "message %s not sent (%s): %s; will retry", msg.message_id, err.code, err
                )
                return None
            log.warning("message %s rejected (%s): %s", msg.message_id, err.code, err)
            return VumiEvent(
                event_type=EventType.NACK,
                user_message_id=msg.message_id,
                nack_reason=err.reason,
                transport_name=self._channel_id,
            )
        if not receipt.publish_ack:
            return SILENT
        return VumiEvent(
            event_type=EventType.ACK,
            timestamp=receipt.accepted_at or vumi_timestamp(),
            user_message_id=msg.message_id,
            sent_message_id=receipt.provider_message_id or msg.message_id,
            transport_name=self._channel_id,
        )
