"""The StateStore's keyed records (kv_*), run against both backends."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import pytest
import trio

from ipc.names import Namespace
from ipc.state import KvEntry, open_state
from ipc.state_redis import RedisStateStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from ipc.settings import Settings
    from ipc.state import StateStore

#: Short enough to wait for, long enough that a put and a read land well inside it.
TTL = 0.3


@pytest.fixture
async def store(settings: Settings, namespace: Namespace) -> AsyncIterator[StateStore]:
    async with AsyncExitStack() as stack:
        opened = await stack.enter_async_context(open_state(settings, namespace))
        try:
            yield opened
        finally:
            if settings.redis is not None:
                cleaner = await RedisStateStore.connect(settings.redis, namespace)
                try:
                    await cleaner.purge_namespace()
                finally:
                    await cleaner.aclose()


async def wait_for(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll until predicate() holds (expiry is announced by no event); the caller bounds it."""
    while not await predicate():  # noqa: ASYNC110
        await trio.sleep(0.05)


async def test_kv_put_get_replace(store: StateStore) -> None:
    assert await store.kv_get("c1:transport", "a") is None
    await store.kv_put("c1:transport", "a", {"n": 1})
    assert await store.kv_get("c1:transport", "a") == {"n": 1}
    await store.kv_put("c1:transport", "a", {"n": 2, "nested": {"x": [1, "y"]}})
    assert await store.kv_get("c1:transport", "a") == {"n": 2, "nested": {"x": [1, "y"]}}


async def test_kv_scopes_are_separate(store: StateStore) -> None:
    await store.kv_put("c1:transport", "k", {"scope": 1})
    await store.kv_put("c1:transport:sub", "k", {"scope": 2})
    await store.kv_put("c1", "transport:k", {"scope": 3})
    assert await store.kv_get("c1:transport", "k") == {"scope": 1}
    assert await store.kv_get("c1:transport:sub", "k") == {"scope": 2}
    assert await store.kv_items("c1") == {"transport:k": {"scope": 3}}


@pytest.mark.slow
async def test_kv_items_sorted_and_live_only(store: StateStore) -> None:
    await store.kv_put("s:x", "b", {"v": "b"})
    await store.kv_put("s:x", "a", {"v": "a"})
    await store.kv_put("s:x", "short", {"v": "gone"}, ttl=TTL)
    assert list(await store.kv_items("s:x")) == ["a", "b", "short"]

    async def expired() -> bool:
        return "short" not in await store.kv_items("s:x")

    with trio.fail_after(TTL + 5):
        await wait_for(expired)
    assert await store.kv_items("s:x") == {"a": {"v": "a"}, "b": {"v": "b"}}
    assert await store.kv_get("s:x", "short") is None
    assert await store.kv_items("empty") == {}


@pytest.mark.slow
async def test_kv_ttl_none_keeps_value_and_put_resets_ttl(store: StateStore) -> None:
    await store.kv_put("s", "k", {"v": 1}, ttl=TTL)
    await store.kv_put("s", "k", {"v": 2})
    await store.kv_put("s", "other", {"v": 3}, ttl=TTL)

    async def other_expired() -> bool:
        return await store.kv_get("s", "other") is None

    with trio.fail_after(TTL + 5):
        await wait_for(other_expired)
    assert await store.kv_get("s", "k") == {"v": 2}


async def test_kv_put_many_stores_each_entry_as_kv_put(store: StateStore) -> None:
    await store.kv_put("s", "replaced", {"old": True})
    await store.kv_put_many(
        [
            KvEntry("s", "replaced", {"new": True}, 60.0),
            KvEntry("s", "forever", {"n": 1}),
            KvEntry("other", "short", {"n": 2}, TTL),
        ]
    )
    await store.kv_put_many([])
    assert await store.kv_items("s") == {"forever": {"n": 1}, "replaced": {"new": True}}
    assert await store.kv_get("other", "short") == {"n": 2}

    async def short_expired() -> bool:
        return await store.kv_get("other", "short") is None

    with trio.fail_after(TTL + 5):
        await wait_for(short_expired)
    assert await store.kv_get("s", "forever") == {"n": 1}


@pytest.mark.slow
async def test_kv_expired_entry_is_replaced_by_a_new_put(store: StateStore) -> None:
    await store.kv_put("s", "k", {"v": 1}, ttl=TTL)

    async def expired() -> bool:
        return await store.kv_get("s", "k") is None

    with trio.fail_after(TTL + 5):
        await wait_for(expired)
    await store.kv_put("s", "k", {"v": 2}, ttl=60)
    assert await store.kv_get("s", "k") == {"v": 2}


async def test_kv_delete(store: StateStore) -> None:
    await store.kv_put("s", "k", {"v": 1})
    assert await store.kv_delete("s", "k") is True
    assert await store.kv_get("s", "k") is None
    assert await store.kv_delete("s", "k") is False
    assert await store.kv_delete("s", "never") is False


@pytest.mark.slow
async def test_kv_delete_of_expired_entry_is_false(store: StateStore) -> None:
    await store.kv_put("s", "k", {"v": 1}, ttl=TTL)

    async def expired() -> bool:
        return await store.kv_get("s", "k") is None

    with trio.fail_after(TTL + 5):
        await wait_for(expired)
    assert await store.kv_delete("s", "k") is False


async def test_kv_clear(store: StateStore) -> None:
    await store.kv_put("s", "a", {})
    await store.kv_put("s", "b", {}, ttl=60)
    await store.kv_put("t", "a", {"kept": True})
    await store.kv_clear("s")
    assert await store.kv_items("s") == {}
    assert await store.kv_get("t", "a") == {"kept": True}


async def test_delete_channel_removes_its_scopes_only(store: StateStore) -> None:
    await store.save_channel("c1", {"type": "smpp"})
    await store.kv_put("c1:transport", "a", {"v": 1})
    await store.kv_put("c1:transport:ids", "b", {"v": 2}, ttl=60)
    await store.kv_put("c10:transport", "a", {"v": 3})
    await store.kv_put("router:x", "a", {"v": 5})

    assert await store.delete_channel("c1") is True

    assert await store.kv_items("c1:transport") == {}
    assert await store.kv_items("c1:transport:ids") == {}
    assert await store.kv_get("c10:transport", "a") == {"v": 3}
    assert await store.kv_get("router:x", "a") == {"v": 5}


async def test_kv_namespaces_are_isolated(settings: Settings, store: StateStore) -> None:
    other_ns = Namespace(prefix=f"{settings.namespace}-other")
    await store.kv_put("s", "k", {"mine": True})
    async with open_state(settings, other_ns) as other:
        try:
            assert await other.kv_get("s", "k") is None
            assert await other.kv_items("s") == {}
        finally:
            if isinstance(other, RedisStateStore):
                await other.purge_namespace()


async def test_kv_many_entries_round_trip(store: StateStore) -> None:
    for n in range(250):
        await store.kv_put("bulk", f"k{n:04d}", {"n": n}, ttl=60)
    items = await store.kv_items("bulk")
    assert len(items) == 250
    assert items["k0249"] == {"n": 249}
    assert list(items) == sorted(items)
