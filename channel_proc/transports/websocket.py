"""The `websocket` channel type: a WebSocket server where each connection is one session.

Connect -> inbound session "new"; each frame -> "resume"; disconnect -> "close". Frames are
JSON {"content": ...} both ways (plain text is accepted inbound); a client's address is its
"ip:port", as for telnet.
"""

from __future__ import annotations

import hmac
import json
import logging
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Final
from urllib.parse import parse_qsl

import trio
from pydantic import BaseModel, ConfigDict, Field
from trio_websocket import ConnectionClosed, Endpoint, WebSocketConnection, WebSocketServer

from channel_proc.transports.base import SendReceipt, StatusLevel, Transport, TransportLink
from channel_proc.transports.errors import ProviderRejected
from channel_proc.transports.listen import Once, open_listeners_with_retry
from channel_proc.transports.sessions import SessionAnnouncer
from ipc.payloads import SessionEvent, VumiMessage

if TYPE_CHECKING:
    from collections.abc import Iterator

    from trio_websocket import WebSocketRequest

log = logging.getLogger(__name__)

COMPONENT: Final = "websocket"
#: A client that does not finish its opening handshake in this time is dropped.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Bounded cleanup: the closing handshake, and publishing the session's end.
CLOSE_TIMEOUT: Final = 2.0
#: A client that does not take a frame in this time is disconnected (it would hold up
#: every other message of the channel).
SEND_TIMEOUT: Final = 10.0
#: WebSocket close code 1009 (RFC 6455): the message is too big to process.
MESSAGE_TOO_BIG: Final = 1009


class WebsocketConfig(BaseModel):
    """The `config` of a websocket channel."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    port: Annotated[int, Field(ge=0, le=65535, description="The TCP port to listen on")]
    interface: Annotated[str, Field(description="The address to listen on")] = "0.0.0.0"
    path: Annotated[
        str, Field(pattern=r"^/[^?#\s]*$", description="The URL path clients connect to")
    ] = "/"
    token: Annotated[
        str | None,
        Field(min_length=1, description="If set, clients must connect with ?token=<token>"),
    ] = None
    max_frame_bytes: Annotated[
        int, Field(ge=1, le=16 * 1024 * 1024, description="Larger frames close the connection")
    ] = 64 * 1024
    max_connections: Annotated[
        int, Field(ge=1, description="Further connections are refused with HTTP 503")
    ] = 1000
    to_addr: Annotated[
        str | None, Field(description="The to_addr of inbound messages; default: host:port")
    ] = None
    transport_type: Annotated[str, Field(description="transport_type of inbound messages")] = (
        "websocket"
    )


def frame_content(text: str) -> str | None:
    """What an inbound frame says: the `content` of a JSON object {"content": str|null},
    otherwise the frame's text itself."""
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            return text
        if isinstance(data, dict) and "content" in data:
            content = data["content"]
            if content is None or isinstance(content, str):
                return content
    return text


def outbound_frame(content: str) -> str:
    return json.dumps({"content": content})


def normalise_path(path: str) -> str:
    return "/" + path.strip("/")


@dataclass(slots=True)
class _Client:
    address: str
    ws: WebSocketConnection
    closed_by_us: bool = False


@contextmanager
def _map_errors(address: str) -> Iterator[None]:
    """The one place WebSocket errors become SendErrors."""
    try:
        yield
    except ConnectionClosed as exc:
        # The address is the client's ephemeral port: it will never come back, so no retry.
        raise ProviderRejected(
            f"websocket client at {address} disconnected", code="client_disconnected"
        ) from exc


class WebsocketTransport(Transport[WebsocketConfig]):
    """A WebSocket server; each connection is one session addressed by "ip:port"."""

    kind = "websocket"
    config_type = WebsocketConfig

    def __init__(self, config: WebsocketConfig, link: TransportLink) -> None:
        super().__init__(config, link)
        self._clients: dict[str, _Client] = {}
        #: Accepted or being accepted: the slot is taken before the handshake answer.
        self._connections = 0
        self._at_limit = False
        self._path = normalise_path(config.path)
        self._sessions = SessionAnnouncer(
            link, COMPONENT, to_addr=config.to_addr, transport_type=config.transport_type
        )

    @property
    def server_address(self) -> str:
        """The "host:port" we listen on (the actual port when configured with port 0)."""
        return self._sessions.server_address

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ready = Once(task_status)
        listeners = await open_listeners_with_retry(
            self.link, COMPONENT, self.config.interface, self.config.port, ready
        )
        port = listeners[0].socket.getsockname()[1]
        self._sessions.server_address = f"{self.config.interface}:{port}"
        log.info("serving WebSocket on ws://%s%s", self._sessions.server_address, self._path)
        self.link.status(
            COMPONENT,
            StatusLevel.OK,
            "listening",
            f"Listening on {self._sessions.server_address}",
            {"interface": self.config.interface, "port": port, "path": self._path},
        )
        server = WebSocketServer(
            self._serve_request,
            listeners,
            max_message_size=self.config.max_frame_bytes,
            connect_timeout=HANDSHAKE_TIMEOUT,
            disconnect_timeout=CLOSE_TIMEOUT,
        )
        ready()
        await server.run()

    async def send(self, msg: VumiMessage) -> SendReceipt:
        address = msg.to_addr or ""
        client = self._clients.get(address)
        if client is None:
            raise ProviderRejected(
                f"no websocket client at {address or '(no to_addr)'}", code="unknown_address"
            )
        with _map_errors(address):
            if msg.content is not None:
                with trio.move_on_after(SEND_TIMEOUT) as waited:
                    await client.ws.send_message(outbound_frame(msg.content))
                if waited.cancelled_caught:
                    await self._close(client, 1008, "not reading")
                    raise ProviderRejected(
                        f"websocket client at {address} is not reading", code="client_stalled"
                    )
            if msg.session_event == SessionEvent.CLOSE:
                client.closed_by_us = True
                await self._close(client, 1000, "session closed")
        log.info(
            "sent message %s to %s (%d chars%s)",
            msg.message_id,
            address,
            len(msg.content or ""),
            ", session closed" if client.closed_by_us else "",
        )
        return SendReceipt()

    @staticmethod
    async def _close(client: _Client, code: int, reason: str) -> None:
        # Bounded: a client that never answers the closing handshake must not hold us up.
        with trio.move_on_after(CLOSE_TIMEOUT):
            await client.ws.aclose(code, reason)

    async def _serve_request(self, request: WebSocketRequest) -> None:
        refusal = self._refusal(request)
        remote = request.remote
        if refusal is None and not isinstance(remote, Endpoint):
            refusal = 400, "no client address"
        if refusal is not None:
            status, reason = refusal
            log.info("refused a websocket connection (%d: %s)", status, reason)
            # The client may already be gone; there is nothing more to tell it then.
            with trio.move_on_after(CLOSE_TIMEOUT), suppress(ConnectionClosed):
                await request.reject(status, body=reason.encode())
            return
        assert isinstance(remote, Endpoint)
        self._connections += 1
        try:
            try:
                ws = await request.accept()
            except ConnectionClosed:
                return
            await self._session(_Client(f"{remote.address}:{remote.port}", ws))
        finally:
            self._connections -= 1

    def _refusal(self, request: WebSocketRequest) -> tuple[int, str] | None:
        """Why a connection attempt is refused (HTTP status, reason), or None."""
        path, _, query = request.path.partition("?")
        if normalise_path(path) != self._path:
            return 404, "no such path"
        if self.config.token is not None:
            given = next((v for k, v in parse_qsl(query) if k == "token"), "")
            if not hmac.compare_digest(given.encode(), self.config.token.encode()):
                return 401, "a valid token is required"
        if self._connections >= self.config.max_connections:
            # Once per episode: a flood of refusals must not become a flood of statuses.
            if not self._at_limit:
                self._at_limit = True
                self.link.status(
                    COMPONENT,
                    StatusLevel.DEGRADED,
                    "connection_limit",
                    f"Refusing connections: {self._connections} open",
                    {"max_connections": self.config.max_connections},
                )
            return 503, "too many connections"
        return None

    async def _session(self, client: _Client) -> None:
        self._clients[client.address] = client
        self._sessions.client_status("client_connected", client.address, len(self._clients))
        try:
            await self._sessions.inbound(client.address, SessionEvent.NEW, None)
            await self._pump_frames(client)
        finally:
            self._clients.pop(client.address, None)
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await client.ws.aclose()
                if not client.closed_by_us:
                    await self._sessions.inbound(client.address, SessionEvent.CLOSE, None)
            self._at_limit = False
            self._sessions.client_status("client_disconnected", client.address, len(self._clients))

    async def _pump_frames(self, client: _Client) -> None:
        limit = self.config.max_frame_bytes
        while True:
            try:
                frame = await client.ws.get_message()
            except ConnectionClosed as exc:
                if exc.reason is not None and exc.reason.code == MESSAGE_TOO_BIG:
                    log.warning("frame from %s over %d bytes; disconnected", client.address, limit)
                return
            if isinstance(frame, bytes):
                text = frame.decode("utf-8", errors="replace")
            else:
                text = frame
                # The library counts characters; a character is up to 4 bytes in UTF-8.
                if len(text) * 4 > limit and len(text.encode()) > limit:
                    log.warning("frame from %s over %d bytes; disconnected", client.address, limit)
                    await self._close(client, MESSAGE_TOO_BIG, "frame too large")
                    return
            await self._sessions.inbound(client.address, SessionEvent.RESUME, frame_content(text))
