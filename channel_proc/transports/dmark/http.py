"""A minimal HTTP/1.1 server on h11 for the dmark transport: bounded sizes, read deadlines,
JSON responses, and a way to notice that a client hung up while its request is held open.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import h11
import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

MAX_BODY_BYTES: Final = 64 * 1024
MAX_HEADER_BYTES: Final = 16 * 1024
RECEIVE_SIZE: Final = 16 * 1024
#: An idle keep-alive connection, or a client that sends its request this slowly, is dropped.
READ_TIMEOUT: Final = 30.0
WRITE_TIMEOUT: Final = 10.0
SERVER_HEADER: Final = ("server", "junebug-dmark")
JSON_TYPE: Final = "application/json; charset=utf-8"


def normalise_path(path: str) -> str:
    """'/a/b/', 'a/b' and '/a/b' are the same route."""
    return "/" + path.strip("/")


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    #: Normalised (see normalise_path), without the query.
    path: str
    query: str
    content_type: str
    body: bytes


class HttpConnection:
    """One client connection: requests in, responses out, one at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)

    @property
    def can_respond(self) -> bool:
        """A request is waiting for its response and none has been started."""
        return self._conn.our_state is h11.SEND_RESPONSE

    async def next_request(self) -> HttpRequest | None:
        """The next complete request; None when the client closed or was too slow.

        Raises:
            h11.RemoteProtocolError: not HTTP/1.1 we accept (answer with `reject`).
        """
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
        request: h11.Request | None = None
        body = bytearray()
        with trio.move_on_after(READ_TIMEOUT):
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    self._conn.receive_data(await self.stream.receive_some(RECEIVE_SIZE))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY_BYTES:
                        raise h11.RemoteProtocolError("request body too large", 413)
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    return _request(request, bytes(body))
                else:
                    # The client closed, or PAUSED after a protocol switch we do not offer.
                    return None
        return None

    @property
    def reusable(self) -> bool:
        """The last exchange finished cleanly and the connection may carry another."""
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    async def respond(self, status: int, body: bytes, *, allow: str | None = None) -> bool:
        """Send one complete response; False when the client is gone or too slow to take it."""
        headers = [SERVER_HEADER, ("content-type", JSON_TYPE), ("content-length", str(len(body)))]
        if allow is not None:
            headers.append(("allow", allow))
        try:
            data = self._conn.send(h11.Response(status_code=status, headers=headers)) or b""
            if body:
                data += self._conn.send(h11.Data(data=body)) or b""
            data += self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            # A response was already (partly) sent on this connection.
            return False
        with trio.move_on_after(WRITE_TIMEOUT):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            return True
        return False

    async def wait_hang_up(self) -> None:
        """Return when the client closes its side while we owe it a response.

        A pipelined next request is kept for later; after that we stop watching, so this
        only returns on a hang-up before any further bytes.
        """
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if not data:
            return
        self._conn.receive_data(data)
        await trio.sleep_forever()


def _request(request: h11.Request, body: bytes) -> HttpRequest:
    target = request.target.decode("utf-8", errors="replace")
    path, _, query = target.partition("?")
    content_type = next((v for k, v in request.headers if k == b"content-type"), b"")
    return HttpRequest(
        method=request.method.decode("ascii", errors="replace"),
        path=normalise_path(path),
        query=query,
        content_type=content_type.decode("latin-1"),
        body=body,
    )


async def serve_http(
    stream: trio.SocketStream, handle: Callable[[HttpConnection, HttpRequest], Awaitable[None]]
) -> None:
    """Serve requests on one connection until the client leaves or the exchange breaks."""
    connection = HttpConnection(stream)
    async with stream:
        try:
            while (request := await connection.next_request()) is not None:
                await handle(connection, request)
                if not connection.reusable:
                    return
        except h11.RemoteProtocolError as exc:
            body = json.dumps({"error": str(exc)}).encode()
            await connection.respond(exc.error_status_hint, body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
