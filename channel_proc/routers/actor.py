"""The router's dispatcher: consumes a routed channel's `{cid}.inbound` and `{cid}.event` in place
of the channel forwarder and moves each message to its destinations' durable queues.

An inbound message is stored under the channel (channel-endpoint replies find it), published to
`{did}.inbound` of every destination the router type picks, counted for the channel and the
router, and only then acked. An event is stored under the channel, published to
`{did}.event` of the destination that sent its message (the outbound record's
`destination_id`), or where the router type says for messages no destination sent. A crash
between the publishes and the ack redelivers the message: at-least-once, as everywhere else.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Final

import trio

from channel_proc.counters import Counters
from channel_proc.deadletter import dead_letter
from channel_proc.routers.logs import router_logger
from ipc.codec import decode_vumi_event, decode_vumi_message
from ipc.errors import ProtocolError
from ipc.payloads import junebug_event_type

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from channel_proc.lifecycle import Shutdown
    from channel_proc.routers.loading import Routing
    from ipc.broker import Broker, Consumer, Delivery
    from ipc.names import Namespace
    from ipc.payloads import VumiMessage
    from ipc.settings import Settings
    from ipc.state import StateStore

    Handler = Callable[[Consumer, Delivery], Awaitable[None]]

PREFETCH: Final = 16


class RouterActor:
    def __init__(
        self,
        *,
        broker: Broker,
        store: StateStore,
        namespace: Namespace,
        routing: Routing,
        settings: Settings,
        shutdown: Shutdown,
        counters: Counters | None = None,
    ) -> None:
        """`counters`: the process's metrics registry, where the channel's inbound messages
        and events are counted (a private one when not given)."""
        self._broker = broker
        self._store = store
        self._ns = namespace
        self._cid = routing.channel_id
        self._rid = routing.router_id
        self._router = routing.router
        self._settings = settings
        self._shutdown = shutdown
        self._log = router_logger(self._rid)
        self._counters = counters if counters is not None else Counters()

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Start both consumers, then run until a stop is requested and in-flight work ends."""
        # Declared before anything is routed: on RabbitMQ a message published to a queue that
        # does not exist yet would be dropped.
        for did in self._router.destinations:
            await self._broker.declare_queue(self._ns.inbound_queue(did))
            await self._broker.declare_queue(self._ns.event_queue(did))
        async with trio.open_nursery() as nursery:
            await nursery.start(self._consume, self._ns.inbound_queue(self._cid), self._inbound)
            await nursery.start(self._consume, self._ns.event_queue(self._cid), self._event)
            self._log.info(
                "router %s (%s) routes channel %s to %d destination(s)",
                self._rid,
                self._router.kind,
                self._cid,
                len(self._router.destinations),
            )
            task_status.started()

    async def _consume(
        self, queue: str, handle: Handler, *, task_status: trio.TaskStatus[None]
    ) -> None:
        await self._broker.declare_queue(queue)
        async with self._broker.consume(queue, prefetch=PREFETCH) as consumer:
            task_status.started()
            while (delivery := await self._shutdown.receive(consumer)) is not None:
                with self._shutdown.busy():
                    await handle(consumer, delivery)

    async def _inbound(self, consumer: Consumer, delivery: Delivery) -> None:
        source = self._ns.inbound_queue(self._cid)
        try:
            msg = decode_vumi_message(delivery.body)
        except ProtocolError as exc:
            await self._dead_letter(delivery.body, source, str(exc))
            await consumer.ack(delivery)
            return
        await self._store.put_inbound(
            self._cid,
            msg.message_id,
            msg.model_dump(mode="json"),
            self._settings.inbound_message_ttl,
        )
        targets = await self._reply_destination(msg) or self._router.inbound_destinations(
            self._cid, msg
        )
        if not targets:
            self._log.warning(
                "inbound message %s to %r matches no destination and there is no default "
                "destination: dropped",
                msg.message_id,
                msg.to_addr,
            )
        for did in targets:
            await self._broker.publish(self._ns.inbound_queue(did), delivery.body)
        if targets:
            self._log.info(
                "inbound message %s to %r routed to %s", msg.message_id, msg.to_addr, targets
            )
        await self._count("inbound")
        await consumer.ack(delivery)

    async def _reply_destination(self, msg: VumiMessage) -> list[str]:
        """A user's reply to a message a destination sent goes back to that destination
        (when the provider links the two, as session-based transports do)."""
        if msg.in_reply_to is None:
            return []
        stored = await self._store.get_outbound(
            self._cid, msg.in_reply_to, self._settings.outbound_message_ttl
        )
        sender = stored.message.get("destination_id") if stored and stored.message else None
        return [sender] if isinstance(sender, str) and sender in self._router.destinations else []

    async def _event(self, consumer: Consumer, delivery: Delivery) -> None:
        source = self._ns.event_queue(self._cid)
        try:
            event = decode_vumi_event(delivery.body)
        except ProtocolError as exc:
            await self._dead_letter(delivery.body, source, str(exc))
            await consumer.ack(delivery)
            return
        mid = event.user_message_id
        ttl = self._settings.outbound_message_ttl
        if mid is None:
            self._log.warning("event %s has no user_message_id: not routed", event.event_id)
            targets: list[str] = []
        else:
            await self._store.add_event(
                self._cid, mid, event.event_id, event.model_dump(mode="json"), ttl
            )
            stored = await self._store.get_outbound(self._cid, mid, ttl)
            record = stored.message if stored is not None else None
            targets = self._router.event_destinations(self._cid, event, record)
            if not targets:
                self._log.warning(
                    "%s event %s of message %s has no destination: not routed",
                    event.event_type.value,
                    event.event_id,
                    mid,
                )
        for did in targets:
            await self._broker.publish(self._ns.event_queue(did), delivery.body)
        event_type = junebug_event_type(event)
        if event_type is not None:
            await self._count(event_type)
        await consumer.ack(delivery)

    async def _count(self, label: str) -> None:
        """Routed traffic counts for the channel (no forwarder counts it) and the router."""
        if label == "inbound":
            self._counters.inc("messages_in_total")
        else:
            self._counters.inc("events_total", label)
        window = self._settings.metric_window
        bucket = int(time.time() / window)
        for owner in (self._cid, self._rid):
            await self._store.incr_rate(owner, label, bucket, math.ceil(2 * window))

    async def _dead_letter(self, body: bytes, source: str, reason: str) -> None:
        await dead_letter(
            self._broker, self._ns, self._cid, body, source_queue=source, reason=reason
        )
