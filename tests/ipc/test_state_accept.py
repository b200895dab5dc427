"""StateStore.write_outbound, the send path's batched writes, on both backends: the same
outcome as the one-at-a-time calls it replaces (put_outbound, add_event, incr_rate)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import pytest

from ipc.errors import StoreUnavailableError
from ipc.state import OutboundRecord, OutboundWrites, RateCount, open_state
from ipc.state_redis import RedisStateStore
from ipc.state_sqlite import SqliteStateStore
from tests.ipc.sqlite_locks import lock_held_for_tries, write_lock_held
from tests.ipc.test_state import _purge_redis, wait_ttl_passed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.names import Namespace
    from ipc.settings import Settings
    from ipc.state import StateStore

TTL = 0.4
LONG_TTL = 60.0
RECORD = {"message_id": "m1", "content": "hi", "event_url": "http://e/"}
ACCEPTED = {"message_type": "timeline", "stage": "accepted", "details": {"priority": 1}}
QUEUED = {"message_type": "timeline", "stage": "queued", "details": {}}


@pytest.fixture
async def store(settings: Settings, namespace: Namespace) -> AsyncIterator[StateStore]:
    async with AsyncExitStack() as stack:
        if settings.redis is not None:
            stack.push_async_callback(_purge_redis, settings.redis, [namespace])
        yield await stack.enter_async_context(open_state(settings, namespace))


def _accept(message_id: str, owners: tuple[str, ...], ttl: float = LONG_TTL) -> OutboundWrites:
    return OutboundWrites(
        message_id=message_id,
        owners=owners,
        ttl=ttl,
        record={**RECORD, "message_id": message_id},
        entry=("e-accepted", ACCEPTED),
    )


def _queued(
    message_id: str, owners: tuple[str, ...], rates: tuple[RateCount, ...]
) -> OutboundWrites:
    return OutboundWrites(
        message_id=message_id, owners=owners, ttl=LONG_TTL, entry=("e-queued", QUEUED), rates=rates
    )


async def test_a_send_recorded_under_every_owner_with_its_rates(store: StateStore) -> None:
    owners = ("chan", "dest")
    await store.write_outbound(_accept("m1", owners))
    counts = (
        RateCount("chan", "outbound", 7, LONG_TTL),
        RateCount("router", "outbound", 7, LONG_TTL),
    )
    await store.write_outbound(_queued("m1", owners, counts))
    await store.write_outbound(_queued("m2", ("chan",), counts[:1]))
    for owner in owners:
        assert await store.get_outbound(owner, "m1", LONG_TTL) == OutboundRecord(
            message=RECORD, events=[ACCEPTED, QUEUED]
        )
    assert await store.get_outbound("chan", "m2", LONG_TTL) == OutboundRecord(
        message=None, events=[QUEUED]
    )
    assert await store.get_outbound("router", "m1", LONG_TTL) is None
    assert await store.get_rates("chan", ["outbound"], 7) == {"outbound": 2}
    assert await store.get_rates("router", ["outbound"], 7) == {"outbound": 1}
    assert await store.get_rates("dest", ["outbound"], 7) == {"outbound": 0}


async def test_the_same_as_the_single_calls(store: StateStore) -> None:
    """Batched on m1, one call at a time on m2: every read agrees."""
    await store.put_outbound("chan", "m2", {**RECORD, "message_id": "m2"}, LONG_TTL)
    await store.add_event("chan", "m2", "e-accepted", ACCEPTED, LONG_TTL)
    await store.add_event("chan", "m2", "e-queued", QUEUED, LONG_TTL)
    await store.incr_rate("a", "outbound", 1, LONG_TTL)
    await store.write_outbound(_accept("m1", ("chan",)))
    await store.write_outbound(_queued("m1", ("chan",), (RateCount("b", "outbound", 1, LONG_TTL),)))
    batched = await store.get_outbound("chan", "m1", LONG_TTL)
    single = await store.get_outbound("chan", "m2", LONG_TTL)
    assert batched is not None
    assert single is not None
    assert batched.message == {**RECORD, "message_id": "m1"}
    assert single.message == {**RECORD, "message_id": "m2"}
    assert batched.events == single.events == [ACCEPTED, QUEUED]
    assert await store.get_rates("a", ["outbound"], 1) == await store.get_rates(
        "b", ["outbound"], 1
    )


async def test_an_empty_batch_writes_nothing(store: StateStore) -> None:
    await store.write_outbound(OutboundWrites(message_id="m1", owners=("chan",), ttl=LONG_TTL))
    assert await store.get_outbound("chan", "m1", LONG_TTL) is None


async def test_a_repeated_entry_replaces_its_copy_in_place(store: StateStore) -> None:
    await store.write_outbound(_accept("m1", ("chan",)))
    await store.add_event("chan", "m1", "later", QUEUED, LONG_TTL)
    await store.write_outbound(_accept("m1", ("chan",)))
    record = await store.get_outbound("chan", "m1", LONG_TTL)
    assert record == OutboundRecord(message=RECORD, events=[ACCEPTED, QUEUED])


async def test_records_and_counts_expire(store: StateStore) -> None:
    await store.write_outbound(_accept("m1", ("chan", "dest"), ttl=TTL))
    await store.write_outbound(
        OutboundWrites(
            message_id="m1",
            owners=(),
            ttl=LONG_TTL,
            rates=(RateCount("chan", "outbound", 3, TTL),),
        )
    )
    assert await store.get_rates("chan", ["outbound"], 3) == {"outbound": 1}
    await wait_ttl_passed(store)
    assert await store.get_outbound("chan", "m1", LONG_TTL) is None
    assert await store.get_outbound("dest", "m1", LONG_TTL) is None
    assert await store.get_rates("chan", ["outbound"], 3) == {"outbound": 0}
    # A later entry starts a fresh record: the expired send record is not revived.
    await store.write_outbound(_queued("m1", ("chan",), ()))
    assert await store.get_outbound("chan", "m1", LONG_TTL) == OutboundRecord(
        message=None, events=[QUEUED]
    )


# --- backend specifics ------------------------------------------------------------------


async def test_redis_keys_and_ttls_as_the_single_calls_leave_them(
    redis_settings: Settings, namespace: Namespace
) -> None:
    assert redis_settings.redis is not None
    store = await RedisStateStore.connect(redis_settings.redis, namespace)
    try:
        await store.put_outbound("single", "m1", RECORD, LONG_TTL)
        await store.add_event("single", "m1", "e-accepted", ACCEPTED, LONG_TTL)
        await store.incr_rate("single", "outbound", 5, LONG_TTL)
        await store.write_outbound(_accept("m1", ("batched",)))
        await store.write_outbound(
            _queued("m1", (), (RateCount("batched", "outbound", 5, LONG_TTL),))
        )
        keys = await store.keys_in_namespace()
        assert [key.replace("batched", "single") for key in keys if "batched" in key] == [
            key for key in keys if "single" in key
        ]
        ttls = await store._call(lambda client: [client.pttl(key) for key in keys])
        assert all(LONG_TTL * 1000 - 5000 < ttl <= LONG_TTL * 1000 for ttl in ttls)
    finally:
        await store.purge_namespace()
        await store.aclose()


async def test_sqlite_busy_store_raises_and_writes_nothing(
    tmp_path: Path, namespace: Namespace
) -> None:
    path = tmp_path / "state.sqlite3"
    store = await SqliteStateStore.open(path, namespace, busy_timeout=0.05)
    try:
        with write_lock_held(path), pytest.raises(StoreUnavailableError):
            await store.write_outbound(_accept("m1", ("chan", "dest")))
        assert await store.get_outbound("chan", "m1", LONG_TTL) is None
        assert await store.get_outbound("dest", "m1", LONG_TTL) is None
        await store.write_outbound(_accept("m1", ("chan", "dest")))
        assert await store.get_outbound("dest", "m1", LONG_TTL) is not None
    finally:
        await store.aclose()


async def test_sqlite_closed_store_raises(tmp_path: Path, namespace: Namespace) -> None:
    store = await SqliteStateStore.open(tmp_path / "state.sqlite3", namespace)
    await store.aclose()
    with pytest.raises(StoreUnavailableError):
        await store.write_outbound(_accept("m1", ("chan",)))


async def test_sqlite_write_behind_another_writer_retries_in_short_steps(
    tmp_path: Path, namespace: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write finding the file locked by another process tries again after BUSY_RETRY_MIN,
    doubling up to BUSY_RETRY_MAX, and goes through once it is free (SQLite's own busy
    handler slept up to 100 ms between tries)."""
    from ipc import sqlite_inline

    path = tmp_path / "state.sqlite3"
    store = await SqliteStateStore.open(path, namespace)
    try:
        with lock_held_for_tries(path, 8, monkeypatch) as delays:
            await store.write_outbound(_accept("m1", ("chan",)))
        assert len(delays) == 8
        assert delays[0] == sqlite_inline.BUSY_RETRY_MIN
        assert max(delays) == sqlite_inline.BUSY_RETRY_MAX
        assert await store.get_outbound("chan", "m1", LONG_TTL) is not None
    finally:
        await store.aclose()
