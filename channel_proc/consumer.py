"""What the forwarder and the router's dispatcher share: a channel's `{cid}.inbound` and
`{cid}.event` consumed in order with bounded concurrency (channel_proc.lane), each body
decoded (the undecodable dead-lettered), stored under the channel, and handled with its
message id on every log line."""

from __future__ import annotations

import abc
from functools import partial
from typing import TYPE_CHECKING

from channel_proc.deadletter import dead_letter
from channel_proc.lane import consume_in_order
from channel_proc.logs import message_context
from ipc.codec import decode_vumi_event, decode_vumi_message
from ipc.errors import ProtocolError

if TYPE_CHECKING:
    import logging
    from collections.abc import Mapping

    import trio

    from channel_proc.lane import Handler, Turn
    from channel_proc.lifecycle import Shutdown
    from ipc.broker import Broker, Consumer, Delivery
    from ipc.names import Namespace
    from ipc.payloads import VumiEvent, VumiMessage
    from ipc.settings import Settings
    from ipc.state import StateStore


class QueueConsumer(abc.ABC):
    """What the forwarder and the router's dispatcher share: a channel's queues consumed in
    order with bounded concurrency, bodies decoded (the undecodable dead-lettered), inbound
    messages and events stored under the channel."""

    def __init__(
        self,
        *,
        broker: Broker,
        store: StateStore,
        namespace: Namespace,
        channel_id: str,
        settings: Settings,
        shutdown: Shutdown,
        logger: logging.Logger,
    ) -> None:
        self._log = logger
        self._broker = broker
        self._store = store
        self._ns = namespace
        self._cid = channel_id
        self._settings = settings
        self._shutdown = shutdown

    async def _start_consumers(self, nursery: trio.Nursery) -> None:
        """Consume the channel's inbound and event queues in `nursery` until a stop."""
        limit = self._settings.webhook_concurrency
        for queue, handle in (
            (self._ns.inbound_queue(self._cid), self._inbound),
            (self._ns.event_queue(self._cid), self._event),
        ):
            await nursery.start(partial(self._consume, queue, handle, limit=limit))

    async def _consume(
        self, queue: str, handle: Handler, *, limit: int, task_status: trio.TaskStatus[None]
    ) -> None:
        consume = partial(
            consume_in_order, self._broker, self._shutdown, queue, handle, limit=limit
        )
        await consume(task_status=task_status)

    async def _inbound(self, consumer: Consumer, delivery: Delivery, turn: Turn) -> None:
        msg = await self._take_inbound(consumer, delivery, turn)
        if msg is not None:
            with message_context(msg.message_id):
                await self._handle_inbound(consumer, delivery, turn, msg)

    async def _event(self, consumer: Consumer, delivery: Delivery, turn: Turn) -> None:
        taken = await self._take_event(consumer, delivery, turn)
        if taken is not None:
            event, record = taken
            with message_context(event.user_message_id):
                await self._handle_event(consumer, delivery, turn, event, record)

    @abc.abstractmethod
    async def _handle_inbound(
        self, consumer: Consumer, delivery: Delivery, turn: Turn, msg: VumiMessage
    ) -> None:
        """Deliver a decoded and stored inbound message, then ack it (or leave it unacked)."""

    @abc.abstractmethod
    async def _handle_event(
        self,
        consumer: Consumer,
        delivery: Delivery,
        turn: Turn,
        event: VumiEvent,
        record: Mapping[str, object] | None,
    ) -> None:
        """Deliver a decoded and stored event, then ack it (or leave it unacked). `record`
        is its message's send record under this channel, read as the event was stored (None
        when there is none)."""

    async def _take_inbound(
        self, consumer: Consumer, delivery: Delivery, turn: Turn
    ) -> VumiMessage | None:
        """The inbound message, stored (so a reply finds it even while its delivery fails);
        None when it could not be decoded (then it is dead-lettered and acked)."""
        try:
            msg = decode_vumi_message(delivery.body)
        except ProtocolError as exc:
            await self._reject(consumer, delivery, turn, self._ns.inbound_queue(self._cid), exc)
            return None
        await self._store.put_inbound(
            self._cid,
            msg.message_id,
            msg.model_dump(mode="json"),
            self._settings.inbound_message_ttl,
        )
        return msg

    async def _take_event(
        self, consumer: Consumer, delivery: Delivery, turn: Turn
    ) -> tuple[VumiEvent, Mapping[str, object] | None] | None:
        """The event, stored with its message's events when it names one, and that
        message's send record; None when it could not be decoded (then it is dead-lettered
        and acked) or a stop came first."""
        try:
            event = decode_vumi_event(delivery.body)
        except ProtocolError as exc:
            await self._reject(consumer, delivery, turn, self._ns.event_queue(self._cid), exc)
            return None
        mid = event.user_message_id
        if mid is not None:
            # A message's events are listed in the order stored (the last one is its status).
            if not await turn.wait_to_record():
                return None
            record = await self._store.add_event(
                self._cid,
                mid,
                event.event_id,
                event.model_dump(mode="json"),
                self._settings.outbound_message_ttl,
            )
        else:
            record = None
        turn.recorded()
        return event, record

    async def _reject(
        self, consumer: Consumer, delivery: Delivery, turn: Turn, source: str, exc: ProtocolError
    ) -> None:
        turn.settle()
        await self._dead_letter(delivery.body, source, str(exc))
        await consumer.ack(delivery)

    async def _dead_letter(self, body: bytes, source: str, reason: str) -> None:
        await dead_letter(
            self._broker,
            self._ns,
            self._cid,
            body,
            source_queue=source,
            reason=reason,
            store=self._store,
            # The queue copy is for AMQP consumers; on the embedded queue nobody reads it.
            queue_copy=self._settings.amqp is not None,
            logger=self._log,
        )
