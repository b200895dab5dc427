"""The StateStore contract, run against both backends, plus each backend's failure modes."""

from __future__ import annotations

import socket
import sqlite3
import uuid
from contextlib import AsyncExitStack, closing
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from ipc.errors import StoreUnavailableError
from ipc.names import Namespace
from ipc.settings import RedisSettings
from ipc.state import OutboundRecord, RateCount, open_state
from ipc.state_redis import RedisStateStore
from ipc.state_sqlite import SqliteStateStore
from tests.ipc.sqlite_locks import write_lock_held

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from ipc.settings import Settings
    from ipc.state import StateStore

    OpenStore = Callable[[Namespace], Awaitable[StateStore]]

#: Short enough to wait for, long enough that a put and a read land well inside it.
TTL = 0.4
LONG_TTL = 60.0
LABELS = ("inbound", "outbound", "submitted")


async def _purge_redis(redis: RedisSettings, namespaces: list[Namespace]) -> None:
    for namespace in namespaces:
        cleaner = await RedisStateStore.connect(redis, namespace)
        try:
            await cleaner.purge_namespace()
        finally:
            await cleaner.aclose()


@pytest.fixture
async def open_store(settings: Settings) -> AsyncIterator[OpenStore]:
    """Opens stores on the test's backend; closes them and deletes their Redis keys after."""
    namespaces: list[Namespace] = []
    async with AsyncExitStack() as stack:

        async def open_one(namespace: Namespace) -> StateStore:
            namespaces.append(namespace)
            return await stack.enter_async_context(open_state(settings, namespace))

        try:
            yield open_one
        finally:
            if settings.redis is not None:
                await _purge_redis(settings.redis, namespaces)


@pytest.fixture
async def store(open_store: OpenStore, namespace: Namespace) -> StateStore:
    return await open_store(namespace)


async def wait_for(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll until predicate() holds (TTL expiry is announced by no event); caller bounds it."""
    while True:
        if await predicate():
            return
        await trio.sleep(0.05)


async def wait_ttl_passed(store: StateStore) -> None:
    """Wait until everything written with TTL before this call has expired.

    The clock is a rate counter written now with TTL: reading rates does not slide TTLs,
    whereas polling a message record would keep it alive.
    """
    await store.incr_rate("ttl-clock", "tick", 0, TTL)

    async def clock_expired() -> bool:
        return await store.get_rates("ttl-clock", ["tick"], 0) == {"tick": 0}

    with trio.fail_after(TTL + 5):
        await wait_for(clock_expired)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _event(n: int) -> dict[str, object]:
    return {"event_type": "ack", "n": n, "timestamp": "2024-01-01 00:00:00.000000"}


# --- channels -------------------------------------------------------------------------


async def test_channel_save_get_and_replace(store: StateStore) -> None:
    assert await store.get_channel("c1") is None
    await store.save_channel("c1", {"type": "telnet", "config": {"port": 1}, "extra": [1, None]})
    assert await store.get_channel("c1") == {
        "type": "telnet",
        "config": {"port": 1},
        "extra": [1, None],
    }
    await store.save_channel("c1", {"type": "xmpp"})
    assert await store.get_channel("c1") == {"type": "xmpp"}
    assert await store.list_channels() == ["c1"]


async def test_list_channels_sorted(store: StateStore) -> None:
    assert await store.list_channels() == []
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for cid in ids:
        await store.save_channel(cid, {"type": "telnet"})
    assert await store.list_channels() == sorted(ids)


async def _fill_channel(store: StateStore, cid: str) -> None:
    await store.save_channel(cid, {"type": "telnet"})
    await store.set_status(cid, "process", {"status": "ok"})
    await store.put_inbound(cid, "in1", {"content": "hi"}, LONG_TTL)
    await store.put_outbound(cid, "out1", {"content": "yo"}, LONG_TTL)
    await store.add_event(cid, "out1", "ev1", _event(1), LONG_TTL)
    await store.incr_rate(cid, "inbound", 7, LONG_TTL)


async def test_delete_channel_removes_everything_under_it(store: StateStore) -> None:
    await _fill_channel(store, "gone")
    await _fill_channel(store, "kept")

    assert await store.delete_channel("gone") is True

    assert await store.get_channel("gone") is None
    assert await store.list_channels() == ["kept"]
    assert await store.get_statuses("gone") == {}
    assert await store.get_inbound("gone", "in1", LONG_TTL) is None
    assert await store.get_outbound("gone", "out1", LONG_TTL) is None
    assert await store.get_rates("gone", ["inbound"], 7) == {"inbound": 0}

    assert await store.get_channel("kept") == {"type": "telnet"}
    assert await store.get_statuses("kept") == {"process": {"status": "ok"}}
    assert await store.get_inbound("kept", "in1", LONG_TTL) == {"content": "hi"}
    assert await store.get_outbound("kept", "out1", LONG_TTL) == OutboundRecord(
        message={"content": "yo"}, events=[_event(1)]
    )
    assert await store.get_rates("kept", ["inbound"], 7) == {"inbound": 1}


async def test_delete_unknown_channel_returns_false(store: StateStore) -> None:
    assert await store.delete_channel("nope") is False
    await store.save_channel("c1", {})
    assert await store.delete_channel("c1") is True
    assert await store.delete_channel("c1") is False


# --- status ---------------------------------------------------------------------------


async def test_status_overwritten_per_component(store: StateStore) -> None:
    assert await store.get_statuses("c1") == {}
    await store.set_status("c1", "process", {"status": "ok", "n": 1})
    await store.set_status("c1", "smpp", {"status": "down"})
    await store.set_status("c1", "process", {"status": "degraded", "n": 2})
    await store.set_status("c2", "process", {"status": "ok"})
    assert await store.get_statuses("c1") == {
        "process": {"status": "degraded", "n": 2},
        "smpp": {"status": "down"},
    }


# --- inbound --------------------------------------------------------------------------


async def test_inbound_round_trip(store: StateStore) -> None:
    message = {"message_id": "m1", "content": "héllo", "helper_metadata": {}}
    await store.put_inbound("c1", "m1", message, LONG_TTL)
    assert await store.get_inbound("c1", "m1", LONG_TTL) == message
    assert await store.get_inbound("c1", "m2", LONG_TTL) is None
    assert await store.get_inbound("c2", "m1", LONG_TTL) is None


@pytest.mark.slow
async def test_inbound_expires(store: StateStore) -> None:
    start = trio.current_time()
    await store.put_inbound("c1", "m1", {"n": 1}, TTL)
    assert await store.get_inbound("c1", "m1", TTL) == {"n": 1}
    await wait_ttl_passed(store)
    assert await store.get_inbound("c1", "m1", TTL) is None
    assert trio.current_time() - start >= TTL


@pytest.mark.slow
async def test_inbound_read_refreshes_ttl(store: StateStore) -> None:
    await store.put_inbound("c1", "read", {"n": 1}, TTL)
    await store.put_inbound("c1", "unread", {"n": 2}, TTL)
    assert await store.get_inbound("c1", "read", LONG_TTL) == {"n": 1}
    await wait_ttl_passed(store)
    assert await store.get_inbound("c1", "unread", TTL) is None
    assert await store.get_inbound("c1", "read", TTL) == {"n": 1}


# --- outbound -------------------------------------------------------------------------


async def test_outbound_round_trip_and_replace_keeps_events(store: StateStore) -> None:
    assert await store.get_outbound("c1", "m1", LONG_TTL) is None
    await store.put_outbound("c1", "m1", {"content": "a", "event_url": None}, LONG_TTL)
    assert await store.get_outbound("c1", "m1", LONG_TTL) == OutboundRecord(
        message={"content": "a", "event_url": None}, events=[]
    )
    await store.add_event("c1", "m1", "e1", _event(1), LONG_TTL)
    await store.put_outbound("c1", "m1", {"content": "b"}, LONG_TTL)
    assert await store.get_outbound("c1", "m1", LONG_TTL) == OutboundRecord(
        message={"content": "b"}, events=[_event(1)]
    )


async def test_events_come_back_in_insertion_order(store: StateStore) -> None:
    await store.put_outbound("c1", "m1", {"content": "a"}, LONG_TTL)
    # Ids in descending order, so neither id order nor hash order could pass by chance.
    ids = [f"{9 - n}-{uuid.uuid4().hex}" for n in range(8)]
    for n, event_id in enumerate(ids):
        await store.add_event("c1", "m1", event_id, _event(n), LONG_TTL)
    record = await store.get_outbound("c1", "m1", LONG_TTL)
    assert record is not None
    assert record.events == [_event(n) for n in range(8)]


async def test_redelivered_event_replaces_in_place(store: StateStore) -> None:
    await store.add_event("c1", "m1", "e1", _event(1), LONG_TTL)
    await store.add_event("c1", "m1", "e2", _event(2), LONG_TTL)
    await store.add_event("c1", "m1", "e1", {**_event(1), "again": True}, LONG_TTL)
    record = await store.get_outbound("c1", "m1", LONG_TTL)
    assert record is not None
    assert record.events == [{**_event(1), "again": True}, _event(2)]


async def test_add_event_creates_record_without_message(store: StateStore) -> None:
    await store.add_event("c1", "m1", "e1", _event(1), LONG_TTL)
    assert await store.get_outbound("c1", "m1", LONG_TTL) == OutboundRecord(
        message=None, events=[_event(1)]
    )
    assert await store.get_outbound("c2", "m1", LONG_TTL) is None


async def test_add_event_returns_the_send_record(store: StateStore) -> None:
    assert await store.add_event("c1", "m1", "e1", _event(1), LONG_TTL) is None
    await store.put_outbound("c1", "m2", {"event_url": "http://e/"}, LONG_TTL)
    assert await store.add_event("c1", "m2", "e1", _event(1), LONG_TTL) == {
        "event_url": "http://e/"
    }
    # Another channel's record is not this one's.
    assert await store.add_event("c2", "m2", "e1", _event(1), LONG_TTL) is None


@pytest.mark.slow
async def test_add_event_after_the_record_expired_returns_none(store: StateStore) -> None:
    await store.put_outbound("c1", "m1", {"content": "a"}, TTL)
    await wait_ttl_passed(store)
    assert await store.add_event("c1", "m1", "e1", _event(1), LONG_TTL) is None


@pytest.mark.slow
async def test_outbound_expires_with_its_events(store: StateStore) -> None:
    await store.put_outbound("c1", "m1", {"content": "a"}, TTL)
    await store.add_event("c1", "m1", "e1", _event(1), TTL)
    await wait_ttl_passed(store)
    assert await store.get_outbound("c1", "m1", TTL) is None
    # A late event starts a new record rather than reviving the expired one.
    await store.add_event("c1", "m1", "e2", _event(2), LONG_TTL)
    assert await store.get_outbound("c1", "m1", LONG_TTL) == OutboundRecord(
        message=None, events=[_event(2)]
    )


@pytest.mark.slow
async def test_outbound_read_and_event_refresh_ttl(store: StateStore) -> None:
    for mid in ("read", "evented", "untouched"):
        await store.put_outbound("c1", mid, {"mid": mid}, TTL)
    assert await store.get_outbound("c1", "read", LONG_TTL) is not None
    await store.add_event("c1", "evented", "e1", _event(1), LONG_TTL)
    await wait_ttl_passed(store)
    assert await store.get_outbound("c1", "untouched", TTL) is None
    assert await store.get_outbound("c1", "read", TTL) == OutboundRecord({"mid": "read"}, [])
    assert await store.get_outbound("c1", "evented", TTL) == OutboundRecord(
        {"mid": "evented"}, [_event(1)]
    )


# --- rates ----------------------------------------------------------------------------


async def test_rates_count_per_owner_label_and_bucket(store: StateStore) -> None:
    for _ in range(3):
        await store.incr_rate("c1", "inbound", 100, LONG_TTL)
    await store.incr_rate("c1", "inbound", 101, LONG_TTL)
    await store.incr_rate("c1", "outbound", 100, LONG_TTL)
    await store.incr_rate("c2", "inbound", 100, LONG_TTL)
    assert await store.get_rates("c1", LABELS, 100) == {
        "inbound": 3,
        "outbound": 1,
        "submitted": 0,
    }
    assert await store.get_rates("c1", LABELS, 101) == {"inbound": 1, "outbound": 0, "submitted": 0}
    assert await store.get_rates("c3", ["inbound"], 100) == {"inbound": 0}
    assert await store.get_rates("c1", [], 100) == {}


async def test_rates_of_several_owners_are_counted_in_one_write(store: StateStore) -> None:
    await store.incr_rates(
        [
            RateCount("channel", "inbound", 7, LONG_TTL),
            RateCount("router", "inbound", 7, LONG_TTL),
            RateCount("router", "inbound", 7, LONG_TTL),
        ]
    )
    await store.incr_rates([])
    assert await store.get_rates("channel", ["inbound"], 7) == {"inbound": 1}
    assert await store.get_rates("router", ["inbound"], 7) == {"inbound": 2}


async def test_concurrent_increments_are_not_lost(store: StateStore) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(store.incr_rate, "c1", "inbound", 5, LONG_TTL)
    assert await store.get_rates("c1", ["inbound"], 5) == {"inbound": 40}


@pytest.mark.slow
async def test_rate_counter_expires_and_restarts(store: StateStore) -> None:
    await store.incr_rate("c1", "inbound", 1, TTL)
    await store.incr_rate("c1", "inbound", 1, TTL)

    async def expired() -> bool:
        return await store.get_rates("c1", ["inbound"], 1) == {"inbound": 0}

    await wait_for(expired)
    await store.incr_rate("c1", "inbound", 1, LONG_TTL)
    assert await store.get_rates("c1", ["inbound"], 1) == {"inbound": 1}


# --- compare-and-set on keyed records -------------------------------------------------

RACERS = 20


async def test_kv_put_if_absent_writes_only_once(store: StateStore) -> None:
    assert await store.kv_put_if_absent("c1:claims", "k", {"first": True}, LONG_TTL) is True
    assert await store.kv_put_if_absent("c1:claims", "k", {"first": False}, LONG_TTL) is False
    assert await store.kv_get("c1:claims", "k") == {"first": True}
    # Other keys and scopes are independent; no ttl means kept until deleted.
    assert await store.kv_put_if_absent("c1:claims", "other", {"n": 2}) is True
    assert await store.kv_put_if_absent("c2:claims", "k", {"n": 3}) is True
    # A value from kv_put counts as present; a deleted one as absent.
    await store.kv_put("c1:claims", "plain", {"n": 4})
    assert await store.kv_put_if_absent("c1:claims", "plain", {"n": 5}) is False
    assert await store.kv_delete("c1:claims", "k") is True
    assert await store.kv_put_if_absent("c1:claims", "k", {"again": 1}, LONG_TTL) is True
    assert await store.kv_items("c1:claims") == {
        "k": {"again": 1},
        "other": {"n": 2},
        "plain": {"n": 4},
    }


@pytest.mark.slow
async def test_kv_put_if_absent_treats_an_expired_entry_as_absent(store: StateStore) -> None:
    assert await store.kv_put_if_absent("c1:claims", "k", {"old": True}, TTL) is True
    assert await store.kv_put_if_absent("c1:claims", "k", {"early": True}, TTL) is False
    await wait_ttl_passed(store)
    assert await store.kv_get("c1:claims", "k") is None
    assert await store.kv_put_if_absent("c1:claims", "k", {"new": True}) is True
    assert await store.kv_get("c1:claims", "k") == {"new": True}
    # Written without ttl: it no longer expires.
    await wait_ttl_passed(store)
    assert await store.kv_get("c1:claims", "k") == {"new": True}


@pytest.mark.slow
async def test_kv_put_if_absent_has_one_winner_among_racing_stores(
    open_store: OpenStore, namespace: Namespace
) -> None:
    """Racers with their own store (their own connection, as API workers have): for each key
    exactly one write succeeds, and the stored value is the winner's."""
    stores = [await open_store(namespace) for _ in range(RACERS)]

    async def race(index: int, key: str, start: trio.Event, won: list[int]) -> None:
        await start.wait()
        if await stores[index].kv_put_if_absent("c1:claims", key, {"racer": index}, LONG_TTL):
            won.append(index)

    for round_ in range(5):
        key = f"key-{round_}"
        won: list[int] = []
        start = trio.Event()
        async with trio.open_nursery() as nursery:
            for index in range(RACERS):
                nursery.start_soon(race, index, key, start, won)
            await trio.testing.wait_all_tasks_blocked()
            start.set()
        assert len(won) == 1, won
        assert await stores[0].kv_get("c1:claims", key) == {"racer": won[0]}


@pytest.mark.parametrize(
    ("stored", "asked", "removed"),
    [
        ({"token": "a", "pid": 1}, {"token": "a", "pid": 1}, True),
        ({"token": "a", "pid": 1}, {"token": "b", "pid": 1}, False),
        ({"token": "a", "pid": 1}, {"token": "a"}, False),
        ({"token": "a", "pid": 1}, {"pid": 1, "token": "a"}, False),  # as written: key order
        (None, {"token": "a"}, False),
    ],
)
async def test_kv_delete_if_removes_only_the_value_asked_for(
    store: StateStore, stored: dict[str, object] | None, asked: dict[str, object], removed: bool
) -> None:
    if stored is not None:
        await store.kv_put("c1:leases", "k", stored, LONG_TTL)
    await store.kv_put("c1:leases", "other", {"token": "a", "pid": 1})
    assert await store.kv_delete_if("c1:leases", "k", asked) is removed
    left = await store.kv_items("c1:leases")
    assert left.get("k") == (None if removed else stored)
    assert left["other"] == {"token": "a", "pid": 1}


@pytest.mark.slow
async def test_kv_delete_if_leaves_an_expired_entry_alone(store: StateStore) -> None:
    """An entry past its ttl belongs to no one: deleting it reports nothing removed, and a
    newer holder's entry under the same key is never taken for it."""
    await store.kv_put("c1:leases", "k", {"token": "old"}, TTL)
    await wait_ttl_passed(store)
    assert await store.kv_delete_if("c1:leases", "k", {"token": "old"}) is False
    assert await store.kv_put_if_absent("c1:leases", "k", {"token": "new"}, LONG_TTL)
    assert await store.kv_delete_if("c1:leases", "k", {"token": "old"}) is False
    assert await store.kv_get("c1:leases", "k") == {"token": "new"}


# --- namespaces and lifecycle ---------------------------------------------------------


async def test_namespaces_are_isolated(open_store: OpenStore, namespace: Namespace) -> None:
    mine = await open_store(namespace)
    theirs = await open_store(Namespace(f"{namespace.prefix}-other"))
    await _fill_channel(mine, "c1")

    assert await theirs.list_channels() == []
    assert await theirs.get_channel("c1") is None
    assert await theirs.get_statuses("c1") == {}
    assert await theirs.get_inbound("c1", "in1", LONG_TTL) is None
    assert await theirs.get_outbound("c1", "out1", LONG_TTL) is None
    assert await theirs.get_rates("c1", ["inbound"], 7) == {"inbound": 0}
    assert await theirs.delete_channel("c1") is False

    await theirs.save_channel("c1", {"type": "other"})
    assert await mine.get_channel("c1") == {"type": "telnet"}
    assert await mine.get_inbound("c1", "in1", LONG_TTL) == {"content": "hi"}


async def test_ping_answers(store: StateStore) -> None:
    await store.ping()


# --- Redis specifics ------------------------------------------------------------------


async def test_redis_key_layout_matches_the_original(
    redis_settings: Settings, namespace: Namespace
) -> None:
    assert redis_settings.redis is not None
    redis = redis_settings.redis.model_copy(update={"key_prefix": "jbkp"})
    store = await RedisStateStore.connect(redis, namespace)
    try:
        await _fill_channel(store, "c1")
        await store.save_channel("c2", {})
        p = f"jbkp:{namespace.prefix}"
        c1_keys = [
            f"{p}:c1:inbound:7",
            f"{p}:c1:inbound_messages:in1",
            f"{p}:c1:outbound_messages:out1",
            f"{p}:c1:outbound_messages:out1:event_order",
            f"{p}:c1:properties",
            f"{p}:c1:status",
        ]
        assert await store.keys_in_namespace() == sorted(
            [f"{p}:channels", f"{p}:c2:properties", *c1_keys]
        )
        assert await store.delete_channel("c1") is True
        assert await store.keys_in_namespace() == [f"{p}:c2:properties", f"{p}:channels"]
    finally:
        await store.purge_namespace()
        await store.aclose()


async def test_redis_unreachable_at_connect(namespace: Namespace) -> None:
    with pytest.raises(StoreUnavailableError):
        await RedisStateStore.connect(
            RedisSettings(host="127.0.0.1", port=_closed_port()), namespace
        )


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        async for chunk in source:
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _serve_proxy(
    target_port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A TCP relay to Redis; cancelling it cuts every relayed connection and the port."""

    async def relay(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", target_port)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream)
            await _pump(upstream, client)
            nursery.cancel_scope.cancel()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(relay, listeners)


async def test_redis_lost_mid_life_raises_store_unavailable(
    redis_settings: Settings, namespace: Namespace
) -> None:
    assert redis_settings.redis is not None
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_proxy, redis_settings.redis.port)
        store = await RedisStateStore.connect(RedisSettings(host="127.0.0.1", port=port), namespace)
        try:
            await store.save_channel("c1", {})
            nursery.cancel_scope.cancel()
        except BaseException:
            await store.aclose()
            raise
    try:
        with pytest.raises(StoreUnavailableError):
            await store.get_channel("c1")
        with pytest.raises(StoreUnavailableError):
            await store.ping()
    finally:
        await store.aclose()
        await _purge_redis(redis_settings.redis, [namespace])


# --- SQLite specifics -----------------------------------------------------------------


async def test_sqlite_uncreatable_path(tmp_path: Path, namespace: Namespace) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StoreUnavailableError):
        await SqliteStateStore.open(tmp_path / "a-file" / "state.sqlite3", namespace)


async def test_sqlite_not_a_database(tmp_path: Path, namespace: Namespace) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"this is not an SQLite file, just text long enough to read a header" * 20)
    with pytest.raises(StoreUnavailableError):
        await SqliteStateStore.open(path, namespace)


async def test_sqlite_locked_by_another_process_raises_store_unavailable(
    tmp_path: Path, namespace: Namespace
) -> None:
    path = tmp_path / "state.sqlite3"
    store = await SqliteStateStore.open(path, namespace, busy_timeout=0.05)
    try:
        with write_lock_held(path), pytest.raises(StoreUnavailableError):
            await store.save_channel("c1", {})
        await store.save_channel("c1", {})
    finally:
        await store.aclose()


async def test_sqlite_closed_store_raises_store_unavailable(
    tmp_path: Path, namespace: Namespace
) -> None:
    store = await SqliteStateStore.open(tmp_path / "state.sqlite3", namespace)
    await store.aclose()
    with pytest.raises(StoreUnavailableError):
        await store.ping()


async def test_sqlite_two_stores_on_one_file_share_state(
    tmp_path: Path, namespace: Namespace
) -> None:
    path = tmp_path / "nested" / "state.sqlite3"
    async with AsyncExitStack() as stack:
        first = await SqliteStateStore.open(path, namespace)
        stack.push_async_callback(first.aclose)
        second = await SqliteStateStore.open(path, namespace)
        stack.push_async_callback(second.aclose)

        await _fill_channel(first, "c1")
        assert await second.list_channels() == ["c1"]
        assert await second.get_outbound("c1", "out1", LONG_TTL) == OutboundRecord(
            message={"content": "yo"}, events=[_event(1)]
        )
        async with trio.open_nursery() as nursery:
            for writer in (first, second) * 20:
                nursery.start_soon(writer.incr_rate, "c1", "inbound", 8, LONG_TTL)
        assert await first.get_rates("c1", ["inbound"], 8) == {"inbound": 40}
        assert await second.delete_channel("c1") is True
        assert await first.get_channel("c1") is None


@pytest.mark.slow
async def test_sqlite_purge_removes_expired_rows(tmp_path: Path, namespace: Namespace) -> None:
    path = tmp_path / "state.sqlite3"
    store = await SqliteStateStore.open(path, namespace)
    try:
        await store.put_inbound("c1", "in1", {}, TTL)
        await store.add_event("c1", "out1", "e1", _event(1), TTL)
        await store.incr_rate("c1", "inbound", 1, TTL)
        await store.put_inbound("c1", "in2", {}, LONG_TTL)

        await wait_ttl_passed(store)
        # The three short-lived records and the clock's counter.
        assert await store.purge_expired() == 4
        with closing(sqlite3.connect(path)) as raw:
            counts = [
                raw.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("inbound", "outbound", "outbound_events", "rates")
            ]
        assert counts == [1, 0, 0, 0]
    finally:
        await store.aclose()
