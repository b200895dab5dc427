"""Keep-alive HTTP/1.1 connections for webhook POSTs: h11 for the protocol, trio streams for
the bytes, a small pool per origin.

Written here rather than taken from httpcore because httpcore's pool rescans every pooled
connection twice per request (a poll() system call for each idle one, and a quadratic count
of idle ones): with a forwarder's 16 connections that was about a tenth of a channel
process's CPU under load. Here a request takes the most recently used idle connection of its
origin and checks only that one. The protocol itself (framing, keep-alive rules, chunked
answers, early answers and closes) is all h11's.

Errors carry httpcore's names (ConnectError, ReadTimeout, RemoteProtocolError, ...), which
webhook errors quote, so operators read the same reasons as before.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, cast

import h11
import trio

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Sequence

#: Bytes asked of the socket per read.
READ_SIZE: Final = 65536
#: Seconds an idle connection is kept (httpx's default keepalive_expiry).
KEEPALIVE_EXPIRY: Final = 5.0


class HTTPError(Exception):
    """A request got no complete answer; the subclass names what failed."""


class ConnectError(HTTPError):
    pass


class ConnectTimeout(HTTPError):  # noqa: N818 -- httpcore's name, quoted in reasons
    pass


class WriteTimeout(HTTPError):  # noqa: N818 -- httpcore's name, quoted in reasons
    pass


class ReadError(HTTPError):
    pass


class ReadTimeout(HTTPError):  # noqa: N818 -- httpcore's name, quoted in reasons
    pass


class RemoteProtocolError(HTTPError):
    pass


class LocalProtocolError(HTTPError):
    pass


class UnsupportedProtocol(HTTPError):  # noqa: N818 -- httpcore's name, quoted in reasons
    """Neither http nor https: sending it again cannot help."""


def _reason(exc: BaseException) -> str:
    """What a socket or TLS failure says (trio wraps the OS or SSL error as its cause)."""
    return str(exc.__cause__ or exc) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int


@dataclass(eq=False, slots=True)
class _Connection:
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    socket: trio.socket.SocketType
    protocol: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def close(self) -> None:
        """Drop the connection at once (no TLS goodbye: nothing more is sent on it)."""
        self.socket.close()

    def stale(self, now: float) -> bool:
        """Idle too long, or closed by the server: an idle socket that is readable can only
        be about to read EOF (or a stray answer), so it is not reused."""
        return now - self.idle_since > KEEPALIVE_EXPIRY or self.socket.is_readable()


class Response:
    """An answer's status and headers; `body()` reads it, `aclose()` returns the connection
    to the pool if the whole answer was read and both sides keep it alive."""

    def __init__(
        self, pool: ConnectionPool, origin: Origin, connection: _Connection, event: h11.Response
    ) -> None:
        self.status: int = event.status_code
        self.headers: Sequence[tuple[bytes, bytes]] = list(event.headers)
        self._pool = pool
        self._origin = origin
        self._connection: _Connection | None = connection
        self._complete = False

    def body(self) -> AsyncIterator[bytes]:
        """The answer's body in chunks, as they arrive (may be left unfinished: `aclose`
        then drops the connection)."""
        return self

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        connection = self._connection
        if connection is None or self._complete:
            raise StopAsyncIteration
        while True:
            event = await self._pool._next_event(connection)
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                self._complete = True
                raise StopAsyncIteration

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._complete:
            self._pool._release(self._origin, connection)
        else:
            connection.close()
        await trio.lowlevel.checkpoint()


class ConnectionPool:
    """Idle connections per origin, at most `max_idle` of each; `timeout` bounds the connect
    (TLS handshake included), the send, and each read."""

    def __init__(self, *, ssl_context: ssl.SSLContext, timeout: float, max_idle: int) -> None:
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._max_idle = max_idle
        self._idle: dict[Origin, deque[_Connection]] = {}

    async def post(
        self, origin: Origin, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        """Send one POST (`headers` must hold Host and Content-Length) and read the answer's
        head; close the Response. Raises HTTPError."""
        connection = self._take_idle(origin) or await self._connect(origin)
        try:
            protocol = connection.protocol
            try:
                data = b"".join(
                    (
                        protocol.send(
                            h11.Request(method=b"POST", target=target, headers=list(headers))
                        )
                        or b"",
                        protocol.send(h11.Data(data=body)) or b"",
                        protocol.send(h11.EndOfMessage()) or b"",
                    )
                )
            except h11.LocalProtocolError as exc:
                raise LocalProtocolError(str(exc)) from exc
            await self._send(connection, data)
            while True:
                event = await self._next_event(connection)
                if isinstance(event, h11.Response):
                    return Response(self, origin, connection, event)
                # Anything else before the answer is a 1xx interim answer: skipped.
        except BaseException:
            connection.close()
            raise

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        await trio.lowlevel.checkpoint()

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = trio.current_time()
        while idle:
            # The most recently used: the likeliest to be alive, and the others may expire.
            connection = idle.pop()
            if not connection.stale(now):
                return connection
            connection.close()
        return None

    def _release(self, origin: Origin, connection: _Connection) -> None:
        protocol = connection.protocol
        if protocol.our_state is not h11.DONE or protocol.their_state is not h11.DONE:
            # Either side asked to close (Connection: close, HTTP/1.0, ...).
            connection.close()
            return
        protocol.start_next_cycle()
        idle = self._idle.setdefault(origin, deque())
        if len(idle) >= self._max_idle:
            connection.close()
            return
        connection.idle_since = trio.current_time()
        idle.append(connection)

    async def _connect(self, origin: Origin) -> _Connection:
        if origin.scheme not in ("http", "https"):
            raise UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{origin.scheme}://'."
            )
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
        with trio.move_on_after(self._timeout):
            try:
                plain = await trio.open_tcp_stream(origin.host, origin.port)
                stream = plain
                if origin.scheme == "https":
                    secure = trio.SSLStream(plain, self._ssl_context, server_hostname=origin.host)
                    await secure.do_handshake()
                    stream = secure
            except (OSError, trio.BrokenResourceError) as exc:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                raise ConnectError(_reason(exc)) from exc
            return _Connection(stream, plain.socket)
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise ConnectTimeout(f"no connection within {self._timeout:g} s")

    async def _send(self, connection: _Connection, data: bytes) -> None:
        with trio.move_on_after(self._timeout) as waited:
            try:
                await connection.stream.send_all(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                # Read on: a server may answer (e.g. 413) and close before it took the
                # whole request; if it did not, the read says so.
                return
        if waited.cancelled_caught:
            raise WriteTimeout(f"request not sent within {self._timeout:g} s")

    async def _next_event(self, connection: _Connection) -> h11.Event | type[h11.PAUSED]:
        protocol = connection.protocol
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as exc:
                raise RemoteProtocolError(str(exc)) from exc
            if event is not h11.NEED_DATA:
                return cast("h11.Event | type[h11.PAUSED]", event)
            data: bytes | bytearray = b""
            with trio.move_on_after(self._timeout) as waited:
                try:
                    data = await connection.stream.receive_some(READ_SIZE)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ReadError(_reason(exc)) from exc
            if waited.cancelled_caught:
                raise ReadTimeout(f"no answer within {self._timeout:g} s")
            if not data and protocol.their_state is h11.SEND_RESPONSE:
                raise RemoteProtocolError("Server disconnected without sending a response.")
            protocol.receive_data(bytes(data))
