"""The router's dispatcher: consumes a routed channel's `{cid}.inbound` and `{cid}.event` in place
of the channel forwarder and moves each message to its destinations' durable queues.

An inbound message is stored under the channel (channel-endpoint replies find it), published to
`{did}.inbound` of every destination the router type picks, counted for the channel and the
router, and only then acked. An event is stored under the channel, published to
`{did}.event` of the destination that sent its message (the outbound record's
`destination_id`), or where the router type says for messages no destination sent. A crash
between the publishes and the ack redelivers the message: at-least-once, as everywhere else.
Like the forwarder (whose queue handling it shares), it handles up to
settings.webhook_concurrency messages of a queue at once, publishing them in queue order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from channel_proc.consumer import QueueConsumer
from channel_proc.counters import Counters
from channel_proc.routers.logs import router_logger
from ipc.payloads import junebug_event_type
from ipc.state import RateCount

if TYPE_CHECKING:
    from collections.abc import Mapping

    from channel_proc.lane import Turn
    from channel_proc.lifecycle import Shutdown
    from channel_proc.routers.loading import Routing
    from ipc.broker import Broker, Consumer, Delivery
    from ipc.names import Namespace
    from ipc.payloads import VumiEvent, VumiMessage
    from ipc.settings import Settings
    from ipc.state import StateStore


class RouterActor(QueueConsumer):
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
        super().__init__(
            broker=broker,
            store=store,
            namespace=namespace,
            channel_id=routing.channel_id,
            settings=settings,
            shutdown=shutdown,
            logger=router_logger(routing.router_id),
        )
        self._rid = routing.router_id
        self._router = routing.router
        self._counters = counters if counters is not None else Counters()

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Start both consumers, then run until a stop is requested and in-flight work ends."""
        # Declared before anything is routed: on RabbitMQ a message published to a queue that
        # does not exist yet would be dropped.
        for did in self._router.destinations:
            await self._broker.declare_queue(self._ns.inbound_queue(did))
            await self._broker.declare_queue(self._ns.event_queue(did))
        async with trio.open_nursery() as nursery:
            await self._start_consumers(nursery)
            self._log.info(
                "router %s (%s) routes channel %s to %d destination(s)",
                self._rid,
                self._router.kind,
                self._cid,
                len(self._router.destinations),
            )
            task_status.started()

    async def _handle_inbound(
        self, consumer: Consumer, delivery: Delivery, turn: Turn, msg: VumiMessage
    ) -> None:
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
        if not await turn.begin():
            return
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

    async def _handle_event(
        self,
        consumer: Consumer,
        delivery: Delivery,
        turn: Turn,
        event: VumiEvent,
        record: Mapping[str, object] | None,
    ) -> None:
        mid = event.user_message_id
        if mid is None:
            self._log.warning("event %s has no user_message_id: not routed", event.event_id)
            targets: list[str] = []
        else:
            targets = self._router.event_destinations(self._cid, event, record)
            if not targets:
                self._log.warning(
                    "%s event %s of message %s has no destination: not routed",
                    event.event_type.value,
                    event.event_id,
                    mid,
                )
        if not await turn.begin():
            return
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
        await self._store.incr_rates(
            [RateCount.now(owner, label, window) for owner in (self._cid, self._rid)]
        )
