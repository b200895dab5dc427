"""The stores' group commit: writes ready at the same time share one SQLite transaction or
one Redis MULTI/EXEC, and each caller still gets its own outcome, whatever happens to the
others."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

import pytest
import trio

from ipc.errors import StoreUnavailableError
from ipc.settings import RedisSettings
from ipc.state_redis import RedisStateStore
from ipc.state_sqlite import SqliteStateStore
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.ipc.sqlite_locks import write_lock_held

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.names import Namespace

WRITERS = 20


class BoomError(Exception):
    """A write that fails by itself (as a bug would)."""


@pytest.fixture
async def store(tmp_path: Path, namespace: Namespace) -> AsyncIterator[SqliteStateStore]:
    opened = await SqliteStateStore.open(tmp_path / "state.sqlite3", namespace, busy_timeout=0.2)
    try:
        yield opened
    finally:
        await opened.aclose()


def count_transactions(store: SqliteStateStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each write transaction the store commits, as the number of statements it ran."""
    seen: list[int] = []
    real = store._commit_once

    async def counting(fn: Any) -> Any:
        statements = 0

        def run(conn: sqlite3.Connection) -> Any:
            nonlocal statements

            def trace(_sql: str) -> None:
                nonlocal statements
                statements += 1

            conn.set_trace_callback(trace)
            try:
                return fn(conn)
            finally:
                conn.set_trace_callback(None)

        result = await real(run)
        seen.append(statements)
        return result

    monkeypatch.setattr(store, "_commit_once", counting)
    # A batch of one goes straight to it, through the group's own reference.
    monkeypatch.setattr(store._group, "_commit_one", counting)
    return seen


async def test_writes_ready_together_share_one_transaction(
    store: SqliteStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    transactions = count_transactions(store, monkeypatch)
    async with trio.open_nursery() as nursery:
        for n in range(WRITERS):
            nursery.start_soon(store.kv_put, "scope", f"k{n}", {"n": n})
    assert await store.kv_items("scope") == {f"k{n}": {"n": n} for n in range(WRITERS)}
    assert len(transactions) < WRITERS / 2, transactions
    assert sum(transactions) == WRITERS


async def test_a_write_alone_commits_at_once(
    store: SqliteStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    transactions = count_transactions(store, monkeypatch)
    for n in range(3):
        await store.kv_put("scope", f"k{n}", {"n": n})
        assert await store.kv_get("scope", f"k{n}") == {"n": n}
    assert transactions == [1, 1, 1]


async def test_results_go_to_their_own_callers(store: SqliteStateStore) -> None:
    await store.kv_put("scope", "taken", {"by": "earlier"})
    results: dict[str, bool] = {}

    async def put_if_absent(key: str) -> None:
        results[key] = await store.kv_put_if_absent("scope", key, {"by": key})

    async with trio.open_nursery() as nursery:
        for key in ("taken", "free-1", "free-2"):
            nursery.start_soon(put_if_absent, key)
    assert results == {"taken": False, "free-1": True, "free-2": True}


async def test_a_failing_write_fails_alone(store: SqliteStateStore) -> None:
    outcomes: dict[str, object] = {}

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO kv VALUES ('x', 'x', 'x', 'x', NULL)")
        raise BoomError("a bug in one write")

    async def fail() -> None:
        try:
            await store._call(broken, write=True)
        except BoomError as exc:
            outcomes["broken"] = exc

    async def put(key: str) -> None:
        await store.kv_put("scope", key, {"ok": True})
        outcomes[key] = "stored"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put, "before")
        nursery.start_soon(fail)
        nursery.start_soon(put, "after")
    assert isinstance(outcomes.pop("broken"), BoomError)
    assert outcomes == {"before": "stored", "after": "stored"}
    assert set(await store.kv_items("scope")) == {"before", "after"}
    # The failed write left nothing behind (its transaction was rolled back).
    assert await store.kv_items("x") == {}


async def test_a_locked_database_fails_the_batch_then_writes_resume(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    errors: list[Exception] = []

    async def put(key: str) -> None:
        try:
            await store.kv_put("scope", key, {})
        except StoreUnavailableError as exc:
            errors.append(exc)

    with write_lock_held(tmp_path / "state.sqlite3"):
        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(put, f"k{n}")
    assert len(errors) == 5
    assert all("locked" in str(exc) for exc in errors), errors
    await store.kv_put("scope", "later", {})
    assert list(await store.kv_items("scope")) == ["later"]


async def test_a_write_cancelled_before_its_batch_never_runs(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    holder = sqlite3.connect(tmp_path / "state.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.kv_put, "scope", "first", {})
            # The first write's batch now waits for the lock in its thread; the next one
            # queues behind it and is cancelled there.
            await trio.sleep(0.02)
            with trio.move_on_after(0.01) as waited:
                await store.kv_put("scope", "cancelled", {})
            assert waited.cancelled_caught
            holder.execute("ROLLBACK")
    finally:
        holder.close()
    await store.kv_put("scope", "later", {})
    assert set(await store.kv_items("scope")) == {"first", "later"}


async def test_a_cancelled_write_does_not_hold_up_the_others(store: SqliteStateStore) -> None:
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as cancelled:
            nursery.start_soon(store.kv_put, "scope", "second", {})
            cancelled.cancel()
            await store.kv_put("scope", "first", {})
        assert cancelled.cancelled_caught
    assert set(await store.kv_items("scope")) == {"second"}
    await store.kv_put("scope", "third", {})
    assert set(await store.kv_items("scope")) == {"second", "third"}


# --- Redis: atomic writes ready together share one MULTI/EXEC ------------------------


@pytest.fixture
async def redis_store(namespace: Namespace, services: None) -> AsyncIterator[RedisStateStore]:
    opened = await RedisStateStore.connect(
        RedisSettings(host=REDIS_HOST, port=REDIS_PORT), namespace
    )
    try:
        yield opened
    finally:
        await opened.purge_namespace()
        await opened.aclose()


def count_round_trips(store: RedisStateStore, monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """One entry per call the store makes to Redis from now on."""
    round_trips: list[None] = []
    real = store._call

    async def counting(fn: Any) -> Any:
        round_trips.append(None)
        return await real(fn)

    monkeypatch.setattr(store, "_call", counting)
    return round_trips


async def test_redis_writes_ready_together_share_one_round_trip(
    redis_store: RedisStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    round_trips = count_round_trips(redis_store, monkeypatch)
    async with trio.open_nursery() as nursery:
        for n in range(WRITERS):
            nursery.start_soon(redis_store.put_inbound, "c", f"m{n}", {"n": n}, 60.0)
    writes = len(round_trips)
    for n in range(WRITERS):
        assert await redis_store.get_inbound("c", f"m{n}", 60.0) == {"n": n}
    assert writes < WRITERS / 2


async def test_redis_a_failing_command_fails_only_its_own_write(
    redis_store: RedisStateStore, namespace: Namespace
) -> None:
    # The record's key holds a string: HSET on it fails (WRONGTYPE), inside the batch.
    clash = redis_store._key("c", "inbound_messages", "clash")
    await redis_store._execute(("SET", clash, "not a hash"))
    outcomes: dict[str, object] = {}

    async def put(mid: str) -> None:
        try:
            await redis_store.put_inbound("c", mid, {"mid": mid}, 60.0)
            outcomes[mid] = "stored"
        except StoreUnavailableError as exc:
            outcomes[mid] = exc

    async with trio.open_nursery() as nursery:
        for mid in ("before", "clash", "after"):
            nursery.start_soon(put, mid)
    assert "WRONGTYPE" in str(outcomes.pop("clash"))
    assert outcomes == {"before": "stored", "after": "stored"}
    assert await redis_store.get_inbound("c", "after", 60.0) == {"mid": "after"}


async def test_redis_keyed_writes_share_round_trips_and_keep_their_answers(
    redis_store: RedisStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kv_put / kv_put_if_absent / kv_delete_if are scripts run inside the group's
    MULTI/EXEC, each with its own answer; they still work once Redis has forgotten its
    scripts (SCRIPT FLUSH, as after a restart)."""
    await redis_store._execute(("SCRIPT", "FLUSH"), atomic=False)
    await redis_store.kv_put("s", "taken", {"v": 0}, 60.0)
    round_trips = count_round_trips(redis_store, monkeypatch)
    answers: dict[str, bool] = {}

    async def put_if_absent(key: str) -> None:
        answers[key] = await redis_store.kv_put_if_absent("s", key, {"v": key}, 60.0)

    async def delete_if(key: str, value: dict[str, Any]) -> None:
        answers[f"delete {key}"] = await redis_store.kv_delete_if("s", key, value)

    async with trio.open_nursery() as nursery:
        for n in range(WRITERS):
            nursery.start_soon(redis_store.kv_put, "s", f"k{n}", {"n": n}, 60.0)
        nursery.start_soon(put_if_absent, "taken")
        nursery.start_soon(put_if_absent, "free")
        nursery.start_soon(delete_if, "taken", {"v": 1})
    writes = len(round_trips)
    assert answers == {"taken": False, "free": True, "delete taken": False}
    assert writes < WRITERS / 2
    items = await redis_store.kv_items("s")
    assert items == {
        "free": {"v": "free"},
        "taken": {"v": 0},
        **{f"k{n}": {"n": n} for n in range(WRITERS)},
    }
    assert await redis_store.kv_delete_if("s", "taken", {"v": 0})
    assert await redis_store.kv_get("s", "taken") is None
