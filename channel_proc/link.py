"""The production TransportLink: inbound messages and delivery reports to durable queues."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipc.codec import encode_payload

if TYPE_CHECKING:
    from collections.abc import Mapping

    from channel_proc.events import StatusReporter
    from channel_proc.transports.base import StatusLevel
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.payloads import VumiEvent, VumiMessage


class QueueLink:
    """Publishes what a transport receives to `{channel_id}.inbound` / `.event`."""

    def __init__(
        self, broker: Broker, namespace: Namespace, channel_id: str, reporter: StatusReporter
    ) -> None:
        self._broker = broker
        self._inbound_queue = namespace.inbound_queue(channel_id)
        self._event_queue = namespace.event_queue(channel_id)
        self._channel_id = channel_id
        self._reporter = reporter

    async def inbound(self, msg: VumiMessage) -> None:
        # vumi's transport_name is the worker's name, which for Junebug is the channel id.
        stamped = msg.model_copy(update={"transport_name": self._channel_id})
        await self._broker.publish(self._inbound_queue, encode_payload(stamped))

    async def delivery_report(self, event: VumiEvent) -> None:
        stamped = event.model_copy(update={"transport_name": self._channel_id})
        await self._broker.publish(self._event_queue, encode_payload(stamped))

    def status(
        self,
        component: str,
        level: StatusLevel,
        type: str,
        message: str,
        details: Mapping[str, object] | None = None,
    ) -> None:
        self._reporter.report(component, level, type, message, details)
