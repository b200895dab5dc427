"""An smpp channel through the real gateway against the fake SMSC, on both backends.

Send through the API -> submit_sm at the SMSC -> submitted and delivery_succeeded at the
event_url; an MO deliver_sm -> mo_url; kill -9 of the channel process with a message in
the window -> nothing lost, and only what the SMSC did not acknowledge is sent again.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.e2e.gateway import WAIT, channel_pids, remember_channel, running_gateway, wait_for
from tests.fakes.fake_smsc import SubmitAnswer, open_fake_smsc, smpp_config
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.fake_smsc import FakeSmsc
    from tests.fakes.webhook import FakeWebhook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def create_smpp_channel(
    gateway: Gateway, smsc: FakeSmsc, hook: FakeWebhook, **config: Any
) -> str:
    response = await gateway.request(
        "POST",
        "/channels/",
        {
            "type": "smpp",
            "label": "An SMPP Transport",
            "mo_url": hook.url("/mo"),
            "config": smpp_config(smsc, **config),
        },
    )
    body = response.json()
    assert response.status_code == 201, body
    channel_id: str = body["result"]["id"]
    remember_channel(gateway.settings, channel_id)
    return channel_id


async def wait_bound(gateway: Gateway, channel_id: str, binds: int, smsc: FakeSmsc) -> None:
    """Until the SMSC saw `binds` binds and the channel reports itself bound."""

    async def bound() -> bool:
        if len(smsc.pdus("bind_transceiver")) < binds:
            return False
        body = (await gateway.request("GET", f"/channels/{channel_id}")).json()
        component = body["result"]["status"]["components"].get("smpp")
        return bool(component) and component["type"] == "bound"

    with trio.fail_after(WAIT):
        await wait_for(bound)


async def send(gateway: Gateway, channel_id: str, hook: FakeWebhook, content: str) -> str:
    response = await gateway.request(
        "POST",
        f"/channels/{channel_id}/messages/",
        {"to": "27820000001", "from": "12345", "content": content, "event_url": hook.url("/event")},
    )
    assert response.status_code == 201, response.json()
    message_id: str = response.json()["result"]["message_id"]
    return message_id


def events_of(hook: FakeWebhook, message_id: str) -> list[str]:
    return [
        r.json()["event_type"]
        for r in hook.on_path("/event")
        if r.json()["message_id"] == message_id
    ]


async def test_smpp_channel_send_receipt_and_mo(settings: Settings) -> None:
    async with (
        open_fake_webhook() as hook,
        open_fake_smsc(auto_receipt="DELIVRD") as smsc,
        running_gateway(settings) as gateway,
    ):
        cid = await create_smpp_channel(gateway, smsc, hook)
        await wait_bound(gateway, cid, 1, smsc)

        mid = await send(gateway, cid, hook, "hello over smpp")

        async def reported() -> bool:
            return sorted(events_of(hook, mid)) == ["delivery_succeeded", "submitted"]

        with trio.fail_after(WAIT):
            await wait_for(reported)
        [submit] = smsc.submits
        assert submit.params["short_message"] == b"hello over smpp"
        assert submit.params["destination_addr"] == "27820000001"
        stored = (await gateway.request("GET", f"/channels/{cid}/messages/{mid}")).json()
        assert stored["result"]["last_event_type"] == "delivery_succeeded"

        response = await smsc.send_deliver_sm(short_message=b"hi gateway")
        assert response.ok
        with trio.fail_after(WAIT):
            [mo] = await hook.wait_for_requests(1, path="/mo", delivered_only=True)
        body = mo.json()
        assert (body["from"], body["to"], body["content"]) == ("27820000000", "12345", "hi gateway")
        assert body["channel_id"] == cid
        assert body["channel_data"] == {}


async def test_unknown_smpp_config_key_is_a_400(embedded_settings: Settings) -> None:
    async with open_fake_smsc() as smsc, running_gateway(embedded_settings) as gateway:
        response = await gateway.request(
            "POST",
            "/channels/",
            {"type": "smpp", "config": {**smpp_config(smsc), "sytem_id": "typo"}},
        )
    assert response.status_code == 400
    assert "sytem_id" in response.text


async def test_kill_9_with_messages_in_the_window_loses_nothing(settings: Settings) -> None:
    contents = [f"msg {n}" for n in range(8)]
    unanswered = {2, 4}
    async with (
        open_fake_webhook() as hook,
        open_fake_smsc() as smsc,
        running_gateway(settings) as gateway,
    ):
        # A window of 4: messages 2 and 4 stay in it unanswered while the others (later
        # ones included) are accepted around them.
        smsc.script_submits(
            *[SubmitAnswer(respond=n not in unanswered) for n in range(len(contents))]
        )
        cid = await create_smpp_channel(gateway, smsc, hook, window=4)
        await wait_bound(gateway, cid, 1, smsc)
        mids = [await send(gateway, cid, hook, content) for content in contents]

        async def answered_ones_reported() -> bool:
            return all(
                events_of(hook, mid) == ["submitted"]
                for n, mid in enumerate(mids)
                if n not in unanswered
            )

        with trio.fail_after(WAIT):
            await smsc.wait_for("submit_sm", len(contents))
            await wait_for(answered_ones_reported)
        assert [s.params["short_message"] for s in smsc.submits] == [c.encode() for c in contents]
        (pid,) = channel_pids(cid)
        os.kill(pid, signal.SIGKILL)

        async def all_submitted() -> bool:
            # At least once: an ack published just before the kill may be published again.
            return all(set(events_of(hook, mid)) == {"submitted"} for mid in mids)

        with trio.fail_after(60):
            await wait_for(all_submitted)
        await wait_bound(gateway, cid, 2, smsc)
    sent = [submit.params["short_message"] for submit in smsc.submits]
    for index, content in enumerate(contents):
        # Acknowledged before the kill: never again. Unanswered: sent again after it.
        expected = 2 if index in unanswered else 1
        assert sent.count(content.encode()) == expected, (content, sent)
    # The resends go out in queue order.
    assert sent[len(contents) :] == [b"msg 2", b"msg 4"]
