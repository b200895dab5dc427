"""The app's ASGI HTTP connection: quart-trio's, except that the end of the request reported
while the response is being sent no longer cancels that send. And Hypercorn's HTTP/1.1
protocol, sending a response's head and body in one write.

Hypercorn (0.18) reports `http.disconnect` to the app from inside the app's last `send`, and
in that same call goes on to recycle the connection for keep-alive, or to close it when the
request body was not read in full. quart-trio (0.12) cancels the whole request as soon as it
sees the disconnect, so the recycling or the close is cancelled midway: the idle timeout is
not re-armed and, after an answer given before the body arrived (a 405, 404 or 413), the
connection stays open with no reader, and the client's next request on it hangs (found by
the schemathesis run, with requests' keep-alive). Here a disconnect cancels the request only
while its response has not started; once it has, quart-trio ends the request after the send.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11
import hypercorn.protocol
from hypercorn.events import RawData
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from quart.asgi import ASGIHTTPConnection
from quart_trio.asgi import TrioASGIHTTPConnection

if TYPE_CHECKING:
    import trio
    from hypercorn.protocol.events import Event as StreamEvent
    from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, H11SendableEvent
    from quart.typing import ResponseTypes
    from quart.wrappers import Request


class HTTPConnection(TrioASGIHTTPConnection):
    _responding = False

    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, receive: ASGIReceiveCallable
    ) -> None:
        await ASGIHTTPConnection.handle_messages(self, request, receive)
        if not self._responding:
            # The client went away before there was an answer: stop working for it.
            nursery.cancel_scope.cancel()

    async def _send_response(self, send: ASGISendCallable, response: ResponseTypes) -> None:
        self._responding = True
        await super()._send_response(send, response)


class CoalescingH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol, writing a response's head with its first body chunk.

    Hypercorn (0.18) writes the head (status line and headers) as soon as the app starts the
    response, and the body in a second write: two TCP segments and two wake-ups of the client
    for each of this API's one-chunk answers. Here the head waits for the first body chunk, the
    end of the response or of the stream (the app sends them right after the start), and
    leaves in the same write: about a tenth of the API's CPU per sent message (issue 4).
    """

    _head = b""

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        try:
            # None only for h11.ConnectionClosed, which Hypercorn never sends this way.
            data = self.connection.send(event) or b""
        except h11.LocalProtocolError:
            # As Hypercorn: the client broke the protocol, so this answer cannot go out.
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if isinstance(event, h11.Response):
            self._head += data
            return
        await self._flush(data)

    async def _flush(self, data: bytes = b"") -> None:
        head, self._head = self._head, b""
        if head or data:
            await self.send(RawData(data=head + data))

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed):
            # A response ended without its body end (the app failed midway) still shows
            # its head, as it would have without the wait.
            await self._flush()
        await super().stream_send(event)


def install_coalescing_h11() -> None:
    """Make Hypercorn serve HTTP/1.1 with CoalescingH11Protocol (its ProtocolWrapper looks
    the class up by name on each connection); left as it is if that name ever goes."""
    if getattr(hypercorn.protocol, "H11Protocol", None) in (H11Protocol, CoalescingH11Protocol):
        setattr(hypercorn.protocol, "H11Protocol", CoalescingH11Protocol)  # noqa: B010
