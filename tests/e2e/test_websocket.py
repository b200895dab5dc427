"""Web chat through the real gateway with a real WebSocket client, on both backends."""

from __future__ import annotations

import base64
import json
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from tests.e2e.gateway import WAIT, free_port, remember_channel, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "chat-s3cret"


@asynccontextmanager
async def web_chat(port: int, resource: str) -> AsyncIterator[WebSocketConnection]:
    """A browser's WebSocket. We own the TCP stream: trio-websocket's client leaks the
    socket when the server closes first."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", resource)
        try:
            yield ws
        finally:
            with trio.move_on_after(5, shield=True):
                await ws.aclose()
            nursery.cancel_scope.cancel()


def address_of(ws: WebSocketConnection) -> str:
    local = ws.local
    assert not isinstance(local, str)
    return f"{local.address}:{local.port}"


async def handshake_status(port: int, resource: str) -> int | None:
    """The HTTP status answering an upgrade request (None: not listening yet)."""
    headers = {
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": base64.b64encode(b"0123456789abcdef").decode(),
    }
    try:
        async with httpx.AsyncClient(timeout=WAIT) as client:
            response = await client.get(f"http://127.0.0.1:{port}{resource}", headers=headers)
    except httpx.TransportError:
        return None
    return response.status_code


async def wait_listening(port: int) -> None:
    """A handshake without the token is refused once the channel listens (no session opens)."""

    async def refused() -> bool:
        return await handshake_status(port, "/chat") == 401

    with trio.fail_after(WAIT):
        await wait_for(refused)


async def next_frame(ws: WebSocketConnection) -> Any:
    with trio.fail_after(WAIT):
        return json.loads(await ws.get_message())


async def next_mo(hook: FakeWebhook, count: int) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        requests = await hook.wait_for_requests(count, path="/mo", delivered_only=True)
    body: dict[str, Any] = requests[count - 1].json()
    return body


async def send(gateway: Gateway, channel_id: str, body: dict[str, Any]) -> None:
    response = await gateway.request("POST", f"/channels/{channel_id}/messages/", body)
    assert response.status_code == 201, response.json()


async def test_websocket_chat(settings: Settings) -> None:
    port = free_port()
    async with open_fake_webhook() as hook, running_gateway(settings) as gateway:
        response = await gateway.request(
            "POST",
            "/channels/",
            {
                "type": "websocket",
                "label": "Web chat",
                "mo_url": hook.url("/mo"),
                "config": {
                    "port": port,
                    "interface": "127.0.0.1",
                    "path": "/chat",
                    "token": TOKEN,
                    "max_connections": 2,
                },
            },
        )
        assert response.status_code == 201, response.json()
        cid = response.json()["result"]["id"]
        remember_channel(settings, cid)
        await wait_listening(port)
        assert await handshake_status(port, "/chat?token=wrong") == 401

        async with web_chat(port, f"/chat?token={TOKEN}") as ws:
            new = await next_mo(hook, 1)
            assert new["channel_data"] == {"session_event": "new"}
            assert new["from"] == address_of(ws)
            assert new["to"] == f"127.0.0.1:{port}"

            # A JSON frame and a plain-text frame both arrive as "resume" messages.
            await ws.send_message(json.dumps({"content": "Hi there"}))
            first = await next_mo(hook, 2)
            assert (first["content"], first["channel_data"]) == (
                "Hi there",
                {"session_event": "resume"},
            )
            await ws.send_message("plain")
            assert (await next_mo(hook, 3))["content"] == "plain"

            # Replies and sends to the address come back as JSON frames.
            await send(gateway, cid, {"reply_to": first["message_id"], "content": "Hello!"})
            assert await next_frame(ws) == {"content": "Hello!"}
            await send(gateway, cid, {"to": address_of(ws), "content": "Anything else?"})
            assert await next_frame(ws) == {"content": "Anything else?"}

            # The app ends the session: a last frame, then the server closes the socket.
            await send(
                gateway,
                cid,
                {
                    "reply_to": first["message_id"],
                    "content": "Bye",
                    "channel_data": {"session_event": "close"},
                },
            )
            assert await next_frame(ws) == {"content": "Bye"}
            with trio.fail_after(WAIT):
                while ws.closed is None:
                    with suppress(ConnectionClosed):
                        await ws.get_message()
            assert ws.closed.code == 1000

        # A user who leaves: the session's close reaches the mo_url.
        async with web_chat(port, f"/chat/?token={TOKEN}") as ws:
            address = address_of(ws)
            assert (await next_mo(hook, 4))["channel_data"] == {"session_event": "new"}
        close = await next_mo(hook, 5)
        assert close["channel_data"] == {"session_event": "close"}
        assert close["from"] == address

        found = (await gateway.request("GET", f"/channels/{cid}")).json()["result"]
        component = found["status"]["components"]["websocket"]
        assert component["status"] == "ok"
