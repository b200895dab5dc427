"""Queue control, idempotent sends and API authentication through the real gateway (issue 7),
on both backends: a junebug-supervisor with `api_tokens` in its config file, a telnet channel
whose sends can be paused and cancelled, and an smpp channel whose SMSC never answers (its
queue only grows) for the 429.

The channel process's side (pause, cancel, expiry applied to the queue) is checked once the
channel writes its queue snapshot; the API's side is checked in any case.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from tests.e2e.gateway import WAIT, free_port, remember_channel, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from pathlib import Path

    from ipc.settings import Settings
    from tests.fakes.webhook import FakeWebhook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JsonObject = dict[str, Any]

#: The start of the telnet channel's reason for rejecting a message to a user not connected.
NOBODY = "no telnet client at"

TOKEN = "e2e-bearer-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Seconds the channel process has to write its first queue snapshot (every ~1 s).
SNAPSHOT_WAIT = 5


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "junebug.yaml"
    path.write_text(f"api_tokens:\n  - {TOKEN}\n")
    return path


async def create(client: httpx.AsyncClient, settings: Settings, body: JsonObject) -> str:
    response = await client.post("/channels/", json=body)
    assert response.status_code == 201, response.text
    channel_id: str = response.json()["result"]["id"]
    remember_channel(settings, channel_id)
    return channel_id


async def send(
    client: httpx.AsyncClient,
    channel_id: str,
    *,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    body.setdefault("to", "127.0.0.1:1")  # no telnet user there: sent, it is rejected
    body.setdefault("content", "hello")
    return await client.post(f"/channels/{channel_id}/messages/", json=body, headers=headers)


async def queues(client: httpx.AsyncClient, channel_id: str) -> JsonObject:
    response = await client.get(f"/channels/{channel_id}")
    assert response.status_code == 200
    snapshot: JsonObject = response.json()["result"]["status"]["queues"]
    return snapshot


async def status_of(client: httpx.AsyncClient, channel_id: str, message_id: str) -> JsonObject:
    response = await client.get(f"/channels/{channel_id}/messages/{message_id}")
    assert response.status_code == 200
    result: JsonObject = response.json()["result"]
    return result


async def rejected_reason(client: httpx.AsyncClient, channel_id: str, message_id: str) -> str:
    """The reason of the message's rejected event, once it has one."""
    reasons: list[str] = []

    async def rejected() -> bool:
        events = (await status_of(client, channel_id, message_id))["events"]
        reasons[:] = [
            e["event_details"].get("reason") for e in events if e["event_type"] == "rejected"
        ]
        return bool(reasons)

    with trio.fail_after(WAIT):
        await wait_for(rejected)
    return reasons[0]


async def channel_side_present(client: httpx.AsyncClient, channel_id: str) -> bool:
    """Whether the channel process writes its queue snapshot (the issue 7 outbound actor)."""

    async def written() -> bool:
        return (await queues(client, channel_id))["updated"] is not None

    with trio.move_on_after(SNAPSHOT_WAIT):
        await wait_for(written)
        return True
    return False


async def check_auth(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for path in ("/channels/", "/metrics", "/openapi.json"):
                response = await anonymous.get(path, headers=headers)
                assert response.status_code == 401, path
                assert response.headers["WWW-Authenticate"] == "Bearer"
                body = response.json()
                assert body["result"]["errors"][0]["type"] == "Unauthorized"
                assert TOKEN not in response.text
        assert (await anonymous.get("/health")).status_code == 200


async def check_idempotency(client: httpx.AsyncClient, channel_id: str) -> None:
    key = {"Idempotency-Key": "e2e-order-1"}
    first = await send(client, channel_id, headers=key)
    assert first.status_code == 201, first.text
    again = await send(client, channel_id, headers=key)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["result"] == first.json()["result"]
    timeline = (await status_of(client, channel_id, first.json()["result"]["message_id"]))[
        "timeline"
    ]
    stages = [entry["stage"] for entry in timeline]
    # The channel may start sending before the API has recorded "queued" (after the broker
    # confirmed it): send attempts can come between the two.
    assert stages[0] == "accepted"
    # Sent once: the one message's life has one acceptance.
    assert (stages.count("accepted"), stages.count("queued")) == (1, 1)


async def stuck_channel(client: httpx.AsyncClient, settings: Settings, hook: FakeWebhook) -> str:
    """An smpp channel whose SMSC port is closed: it never sends, so its queue only grows."""
    config = {
        "twisted_endpoint": f"tcp:127.0.0.1:{free_port()}",
        "system_id": "esme",
        "password": "pw",
        "initial_reconnect_delay": 0.5,
        # Few sends in flight (held by the channel, not queued): the queue fills sooner.
        "window": 1,
    }
    return await create(
        client,
        settings,
        {"type": "smpp", "mo_url": hook.url("/mo"), "config": config, "queue_limit": 2},
    )


async def check_backpressure(client: httpx.AsyncClient, channel_id: str) -> None:
    # The channel may hold a few messages (its send window and prefetch): they are not queued.
    response = await send(client, channel_id, to="+27820000001")
    for _ in range(30):
        if response.status_code != 201:
            break
        response = await send(client, channel_id, to="+27820000001")
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    body = response.json()
    assert body["description"] == "queue full"
    assert "queue_limit is 2" in body["result"]["errors"][0]["message"]


async def check_pause_and_cancel(
    client: httpx.AsyncClient, settings: Settings, hook: FakeWebhook
) -> None:
    channel_id = await create(
        client,
        settings,
        {
            "type": "telnet",
            "mo_url": hook.url("/mo"),
            "config": {"twisted_endpoint": f"tcp:{free_port()}"},
        },
    )
    paused = await client.post(f"/channels/{channel_id}/pause")
    assert (paused.status_code, paused.json()["description"]) == (200, "channel paused")
    assert paused.json()["result"]["paused"] is True
    enforced = await channel_side_present(client, channel_id)
    if enforced:

        async def pause_seen() -> bool:
            return (await queues(client, channel_id))["paused"] is True

        with trio.fail_after(WAIT):
            await wait_for(pause_seen)

    ids = []
    for _ in range(3):
        response = await send(client, channel_id)
        assert response.status_code == 201, response.text
        ids.append(response.json()["result"]["message_id"])
    one, two, three = ids
    if enforced:

        async def all_queued() -> bool:
            return bool((await queues(client, channel_id))["outbound"] == len(ids))

        with trio.move_on_after(WAIT):
            await wait_for(all_queued)
        snapshot = await queues(client, channel_id)
        sent = [mid for mid in ids if (await status_of(client, channel_id, mid))["events"]]
        assert snapshot["outbound"] == len(ids), (
            f"sent while paused: {sent}; queue snapshot {snapshot}"
        )

    cancelled = await client.delete(f"/channels/{channel_id}/messages/{three}")
    if enforced:
        assert (cancelled.status_code, cancelled.json()["description"]) == (
            200,
            "message cancelled",
        )
    else:
        # Not held back: it may have been sent (and rejected) already.
        assert cancelled.status_code in (200, 400), cancelled.text
    unknown = await client.delete(f"/channels/{channel_id}/messages/{'0' * 32}")
    assert (unknown.status_code, unknown.json()["description"]) == (400, "message not found")

    everything = await client.post(f"/channels/{channel_id}/messages/cancel", json={})
    assert (everything.status_code, everything.json()["description"]) == (
        200,
        "messages cancelled",
    )
    # Only what was queued then: a message queued after the cancel goes out, unless expired.
    later = (await send(client, channel_id)).json()["result"]["message_id"]
    expiring = await send(client, channel_id, expires_at="2001-01-01 00:00:00")
    expired = expiring.json()["result"]["message_id"]
    resumed = await client.post(f"/channels/{channel_id}/resume")
    assert (resumed.status_code, resumed.json()["result"]["paused"]) == (200, False)

    if enforced:
        for message_id in (one, two):
            assert await rejected_reason(client, channel_id, message_id) == "cancelled"
        assert await rejected_reason(client, channel_id, three) == "cancelled"
        assert await rejected_reason(client, channel_id, expired) == "expired"
    # Sent to an address where no telnet user is: rejected by the channel, not cancelled.
    assert (await rejected_reason(client, channel_id, later)).startswith(NOBODY)

    await check_send_attempt(client, channel_id, later)
    # The channel's lines about it (the outbound actor's and the transport's) carry its id.
    logs = await client.get(f"/channels/{channel_id}/logs", params={"message_id": later})
    assert logs.status_code == 200
    entries = logs.json()["result"]
    assert any(later in entry["message"] and "rejected" in entry["message"] for entry in entries)
    assert all(entry.get("message_id") == later for entry in entries)
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert f'junebug_queue_messages{{channel_id="{channel_id}",queue="outbound"}}' in metrics.text


async def check_send_attempt(client: httpx.AsyncClient, channel_id: str, message_id: str) -> None:
    """The timeline shows the send attempt the telnet channel made and what came of it."""
    attempts: list[JsonObject] = []

    async def recorded() -> bool:
        timeline = (await status_of(client, channel_id, message_id))["timeline"]
        attempts[:] = [entry for entry in timeline if entry["stage"] == "send_attempt"]
        return bool(attempts)

    with trio.fail_after(WAIT):
        await wait_for(recorded)
    [attempt] = attempts
    details = attempt["details"]
    assert (details["attempt"], details["result"], details["retry"]) == (1, "rejected", False)
    assert details["reason"].startswith(NOBODY)
    assert details["latency_seconds"] >= 0
    timeline = (await status_of(client, channel_id, message_id))["timeline"]
    stages = [entry["stage"] for entry in timeline]
    assert "queued" in stages
    assert stages.index("accepted") < stages.index("send_attempt") < stages.index("event")


async def test_queue_control_and_auth_through_the_gateway(
    settings: Settings, tmp_path: Path
) -> None:
    extra = ["-c", str(config_file(tmp_path))]
    async with (
        open_fake_webhook() as hook,
        running_gateway(settings, extra_args=extra) as gateway,
        httpx.AsyncClient(base_url=gateway.base_url, headers=AUTH, timeout=30) as client,
    ):
        await check_auth(gateway.base_url)
        await check_pause_and_cancel(client, settings, hook)
        smpp = await stuck_channel(client, settings, hook)
        await check_idempotency(client, smpp)
        await check_backpressure(client, smpp)
        assert TOKEN not in gateway.output()
