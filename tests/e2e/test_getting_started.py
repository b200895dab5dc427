"""The Junebug docs' getting-started walk-through (section 1.2), as written, on both backends.

The real junebug-supervisor, a real telnet client, a real webhook receiver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.e2e.gateway import WAIT, free_port, remember_channel, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE_FIELDS = (
    "inbound_message_rate",
    "outbound_message_rate",
    "submitted_event_rate",
    "rejected_event_rate",
    "delivery_succeeded_rate",
    "delivery_failed_rate",
    "delivery_pending_rate",
)


class TelnetUser:
    """What `telnet localhost 9001` does: type lines, read what arrives."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @property
    def address(self) -> str:
        host, port = self.stream.socket.getsockname()[:2]
        return f"{host}:{port}"

    async def type(self, line: str) -> None:
        await self.stream.send_all(line.encode() + b"\r\n")

    async def read_line(self) -> str:
        with trio.fail_after(15):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some(4096)
                assert chunk, "the gateway closed the telnet connection"
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode().rstrip("\r")


async def connect_telnet(gateway: Gateway, channel_id: str, port: int) -> TelnetUser:
    """Connect once the channel reports it listens on `port` (a probe would open a session)."""

    async def listening() -> bool:
        body = (await gateway.request("GET", f"/channels/{channel_id}")).json()
        telnet = body["result"]["status"]["components"].get("telnet")
        return bool(telnet) and telnet["type"] == "listening" and telnet["details"]["port"] == port

    with trio.fail_after(WAIT):
        await wait_for(listening)
    streams: list[trio.SocketStream] = []

    async def connected() -> bool:
        # A status left by a previous run of the process can be older than the listener.
        try:
            streams.append(await trio.open_tcp_stream("127.0.0.1", port))
        except OSError:
            return False
        return True

    with trio.fail_after(WAIT):
        await wait_for(connected)
    gateway.clients.append(streams[0])
    return TelnetUser(streams[0])


async def mo_messages(hook: FakeWebhook, count: int) -> list[dict[str, Any]]:
    with trio.fail_after(20):
        requests = await hook.wait_for_requests(count, path="/mo", delivered_only=True)
    return [r.json() for r in requests]


def assert_envelope(body: dict[str, Any], status: int, description: str) -> None:
    assert set(body) == {"status", "code", "description", "result"}
    assert body["status"] == status
    assert body["description"] == description


async def create_telnet_channel(
    gateway: Gateway, hook: FakeWebhook, telnet_port: int, **extra: Any
) -> dict[str, Any]:
    response = await gateway.request(
        "POST",
        "/channels/",
        {
            "type": "telnet",
            "label": "My First Channel",
            "mo_url": hook.url("/mo"),
            "config": {"twisted_endpoint": f"tcp:{telnet_port}"},
            **extra,
        },
    )
    body = response.json()
    assert response.status_code == 201, body
    assert_envelope(body, 201, "channel created")
    remember_channel(gateway.settings, body["result"]["id"])
    result: dict[str, Any] = body["result"]
    return result


async def test_getting_started_walkthrough(settings: Settings) -> None:
    telnet_port = free_port()
    async with open_fake_webhook() as hook, running_gateway(settings) as gateway:
        channel = await create_telnet_channel(
            gateway, hook, telnet_port, status_url=hook.url("/status")
        )
        cid = channel["id"]
        assert channel["type"] == "telnet"
        assert channel["label"] == "My First Channel"
        assert channel["config"] == {"twisted_endpoint": f"tcp:{telnet_port}"}
        for name in RATE_FIELDS:
            assert channel["status"][name] == 0

        # telnet localhost 9001: the mo_url sees the session start.
        user = await connect_telnet(gateway, cid, telnet_port)
        (new,) = await mo_messages(hook, 1)
        assert new["channel_data"] == {"session_event": "new"}
        assert new["content"] is None
        assert new["from"] == user.address
        assert new["to"] == f"0.0.0.0:{telnet_port}"
        assert new["channel_id"] == cid
        assert new["reply_to"] is None
        assert len(new["message_id"]) == 32

        # Send "hello" to the telnet client, with an event_url and a token.
        response = await gateway.request(
            "POST",
            f"/channels/{cid}/messages/",
            {
                "to": user.address,
                "content": "hello",
                "event_url": hook.url("/event"),
                "event_auth_token": "event-token",
            },
        )
        sent = response.json()
        assert response.status_code == 201, sent
        assert_envelope(sent, 201, "message submitted")
        assert sent["result"]["content"] == "hello"
        assert sent["result"]["to"] == user.address
        assert await user.read_line() == "hello"

        with trio.fail_after(20):
            (event,) = await hook.wait_for_requests(1, path="/event", delivered_only=True)
        assert event.headers["authorization"] == "Token event-token"
        assert event.json()["event_type"] == "submitted"
        assert event.json()["message_id"] == sent["result"]["message_id"]

        status = await gateway.request(
            "GET", f"/channels/{cid}/messages/{sent['result']['message_id']}"
        )
        assert_envelope(status.json(), 200, "message status")
        assert status.json()["result"]["last_event_type"] == "submitted"
        assert [e["event_type"] for e in status.json()["result"]["events"]] == ["submitted"]

        # Type a line: it arrives as a "resume" message; reply into its session.
        await user.type("Hi there")
        _, resume = await mo_messages(hook, 2)
        assert resume["content"] == "Hi there"
        assert resume["channel_data"] == {"session_event": "resume"}
        response = await gateway.request(
            "POST",
            f"/channels/{cid}/messages/",
            {"reply_to": resume["message_id"], "content": "hello again"},
        )
        assert response.status_code == 201, response.json()
        assert response.json()["result"]["reply_to"] == resume["message_id"]
        assert await user.read_line() == "hello again"

        # The channel shows its telnet component, and status_url received it.
        found = (await gateway.request("GET", f"/channels/{cid}")).json()
        assert_envelope(found, 200, "channel found")
        assert found["result"]["status"]["status"] == "ok"
        assert found["result"]["status"]["components"]["telnet"]["status"] == "ok"
        with trio.fail_after(20):
            statuses = await hook.wait_for_requests(1, path="/status", delivered_only=True)
        assert statuses[0].json()["channel_id"] == cid
        assert {s.json()["component"] for s in statuses} >= {"telnet"}

        # Closing the connection ends the session.
        address = user.address
        await user.stream.aclose()
        *_, close = await mo_messages(hook, 3)
        assert close["channel_data"] == {"session_event": "close"}
        assert close["from"] == address


async def test_modify_applies_without_restart_and_delete_removes(settings: Settings) -> None:
    telnet_port = free_port()
    async with open_fake_webhook() as hook, running_gateway(settings) as gateway:
        channel = await create_telnet_channel(gateway, hook, telnet_port)
        cid = channel["id"]
        listed = (await gateway.request("GET", "/channels/")).json()
        assert_envelope(listed, 200, "channels listed")
        assert listed["result"] == [cid]

        # A token added by modify is used from the next message on, with no manual restart.
        response = await gateway.request(
            "POST", f"/channels/{cid}", {"mo_url_auth_token": "mo-secret"}
        )
        assert response.status_code == 200, response.json()
        assert_envelope(response.json(), 200, "channel updated")
        user = await connect_telnet(gateway, cid, telnet_port)
        (new,) = await mo_messages(hook, 1)
        assert new["channel_data"] == {"session_event": "new"}
        assert hook.on_path("/mo")[0].headers["authorization"] == "Token mo-secret"
        await user.stream.aclose()

        # Moving the channel to another port takes effect at once, too.
        other_port = free_port()
        response = await gateway.request(
            "POST", f"/channels/{cid}", {"config": {"twisted_endpoint": f"tcp:{other_port}"}}
        )
        assert response.status_code == 200, response.json()
        user = await connect_telnet(gateway, cid, other_port)
        await user.stream.aclose()

        restarted = await gateway.request("POST", f"/channels/{cid}/restart")
        assert_envelope(restarted.json(), 200, "channel restarted")

        deleted = await gateway.request("DELETE", f"/channels/{cid}")
        assert_envelope(deleted.json(), 200, "channel deleted")
        missing = await gateway.request("GET", f"/channels/{cid}")
        assert_envelope(missing.json(), 404, "channel not found")
        with pytest.raises(OSError, match="connect"):
            await trio.open_tcp_stream("127.0.0.1", other_port)


async def test_errors_use_the_envelope(embedded_settings: Settings) -> None:
    async with running_gateway(embedded_settings) as gateway:
        for method, path, body, status in (
            ("GET", "/nowhere", None, 404),
            ("PUT", "/channels/", {}, 405),
            ("GET", "/channels/not-a-channel", None, 404),
            ("POST", "/channels/", {"type": "telnet"}, 400),
            ("POST", "/channels/", {"type": "nope", "config": {}}, 400),
        ):
            response = await gateway.request(method, path, body)
            assert response.status_code == status
            assert response.json()["status"] == status
            assert set(response.json()) == {"status", "code", "description", "result"}
        invalid = await gateway.request("GET", "/health/")
        assert invalid.status_code == 200
        assert (await gateway.request("GET", "/health")).json()["description"] == "health ok"
