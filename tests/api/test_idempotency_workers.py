"""Idempotent sends across API workers, on both backends: two apps on one store and broker
(as `--api-workers 2` runs them), each with its own store connection and in-worker locks, so
only the store's compare-and-set keeps a key from being sent twice."""

from __future__ import annotations

import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from api.idempotency import PENDING_FIELD, idempotency_scope
from tests.api.harness import open_api

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.settings import Settings
    from tests.api.harness import Api

JsonObject = dict[str, Any]

CONCURRENT = 30


@pytest.fixture
async def workers(settings: Settings) -> AsyncIterator[tuple[Api, Api]]:
    async with AsyncExitStack() as stack:
        dirs = [Path(tempfile.mkdtemp(prefix="jb-idem-", dir="/tmp")) for _ in range(2)]
        # Only the first cleans up: both share the namespace.
        first = await stack.enter_async_context(open_api(settings, dirs[0]))
        second = await stack.enter_async_context(open_api(settings, dirs[1], cleanup=False))
        yield first, second


async def send(api: Api, channel_id: str, key: str) -> tuple[int, JsonObject, bool]:
    response = await api.client.post(
        f"/channels/{channel_id}/messages/",
        json={"to": "+27820000001", "content": "hi"},
        headers={"Idempotency-Key": key},
    )
    payload: JsonObject = await response.get_json()
    return response.status_code, payload, response.headers.get("Idempotent-Replayed") == "true"


async def queued(api: Api, channel_id: str) -> int:
    return await api.broker.queue_length(api.namespace.outbound_queue(channel_id))


@pytest.mark.slow
async def test_idempotency_key_sent_once_across_workers(workers: tuple[Api, Api]) -> None:
    first, second = workers
    channel_id = await first.create_channel(mo_url="http://example.com/mo")
    for round_ in range(3):
        key = f"order-{round_}"
        answers: list[tuple[int, JsonObject, bool]] = []

        async def one(api: Api, key: str, answers: list[tuple[int, JsonObject, bool]]) -> None:
            answers.append(await send(api, channel_id, key))

        async with trio.open_nursery() as nursery:
            for index in range(CONCURRENT):
                nursery.start_soon(one, workers[index % 2], key, answers)
        assert [status for status, _, _ in answers] == [201] * CONCURRENT
        assert len({payload["result"]["message_id"] for _, payload, _ in answers}) == 1
        assert sum(not replayed for _, _, replayed in answers) == 1
        assert await queued(first, channel_id) == round_ + 1
    assert await queued(second, channel_id) == 3


async def test_idempotency_duplicate_waits_for_the_other_workers_send(
    workers: tuple[Api, Api],
) -> None:
    """A key reserved by another worker: the duplicate answers with that send's result once
    it is stored, and queues nothing itself."""
    first, _ = workers
    channel_id = await first.create_channel(mo_url="http://example.com/mo")
    scope = idempotency_scope(channel_id)
    assert await first.store.kv_put_if_absent(scope, "k", {PENDING_FIELD: "elsewhere"}, 60)
    result = {"message_id": "m" * 32, "channel_id": channel_id}
    answers: list[tuple[int, JsonObject, bool]] = []

    async def duplicate() -> None:
        answers.append(await send(first, channel_id, "k"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(duplicate)
        await trio.sleep(0.2)
        assert answers == []
        await first.store.kv_put(scope, "k", result, 60)
    [(status, payload, replayed)] = answers
    assert (status, payload["result"], replayed) == (201, result, True)
    assert await queued(first, channel_id) == 0


async def test_idempotency_reservation_released_when_the_send_fails(
    workers: tuple[Api, Api],
) -> None:
    """A send refused before it is queued (here 429, queue full) frees its key: a retry with
    the same key, on either worker, sends."""
    first, second = workers
    channel_id = await first.create_channel(mo_url="http://example.com/mo", queue_limit=1)
    assert (await send(first, channel_id, "filler"))[0] == 201
    status, _, _ = await send(first, channel_id, "k")
    assert status == 429
    assert await first.store.kv_get(idempotency_scope(channel_id), "k") is None
    async with first.broker.consume(
        first.namespace.outbound_queue(channel_id), prefetch=1
    ) as consumer:
        with trio.fail_after(5):
            await consumer.ack(await consumer.receive())
    status, payload, replayed = await send(second, channel_id, "k")
    assert (status, replayed) == (201, False)
    assert await queued(first, channel_id) == 1
    stored = await first.store.kv_get(idempotency_scope(channel_id), "k")
    assert stored == payload["result"]


@pytest.mark.slow
async def test_one_router_per_channel_across_workers(workers: tuple[Api, Api]) -> None:
    """Router changes share the store's lease: of routers racing for one channel on two
    workers, one is created and the others are told the channel is taken."""
    first, _ = workers
    for _ in range(3):
        channel_id = await first.create_channel()
        answers: list[tuple[int, JsonObject]] = []

        async def create(api: Api, channel_id: str, answers: list[tuple[int, JsonObject]]) -> None:
            response = await api.client.post(
                "/routers/", json={"type": "from_address", "config": {"channel": channel_id}}
            )
            answers.append((response.status_code, await response.get_json()))

        async with trio.open_nursery() as nursery:
            for index in range(6):
                nursery.start_soon(create, workers[index % 2], channel_id, answers)
        created = [payload["result"]["id"] for status, payload in answers if status == 201]
        assert len(created) == 1, answers
        refused = [payload for status, payload in answers if status != 201]
        assert all(
            payload["result"]["errors"][0]["message"]
            == f"Router {created[0]} is already routing channel {channel_id}"
            for payload in refused
        ), refused
