"""The app's ASGI HTTP connection: quart-trio's, except that the end of the request reported
while the response is being sent no longer cancels that send.

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

from quart.asgi import ASGIHTTPConnection
from quart_trio.asgi import TrioASGIHTTPConnection

if TYPE_CHECKING:
    import trio
    from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
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
