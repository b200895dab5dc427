"""A USSD session through the real gateway, with an HTTP client playing Dmark, on both backends.

The test plays the application: it reads each message at the mo_url and replies through
the API while Dmark's request is held open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from tests.e2e.gateway import WAIT, free_port, remember_channel, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Long enough for the app (this test) to answer on a loaded machine; the timeout part waits it out.
REPLY_TIMEOUT = 5.0


def dmark_params(transaction_id: str, text: str, *, first: bool) -> dict[str, str]:
    return {
        "transactionId": transaction_id,
        "msisdn": "+256776123456",
        "ussdServiceCode": "180",
        "transactionTime": "1389971940",
        "ussdRequestString": text,
        "creationTime": "1389971950",
        "response": "false" if first else "true",
    }


class Dmark:
    """Dmark's side: GET requests to the channel's web_path, each answered when the app replies."""

    def __init__(self, client: httpx.AsyncClient, nursery: trio.Nursery) -> None:
        self.client = client
        self.nursery = nursery

    def call(self, params: dict[str, str]) -> trio.MemoryReceiveChannel[httpx.Response]:
        send, receive = trio.open_memory_channel[httpx.Response](1)

        async def run() -> None:
            async with send:
                await send.send(await self.client.get("/ussd", params=params))

        self.nursery.start_soon(run)
        return receive


async def answer(pending: trio.MemoryReceiveChannel[httpx.Response]) -> httpx.Response:
    with trio.fail_after(WAIT):
        return await pending.receive()


async def create_dmark_channel(gateway: Gateway, hook: FakeWebhook, web_port: int) -> str:
    response = await gateway.request(
        "POST",
        "/channels/",
        {
            "type": "dmark",
            "label": "USSD",
            "mo_url": hook.url("/mo"),
            "status_url": hook.url("/status"),
            "config": {
                "web_path": "/ussd",
                "web_port": web_port,
                "web_interface": "127.0.0.1",
                "fix_to_addr": True,
                "reply_timeout": REPLY_TIMEOUT,
                "reply_timeout_text": "Sorry, try again later",
            },
        },
    )
    assert response.status_code == 201, response.json()
    channel_id: str = response.json()["result"]["id"]
    remember_channel(gateway.settings, channel_id)
    return channel_id


async def wait_listening(client: httpx.AsyncClient) -> None:
    """The health path answers once the channel listens (and opens no session)."""

    async def healthy() -> bool:
        try:
            return (await client.get("/health")).status_code == 200
        except httpx.TransportError:
            return False

    with trio.fail_after(WAIT):
        await wait_for(healthy)


async def next_mo(hook: FakeWebhook, count: int) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        requests = await hook.wait_for_requests(count, path="/mo", delivered_only=True)
    body: dict[str, Any] = requests[count - 1].json()
    return body


async def reply(gateway: Gateway, channel_id: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await gateway.request("POST", f"/channels/{channel_id}/messages/", body)
    assert response.status_code == 201, response.json()
    result: dict[str, Any] = response.json()["result"]
    return result


async def events_of(gateway: Gateway, channel_id: str, message_id: str, count: int) -> list[Any]:
    found: list[Any] = []

    async def arrived() -> bool:
        response = await gateway.request("GET", f"/channels/{channel_id}/messages/{message_id}")
        found[:] = response.json()["result"]["events"]
        return len(found) >= count

    with trio.fail_after(WAIT):
        await wait_for(arrived)
    return found


async def test_dmark_ussd_session(settings: Settings) -> None:
    web_port = free_port()
    async with (
        open_fake_webhook() as hook,
        running_gateway(settings) as gateway,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}", timeout=WAIT) as client,
        trio.open_nursery() as nursery,
    ):
        cid = await create_dmark_channel(gateway, hook, web_port)
        await wait_listening(client)
        dmark = Dmark(client, nursery)

        # A request without the Dmark fields: 400 with the list, and `request` goes down.
        bad = await client.get("/ussd", params={"transactionId": "1", "msisdn": "2"})
        assert bad.status_code == 400
        assert "ussdServiceCode" in bad.json()["missing_parameter"]

        # The user dials *180#: a new session reaches the mo_url, content null.
        pending = dmark.call(dmark_params("tx-1", "*180#", first=True))
        new = await next_mo(hook, 1)
        assert new["channel_data"] == {"session_event": "new"}
        assert new["content"] is None
        assert (new["from"], new["to"]) == ("+256776123456", "*180#")
        sent = await reply(gateway, cid, {"reply_to": new["message_id"], "content": "1. Balance"})
        response = await answer(pending)
        assert response.status_code == 200
        assert response.json() == {"responseString": "1. Balance", "action": "request"}
        (submitted,) = await events_of(gateway, cid, sent["message_id"], 1)
        assert submitted["event_type"] == "submitted"

        # The user answers "1"; the app ends the session.
        pending = dmark.call(dmark_params("tx-1", "1", first=False))
        resume = await next_mo(hook, 2)
        assert resume["channel_data"] == {"session_event": "resume"}
        assert resume["content"] == "1"
        await reply(
            gateway,
            cid,
            {
                "reply_to": resume["message_id"],
                "content": "Your balance is 0",
                "channel_data": {"session_event": "close"},
            },
        )
        assert (await answer(pending)).json() == {
            "responseString": "Your balance is 0",
            "action": "end",
        }

        # A new session the app never answers: the apology, a close, and the late reply rejected.
        pending = dmark.call(dmark_params("tx-2", "*180#", first=True))
        unanswered = await next_mo(hook, 3)
        assert unanswered["channel_data"] == {"session_event": "new"}
        timed_out = await answer(pending)
        assert timed_out.json() == {"responseString": "Sorry, try again later", "action": "end"}
        close = await next_mo(hook, 4)
        assert close["channel_data"] == {"session_event": "close"}
        assert close["from"] == "+256776123456"
        late = await reply(gateway, cid, {"reply_to": unanswered["message_id"], "content": "x"})
        (rejected,) = await events_of(gateway, cid, late["message_id"], 1)
        assert rejected["event_type"] == "rejected"
        assert rejected["event_details"] == {"reason": "timeout"}

        # The channel reports the timeout as its response component.
        found = (await gateway.request("GET", f"/channels/{cid}")).json()["result"]
        response_status = found["status"]["components"]["response"]
        assert (response_status["status"], response_status["type"]) == ("down", "timeout")
        assert found["status"]["components"]["dmark"]["type"] == "listening"
        # Statuses are stored and POSTed to status_url as they change.
        assert found["status"]["components"]["request"]["type"] == "request_decoded"

        async def posted_to_status_url() -> bool:
            posted = {(r.json()["component"], r.json()["type"]) for r in hook.on_path("/status")}
            return {("request", "invalid_inbound_fields"), ("response", "timeout")} <= posted

        with trio.fail_after(WAIT):
            await wait_for(posted_to_status_url)
        nursery.cancel_scope.cancel()
