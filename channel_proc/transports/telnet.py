"""The `telnet` channel type: a TCP line server where each connection is one session.

Connect -> inbound session "new"; each line -> "resume"; disconnect -> "close".
Outbound messages are written to the connection whose "ip:port" is the `to_addr`.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Final

import trio
from pydantic import BaseModel, ConfigDict, Field, field_validator

from channel_proc.transports.base import SendReceipt, StatusLevel, Transport, TransportLink
from channel_proc.transports.errors import ProviderRejected
from channel_proc.transports.listen import Once, open_listeners_with_retry
from channel_proc.transports.sessions import SessionAnnouncer
from ipc.payloads import SessionEvent, VumiMessage

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger(__name__)

COMPONENT: Final = "telnet"
#: The default longest line: a client that sends more without a newline is told so and
#: disconnected, so one that never sends a newline cannot grow our memory.
MAX_LINE_BYTES: Final = 64 * 1024
RECEIVE_SIZE: Final = 4096
#: Bounded cleanup when a session ends during shutdown, and the most time spent telling
#: a client why it is disconnected.
CLOSE_TIMEOUT: Final = 2.0

_PORT = r"[0-9]{1,5}"
_HOST = r"[A-Za-z0-9.-]+"
_OPTION = rf"(?:port={_PORT}|interface={_HOST}|backlog=[0-9]{{1,5}})"
#: The twisted server-endpoint strings we accept: "tcp:PORT" or keyword options.
ENDPOINT_PATTERN: Final = rf"^tcp:(?:{_PORT}|{_OPTION})(?::{_OPTION})*$"
_ENDPOINT_RE = re.compile(ENDPOINT_PATTERN)


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    interface: str
    port: int
    backlog: int | None = None


def parse_endpoint(text: str) -> TcpEndpoint:
    """Parse a twisted server-endpoint string such as "tcp:port=9001:interface=127.0.0.1".

    Raises:
        ValueError: not a tcp endpoint we can listen on.
    """
    if not _ENDPOINT_RE.match(text):
        raise ValueError(
            f"{text!r} is not a TCP endpoint like 'tcp:9001' or 'tcp:port=9001:interface=0.0.0.0'"
        )
    options: dict[str, str] = {}
    for index, part in enumerate(text.split(":")[1:]):
        key, sep, value = part.partition("=")
        if not sep:
            if index != 0:
                raise ValueError(f"{text!r}: only the first option may be a bare port")
            key, value = "port", part
        if key in options:
            raise ValueError(f"{text!r}: {key} given twice")
        options[key] = value
    if "port" not in options:
        raise ValueError(f"{text!r}: no port")
    port = int(options["port"])
    if port > 65535:
        raise ValueError(f"{text!r}: port {port} is out of range")
    backlog = int(options["backlog"]) if "backlog" in options else None
    return TcpEndpoint(interface=options.get("interface", "0.0.0.0"), port=port, backlog=backlog)


class TelnetConfig(BaseModel):
    """The `config` of a telnet channel (the fields of vumi's TelnetServerTransport)."""

    # Unknown keys are ignored, as vumi did, so existing channel configs keep working.
    model_config = ConfigDict(frozen=True, extra="ignore")

    twisted_endpoint: Annotated[
        str,
        Field(
            pattern=ENDPOINT_PATTERN,
            description="Where to listen, e.g. 'tcp:9001' or 'tcp:port=9001:interface=127.0.0.1'",
        ),
    ]
    to_addr: Annotated[
        str | None,
        Field(description="The to_addr of inbound messages; default: the server's host:port"),
    ] = None
    transport_type: Annotated[str, Field(description="transport_type of inbound messages")] = (
        "telnet"
    )
    max_line_bytes: Annotated[
        int,
        Field(
            ge=16,
            le=16 * 1024 * 1024,
            description="A client whose line grows past this without a newline is disconnected",
        ),
    ] = MAX_LINE_BYTES

    @field_validator("twisted_endpoint")
    @classmethod
    def _endpoint_parses(cls, value: str) -> str:
        parse_endpoint(value)
        return value

    @property
    def endpoint(self) -> TcpEndpoint:
        return parse_endpoint(self.twisted_endpoint)


# Telnet command bytes (RFC 854) that we skip: clients may negotiate options at connect.
_IAC, _SB, _SE = 255, 250, 240
_WILL_WONT_DO_DONT = frozenset({251, 252, 253, 254})


@dataclass(slots=True)
class LineReader:
    """Sans-IO: bytes in, complete lines out; telnet commands are dropped.

    A line that grows past `max_line` bytes sets `overflowed`: the lines completed before
    it are still returned, and everything after it is ignored (the session is over).
    """

    max_line: int = MAX_LINE_BYTES
    overflowed: bool = False
    _line: bytearray = field(default_factory=bytearray)
    # 0 data, 1 after IAC, 2 option byte follows, 3 in subnegotiation, 4 IAC in subnegotiation
    _state: int = 0

    def feed(self, data: bytes) -> list[str]:
        lines: list[str] = []
        if self.overflowed:
            return lines
        if self._state == 0 and _IAC not in data:
            chunks = data.split(b"\n")
            for chunk in chunks[:-1]:
                if not self._append(chunk):
                    return lines
                lines.append(self._finish())
            self._append(chunks[-1])
            return lines
        for byte in data:
            if self._state == 0:
                if byte == _IAC:
                    self._state = 1
                elif byte == 0x0A:
                    lines.append(self._finish())
                elif not self._append(bytes((byte,))):
                    return lines
            elif self._state == 1:
                if byte == _IAC:
                    if not self._append(bytes((byte,))):
                        return lines
                    self._state = 0
                elif byte in _WILL_WONT_DO_DONT:
                    self._state = 2
                elif byte == _SB:
                    self._state = 3
                else:
                    self._state = 0
            elif self._state == 2:
                self._state = 0
            elif self._state == 3:
                self._state = 4 if byte == _IAC else 3
            else:
                self._state = 0 if byte == _SE else 3
        return lines

    def flush(self) -> str | None:
        """The unfinished last line, if any (called when the client goes away)."""
        if not self._line or self.overflowed:
            return None
        return self._finish()

    def _append(self, chunk: bytes) -> bool:
        """Add to the current line; False (and `overflowed`) when it would grow too long.
        The line's "\\r" is counted: a line is at most `max_line` bytes as sent."""
        if len(self._line) + len(chunk) > self.max_line:
            self.overflowed = True
            self._line.clear()
            return False
        self._line += chunk
        return True

    def _finish(self) -> str:
        raw = bytes(self._line).rstrip(b"\r")
        self._line.clear()
        return raw.decode("utf-8", errors="replace")


@dataclass(slots=True)
class _Client:
    address: str
    stream: trio.SocketStream
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    closed_by_us: bool = False


@contextmanager
def _map_errors(address: str) -> Iterator[None]:
    """The one place socket errors become SendErrors."""
    try:
        yield
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        # The address is the client's ephemeral port: it will never come back, so no retry.
        raise ProviderRejected(
            f"telnet client at {address} disconnected", code="client_disconnected"
        ) from exc


class TelnetTransport(Transport[TelnetConfig]):
    """A telnet line server; each TCP connection is one session addressed by "ip:port"."""

    kind = "telnet"
    config_type = TelnetConfig

    def __init__(self, config: TelnetConfig, link: TransportLink) -> None:
        super().__init__(config, link)
        self._clients: dict[str, _Client] = {}
        self._sessions = SessionAnnouncer(
            link, COMPONENT, to_addr=config.to_addr, transport_type=config.transport_type
        )

    @property
    def server_address(self) -> str:
        """The "host:port" we listen on (the actual port when configured with port 0)."""
        return self._sessions.server_address

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        endpoint = self.config.endpoint
        ready = Once(task_status)
        listeners = await open_listeners_with_retry(
            self.link,
            COMPONENT,
            endpoint.interface,
            endpoint.port,
            ready,
            backlog=endpoint.backlog,
        )
        port = listeners[0].socket.getsockname()[1]
        self._sessions.server_address = f"{endpoint.interface}:{port}"
        log.info("listening on %s", self._sessions.server_address)
        self.link.status(
            COMPONENT,
            StatusLevel.OK,
            "listening",
            f"Listening on {self._sessions.server_address}",
            {"interface": endpoint.interface, "port": port},
        )
        ready()
        await trio.serve_listeners(self._serve_client, listeners)

    async def send(self, msg: VumiMessage) -> SendReceipt:
        address = msg.to_addr or ""
        client = self._clients.get(address)
        if client is None:
            raise ProviderRejected(
                f"no telnet client at {address or '(no to_addr)'}", code="unknown_address"
            )
        with _map_errors(address):
            async with client.send_lock:
                if msg.content is not None:
                    await client.stream.send_all(msg.content.encode() + b"\r\n")
                if msg.session_event == SessionEvent.CLOSE:
                    client.closed_by_us = True
                    await client.stream.aclose()
        log.info(
            "sent message %s to %s (%d chars%s)",
            msg.message_id,
            address,
            len(msg.content or ""),
            ", session closed" if client.closed_by_us else "",
        )
        return SendReceipt()

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
        except OSError:
            # Gone before we could look at it: there is no session to report.
            await stream.aclose()
            return
        client = _Client(f"{host}:{port}", stream)
        self._clients[client.address] = client
        self._sessions.client_status("client_connected", client.address, len(self._clients))
        try:
            await self._sessions.inbound(client.address, SessionEvent.NEW, None)
            await self._pump_lines(client)
        finally:
            self._clients.pop(client.address, None)
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await stream.aclose()
                if not client.closed_by_us:
                    await self._sessions.inbound(client.address, SessionEvent.CLOSE, None)
            self._sessions.client_status("client_disconnected", client.address, len(self._clients))

    async def _pump_lines(self, client: _Client) -> None:
        reader = LineReader(self.config.max_line_bytes)
        while True:
            try:
                data = await client.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                last = reader.flush()
                if last is not None:
                    await self._sessions.inbound(client.address, SessionEvent.RESUME, last)
                return
            for line in reader.feed(data):
                await self._sessions.inbound(client.address, SessionEvent.RESUME, line)
            if reader.overflowed:
                await self._refuse_long_line(client)
                return

    async def _refuse_long_line(self, client: _Client) -> None:
        """Tell the client why it is disconnected; its overlong line is not delivered."""
        limit = self.config.max_line_bytes
        log.warning("line from %s longer than %d bytes; disconnected", client.address, limit)
        notice = f"Error: line longer than {limit} bytes; disconnecting.\r\n".encode()
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                async with client.send_lock:
                    await client.stream.send_all(notice)
                    await client.stream.send_eof()
                # Read (and drop) what the client still sends, so that closing does not
                # reset the connection before it has read the notice.
                while await client.stream.receive_some(RECEIVE_SIZE):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
