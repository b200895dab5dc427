"""A Redis store with `ride_through` (as channel processes open it) waits out Redis refusing
connections, as during a restart; without it, past it, for PING, and for any other failure
(an error answer, no answer at all) calls fail as before. Against a redis-server of the
test's own, killed and started again (it keeps an append-only file, so nothing is lost)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import pytest
import trio

from ipc.errors import StoreUnavailableError
from ipc.names import Namespace
from ipc.settings import RedisSettings
from ipc.state_redis import SOCKET_TIMEOUT, RedisStateStore
from tests.faults.harness import private_redis

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from tests.faults.harness import PrivateRedis

pytestmark = pytest.mark.slow

#: Well past a restart of the private redis-server (tenths of a second here).
RIDE: Final = 10.0
#: How long a call may take to fail when it is not to be retried.
PROMPT: Final = 1.5


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    async with private_redis(tmp_path / "redis") as started:
        yield started


@pytest.fixture
def open_store(
    server: PrivateRedis,
) -> Callable[[float], Awaitable[RedisStateStore]]:
    async def opener(ride_through: float) -> RedisStateStore:
        settings = RedisSettings(host="127.0.0.1", port=server.port)
        return await RedisStateStore.connect(settings, Namespace("ride"), ride_through=ride_through)

    return opener


async def timed_failure(call: Callable[[], Awaitable[Any]]) -> tuple[StoreUnavailableError, float]:
    began = trio.current_time()
    with pytest.raises(StoreUnavailableError) as caught:
        await call()
    return caught.value, trio.current_time() - began


async def test_a_restart_is_waited_out_by_reads_and_writes(
    server: PrivateRedis, open_store: Callable[[float], Awaitable[RedisStateStore]]
) -> None:
    store = await open_store(RIDE)
    await store.kv_put("notes", "before", {"n": 0}, 600.0)
    await server.kill()
    done: list[str] = []

    async def call(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        await fn()
        done.append(name)

    with trio.fail_after(RIDE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "kv_put", lambda: store.kv_put("notes", "during", {"n": 1}))
            nursery.start_soon(call, "put_inbound", lambda: store.put_inbound("c", "m", {}, 600))
            nursery.start_soon(call, "incr_rate", lambda: store.incr_rate("c", "inbound", 1, 60))
            nursery.start_soon(call, "kv_items", lambda: store.kv_items("notes"))
            await trio.sleep(0.5)
            assert done == [], "a call returned while Redis was down"
            await server.start()
    assert sorted(done) == ["incr_rate", "kv_items", "kv_put", "put_inbound"]
    assert await store.kv_items("notes") == {"before": {"n": 0}, "during": {"n": 1}}
    assert await store.get_inbound("c", "m", 600) == {}
    assert await store.get_rates("c", ["inbound"], 1) == {"inbound": 1}
    await store.aclose()


async def test_past_the_ride_through_the_call_fails(
    server: PrivateRedis, open_store: Callable[[float], Awaitable[RedisStateStore]]
) -> None:
    store = await open_store(0.5)
    await server.kill()
    error, took = await timed_failure(lambda: store.kv_put("notes", "k", {}))
    assert error.unreachable
    assert 0.4 <= took < PROMPT + 0.5
    await store.aclose()


@pytest.mark.parametrize("ride_through", [0.0, RIDE])
async def test_ping_and_a_store_without_ride_through_fail_at_once(
    server: PrivateRedis,
    open_store: Callable[[float], Awaitable[RedisStateStore]],
    ride_through: float,
) -> None:
    store = await open_store(ride_through)
    await server.kill()
    calls: list[Callable[[], Awaitable[Any]]] = [store.ping]
    if not ride_through:
        calls.append(lambda: store.kv_put("notes", "k", {}))
    for call in calls:
        error, took = await timed_failure(call)
        assert error.unreachable
        assert took < PROMPT
    await store.aclose()


async def test_an_error_answer_is_not_retried(
    open_store: Callable[[float], Awaitable[RedisStateStore]],
) -> None:
    store = await open_store(RIDE)
    # The record's key holds a string: HSET on it fails with WRONGTYPE.
    await store._execute(("SET", store._key("c", "inbound_messages", "clash"), "not a hash"))
    error, took = await timed_failure(lambda: store.put_inbound("c", "clash", {}, 60))
    assert "WRONGTYPE" in str(error)
    assert not error.unreachable
    assert took < PROMPT
    await store.aclose()


async def test_a_redis_that_does_not_answer_is_not_waited_for_twice(
    server: PrivateRedis, open_store: Callable[[float], Awaitable[RedisStateStore]]
) -> None:
    store = await open_store(RIDE)
    server.pause()
    try:
        error, took = await timed_failure(lambda: store.kv_put("notes", "k", {}))
    finally:
        server.resume()
    assert not error.unreachable
    assert SOCKET_TIMEOUT - 0.5 <= took < SOCKET_TIMEOUT + PROMPT
    await store.aclose()
