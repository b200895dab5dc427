"""A router destination's forwarder: the channel forwarder, pointed at `{did}.inbound` and
`{did}.event`, delivering to the destination's mo_url (token auth), event_url and AMQP queue,
signed with the destination's signing_secret, else the channel's.

What it stores and counts is keyed by the destination id; messages an application sends on
`{dest amqp_queue}.outbound` leave through the router's channel, recorded as the
destination's so that their events come back here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from channel_proc.forwarder import Forwarder, Routes
from channel_proc.routers.logs import destination_logger
from ipc.codec import decode_vumi_message
from ipc.errors import ProtocolError
from ipc.payloads import api_message

if TYPE_CHECKING:
    from collections.abc import Mapping

    import httpx

    from channel_proc.counters import Counters
    from channel_proc.events import StatusReporter
    from channel_proc.lane import Turn
    from channel_proc.lifecycle import Shutdown
    from channel_proc.routers.loading import Destination
    from ipc.broker import Broker, Consumer, Delivery
    from ipc.names import Namespace
    from ipc.payloads import VumiEvent, VumiMessage
    from ipc.settings import Settings
    from ipc.state import StateStore


class DestinationForwarder(Forwarder):
    # The router's dispatcher already counted its messages and events for the channel.
    counts_traffic = False

    def __init__(
        self,
        *,
        destination: Destination,
        router_id: str,
        outbound_channel: str,
        broker: Broker,
        store: StateStore,
        http: httpx.AsyncClient,
        namespace: Namespace,
        settings: Settings,
        reporter: StatusReporter,
        shutdown: Shutdown,
        retry_initial: float = 0.5,
        retry_cap: float = 60.0,
        channel_signing_secret: str | None = None,
        counters: Counters | None = None,
    ) -> None:
        """`channel_signing_secret` (the routed channel's) signs webhooks of a destination
        without a signing_secret of its own; `counters` gets its webhook failures."""
        did = destination.destination_id
        props = destination.properties
        super().__init__(
            broker=broker,
            store=store,
            http=http,
            namespace=namespace,
            channel_id=did,
            routes=Routes(
                mo_url=props.mo_url,
                mo_url_auth_token=props.mo_url_token,
                amqp_queue=props.amqp_queue,
                signing_secret=props.signing_secret or channel_signing_secret,
            ),
            settings=settings,
            reporter=reporter,
            shutdown=shutdown,
            retry_initial=retry_initial,
            retry_cap=retry_cap,
            logger=destination_logger(did),
            components=(f"destination:{did}:mo_url", f"destination:{did}:event_url"),
            counters=counters,
        )
        self._router_id = router_id
        self._outbound_channel = outbound_channel

    def _mo_body(self, msg: VumiMessage) -> dict[str, object]:
        # The channel it arrived on (stamped by the transport), as the original: a reply can
        # then go through either the channel or the destination endpoint.
        return api_message(msg, msg.transport_name or self._outbound_channel)

    async def _event_record(self, event: VumiEvent, message_id: str) -> Mapping[str, object] | None:
        """The channel's copy of the send record (a message sent through the channel
        endpoint and routed back here by address); the destination's own came with the
        event."""
        ttl = self._settings.outbound_message_ttl
        owner = event.transport_name or self._outbound_channel
        stored = await self._store.get_outbound(owner, message_id, ttl)
        return stored.message if stored is not None else None

    def _relay_queue(self) -> str:
        return self._ns.outbound_queue(self._outbound_channel)

    async def _relay_outbound(self, consumer: Consumer, delivery: Delivery, turn: Turn) -> None:
        try:
            msg = decode_vumi_message(delivery.body)
        except ProtocolError:
            msg = None
        if msg is not None:
            # Recorded under the channel (message status there) and the destination, naming
            # the sender: the router sends this message's events back here.
            record = api_message(msg, self._outbound_channel)
            record.update(destination_id=self._cid, router_id=self._router_id)
            ttl = self._settings.outbound_message_ttl
            for owner in (self._outbound_channel, self._cid):
                await self._store.put_outbound(owner, msg.message_id, record, ttl)
        await super()._relay_outbound(consumer, delivery, turn)
