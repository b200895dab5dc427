"""An xmpp channel through the real gateway, on both backends: a real Prosody server, the
channel logged in as one account and a person (a second account) chatting with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.e2e.gateway import WAIT, remember_channel, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook
from tests.xmpp_server import BOT, HUMAN, require_prosody, running_prosody, xmpp_user

if TYPE_CHECKING:
    from pathlib import Path

    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def prosody_dir(tmp_path: Path) -> Path:
    """Where the test's own Prosody lives; errors (with the install command) without Prosody."""
    require_prosody()
    return tmp_path / "prosody"


async def create_xmpp_channel(gateway: Gateway, hook: FakeWebhook, config: dict[str, Any]) -> str:
    response = await gateway.request(
        "POST",
        "/channels/",
        {"type": "xmpp", "label": "Chat", "mo_url": hook.url("/mo"), "config": config},
    )
    body = response.json()
    assert response.status_code == 201, body
    assert body["result"]["type"] == "xmpp"
    channel_id: str = body["result"]["id"]
    remember_channel(gateway.settings, channel_id)
    return channel_id


async def xmpp_status(gateway: Gateway, channel_id: str, wanted: str) -> dict[str, Any]:
    """The channel's `xmpp` status component, once its type is `wanted`."""
    found: list[dict[str, Any]] = []

    async def reached() -> bool:
        body = (await gateway.request("GET", f"/channels/{channel_id}")).json()
        component = body["result"]["status"]["components"].get("xmpp")
        found[:] = [component] if component else []
        return bool(component) and component["type"] == wanted

    with trio.fail_after(WAIT):
        await wait_for(reached)
    return found[0]


async def send(gateway: Gateway, channel_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await gateway.request("POST", f"/channels/{channel_id}/messages/", body)
    assert response.status_code == 201, response.json()
    result: dict[str, Any] = response.json()["result"]
    return result


async def test_xmpp_chat_through_the_gateway(settings: Settings, prosody_dir: Path) -> None:
    async with (
        running_prosody(prosody_dir) as server,
        open_fake_webhook() as hook,
        running_gateway(settings) as gateway,
    ):
        config = server.channel_config(tls="starttls", verify_tls=False)
        cid = await create_xmpp_channel(gateway, hook, config)
        connected = await xmpp_status(gateway, cid, "connected")
        assert connected["status"] == "ok"
        assert connected["details"]["encrypted"] is True

        async with xmpp_user(server) as human:
            # The person writes: mo_url gets it from the person's bare JID.
            await human.send(BOT.jid, "hello gateway")
            with trio.fail_after(20):
                (mo_request,) = await hook.wait_for_requests(1, path="/mo", delivered_only=True)
            mo = mo_request.json()
            assert (mo["from"], mo["to"], mo["content"]) == (HUMAN.jid, BOT.jid, "hello gateway")
            assert mo["channel_id"] == cid
            assert mo["channel_data"] == {}

            # The application writes to the person's JID, with an event_url.
            sent = await send(
                gateway,
                cid,
                {"to": HUMAN.jid, "content": "hello human", "event_url": hook.url("/event")},
            )
            received = await human.receive()
            assert received.body == "hello human"
            assert received.sender.startswith(f"{BOT.jid}/")
            with trio.fail_after(20):
                (event,) = await hook.wait_for_requests(1, path="/event", delivered_only=True)
            assert event.json()["event_type"] == "submitted"
            assert event.json()["message_id"] == sent["message_id"]

            # A reply goes back to whoever wrote.
            reply = await send(gateway, cid, {"reply_to": mo["message_id"], "content": "re"})
            assert reply["to"] == HUMAN.jid
            assert (await human.receive()).body == "re"

        logs = await gateway.request("GET", f"/channels/{cid}/logs")
        assert logs.status_code == 200
        assert "connected to 127.0.0.1" in logs.text
        assert BOT.password not in logs.text


async def test_xmpp_wrong_password_shows_in_the_channel_status(
    embedded_settings: Settings, prosody_dir: Path
) -> None:
    async with (
        running_prosody(prosody_dir) as server,
        open_fake_webhook() as hook,
        running_gateway(embedded_settings) as gateway,
    ):
        cid = await create_xmpp_channel(gateway, hook, server.channel_config(password="nope"))
        failed = await xmpp_status(gateway, cid, "auth_failed")
        assert failed["status"] == "down"
        assert "not-authorized" in failed["message"]
        found = (await gateway.request("GET", f"/channels/{cid}")).json()["result"]
        assert found["status"]["status"] == "down"
