"""Idempotent sends through the real gateway with two API workers (`--api-workers 2`), on both
backends: many concurrent POSTs with one key, spread over both workers by the kernel, send one
message, which a connected telnet user receives exactly once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from tests.e2e.gateway import WAIT, free_port, remember_channel, running_gateway, wait_for
from tests.e2e.test_getting_started import connect_telnet
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from ipc.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JsonObject = dict[str, Any]

CONCURRENT = 30
ROUNDS = 3


async def post_concurrently(
    client: httpx.AsyncClient, channel_id: str, key: str, to: str
) -> list[httpx.Response]:
    responses: list[httpx.Response] = []

    async def one() -> None:
        responses.append(
            await client.post(
                f"/channels/{channel_id}/messages/",
                json={"to": to, "content": f"for {key}"},
                headers={"Idempotency-Key": key},
            )
        )

    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENT):
            nursery.start_soon(one)
    return responses


async def test_idempotency_key_sends_once_with_two_api_workers(settings: Settings) -> None:
    port = free_port()
    # A fresh connection per request (no keep-alive), so the kernel spreads them over both
    # workers listening on the port.
    limits = httpx.Limits(max_keepalive_connections=0, max_connections=CONCURRENT)
    async with (
        open_fake_webhook() as hook,
        running_gateway(settings, extra_args=["--api-workers", "2"]) as gateway,
        httpx.AsyncClient(base_url=gateway.base_url, timeout=30, limits=limits) as client,
    ):
        created = await client.post(
            "/channels/",
            json={
                "type": "telnet",
                "mo_url": hook.url("/mo"),
                "config": {"twisted_endpoint": f"tcp:{port}"},
            },
        )
        assert created.status_code == 201, created.text
        channel_id = created.json()["result"]["id"]
        remember_channel(settings, channel_id)
        user = await connect_telnet(gateway, channel_id, port)

        for round_ in range(ROUNDS):
            key = f"e2e-key-{round_}"
            responses = await post_concurrently(client, channel_id, key, user.address)
            assert [r.status_code for r in responses] == [201] * CONCURRENT, [
                r.text for r in responses if r.status_code != 201
            ]
            ids = {r.json()["result"]["message_id"] for r in responses}
            assert len(ids) == 1, ids
            fresh = [r for r in responses if r.headers.get("Idempotent-Replayed") != "true"]
            assert len(fresh) == 1
        # Queue order: once the last message arrives, everything sent before it has.
        last = await client.post(
            f"/channels/{channel_id}/messages/", json={"to": user.address, "content": "last"}
        )
        assert last.status_code == 201
        lines: list[str] = []
        while not lines or lines[-1] != "last":
            lines.append(await user.read_line())
        assert lines[:-1] == [f"for e2e-key-{n}" for n in range(ROUNDS)]
        await user.stream.aclose()
        # The one send's attempt is in the message's timeline (telnet gives no provider id).
        message_id = last.json()["result"]["message_id"]

        async def attempted() -> bool:
            status = await client.get(f"/channels/{channel_id}/messages/{message_id}")
            timeline = status.json()["result"]["timeline"]
            attempts[:] = [e["details"] for e in timeline if e["stage"] == "send_attempt"]
            return bool(attempts)

        attempts: list[JsonObject] = []
        with trio.fail_after(WAIT):
            await wait_for(attempted)
        [details] = attempts
        assert (details["attempt"], details["result"]) == (1, "submitted")
        assert details["provider_message_ids"] == []
