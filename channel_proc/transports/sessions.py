"""What the transports whose every connection is one session (telnet, websocket) share:
publishing a session's inbound messages and reporting its clients coming and going."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from channel_proc.transports.base import StatusLevel
from ipc.payloads import VumiMessage

if TYPE_CHECKING:
    from channel_proc.transports.base import TransportLink
    from ipc.payloads import SessionEvent

log = logging.getLogger(__name__)


class SessionAnnouncer:
    """Turns a connection's life into inbound messages and statuses under `component`.

    `server_address` ("host:port") is the to_addr of inbound messages unless the channel
    configures its own `to_addr`; set it once the server listens.
    """

    def __init__(
        self, link: TransportLink, component: str, *, to_addr: str | None, transport_type: str
    ) -> None:
        self._link = link
        self._component = component
        self._to_addr = to_addr
        self._transport_type = transport_type
        self.server_address = ""

    async def inbound(self, address: str, event: SessionEvent, content: str | None) -> None:
        msg = VumiMessage(
            to_addr=self._to_addr or self.server_address,
            from_addr=address,
            content=content,
            session_event=event,
            transport_type=self._transport_type,
        )
        await self._link.inbound(msg)
        log.info(
            "received %s message %s from %s (%d chars)",
            event.value,
            msg.message_id,
            address,
            len(content or ""),
        )

    def client_status(self, type_: str, address: str, clients: int) -> None:
        """`type_` is "client_connected" or "client_disconnected"; `clients` are still open."""
        verb = "connected" if type_ == "client_connected" else "disconnected"
        log.info("client %s %s", address, verb)
        self._link.status(
            self._component,
            StatusLevel.OK,
            type_,
            f"Client {address} {verb}",
            {"address": address, "clients": clients},
        )
