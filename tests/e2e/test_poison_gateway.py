"""A poison message through the real gateway (embedded backend only: each crash costs a
restart; the channel side runs on both in tests/channel_proc/test_poison_messages.py). A custom
channel type (loaded with `--channels`) whose send crashes the channel process for one content:
the supervisor restarts the process, the message is redelivered and crashes it again, until
the outbound actor stops sending it: it gets `rejected` with reason `send_crashed`, and the
messages queued after it still go out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import pytest
import trio
from pydantic import BaseModel

from channel_proc.transports.base import SendReceipt, Transport
from tests.e2e.gateway import WAIT, remember_channel, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from ipc.payloads import VumiMessage
    from ipc.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JsonObject = dict[str, Any]

POISON = "poison"
CHANNEL_TYPE = f"crash_on_poison:{__name__}:CrashOnPoisonTransport"


class QuietConfig(BaseModel):
    pass


class CrashOnPoisonTransport(Transport[QuietConfig]):
    """Sends at once; the content "poison" makes the provider library blow up."""

    kind: ClassVar[str] = "crash_on_poison"
    config_type = QuietConfig

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def send(self, msg: VumiMessage) -> SendReceipt:
        if msg.content == POISON:
            raise RuntimeError("the provider library cannot encode this message")
        return SendReceipt(provider_message_id=f"sent-{msg.message_id}")


async def events_of(client: httpx.AsyncClient, channel_id: str, message_id: str) -> JsonObject:
    response = await client.get(f"/channels/{channel_id}/messages/{message_id}")
    assert response.status_code == 200, response.text
    result: JsonObject = response.json()["result"]
    return result


async def test_poison_message_is_rejected_and_the_channel_goes_on(
    embedded_settings: Settings,
) -> None:
    settings = embedded_settings
    # The poison message crashes the process 1 + 3 times: within a larger restart budget.
    extra = ["--channels", CHANNEL_TYPE, "--restart-intensity", "10"]
    async with (
        open_fake_webhook() as hook,
        running_gateway(settings, extra_args=extra) as gateway,
        httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client,
    ):
        created = await client.post(
            "/channels/", json={"type": "crash_on_poison", "config": {}, "mo_url": hook.url("/mo")}
        )
        assert created.status_code == 201, created.text
        channel_id = created.json()["result"]["id"]
        remember_channel(settings, channel_id)
        ids: dict[str, str] = {}
        for content in ("before", POISON, "after-1", "after-2"):
            sent = await client.post(
                f"/channels/{channel_id}/messages/", json={"to": "+27820000001", "content": content}
            )
            assert sent.status_code == 201, sent.text
            ids[content] = sent.json()["result"]["message_id"]

        async def settled() -> bool:
            for message_id in ids.values():
                if (await events_of(client, channel_id, message_id))["last_event_type"] is None:
                    return False
            return True

        with trio.fail_after(2 * WAIT):
            await wait_for(settled)
        poison = await events_of(client, channel_id, ids[POISON])
        assert [(e["event_type"], e["event_details"]) for e in poison["events"]] == [
            ("rejected", {"reason": "send_crashed"})
        ]
        for content in ("before", "after-1", "after-2"):
            result = await events_of(client, channel_id, ids[content])
            assert result["last_event_type"] == "submitted", result
            attempts = [e for e in result["timeline"] if e["stage"] == "send_attempt"]
            assert attempts, result["timeline"]
            assert attempts[-1]["details"]["result"] == "submitted"
            assert attempts[-1]["details"]["provider_message_ids"] == [f"sent-{ids[content]}"]
        # The channel process is up again and sends.
        later = await client.post(
            f"/channels/{channel_id}/messages/", json={"to": "+27820000001", "content": "later"}
        )
        later_id = later.json()["result"]["message_id"]

        async def later_sent() -> bool:
            status = await events_of(client, channel_id, later_id)
            return bool(status["last_event_type"] == "submitted")

        with trio.fail_after(WAIT):
            await wait_for(later_sent)
        # The poison message is kept where an operator can list (and replay) it.
        dead = await client.get(f"/channels/{channel_id}/dead_letters")
        assert dead.status_code == 200, dead.text
        letters = dead.json()["result"]
        assert [(d["source"], d["body"]["message_id"]) for d in letters] == [
            ("outbound", ids[POISON])
        ]
        assert "send_crashed" in letters[0]["reason"]
        logs = await client.get(f"/channels/{channel_id}/logs", params={"message_id": ids[POISON]})
        entries = logs.json()["result"]
        assert entries
        assert all(entry["message_id"] == ids[POISON] for entry in entries)
        assert any("send_crashed" in entry["message"] for entry in entries)
