"""The embedded queue's write linger (set by a channel draining a backlog): publishes and
acks that come within it share one transaction, acks included (they then skip the inline
path), committed on trio's thread and synced after; every one still takes effect.
RabbitMQ has nothing to batch: a no-op there."""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from ipc import broker_sqlite
from ipc.broker_sqlite import SqliteBroker
from ipc.errors import BrokerUnavailableError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.broker import Delivery

LINGER = 0.2


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[SqliteBroker]:
    opened = await SqliteBroker.open(tmp_path / "queues.sqlite3")
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every write transaction the embedded queue commits."""
    sizes: list[int] = []
    execute = broker_sqlite._execute

    def counted(conn: Any, batch: list[Any]) -> None:
        sizes.append(len(batch))
        execute(conn, batch)

    monkeypatch.setattr(broker_sqlite, "_execute", counted)
    return sizes


async def test_writes_within_the_linger_share_a_transaction(
    broker: SqliteBroker, batches: list[int]
) -> None:
    await broker.declare_queue("q")
    broker.set_write_linger(LINGER)
    batches.clear()
    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(broker.publish, "q", b"%d" % n)
            # Each starts once the one before waits in the linger: one after the other,
            # well within it however loaded the machine (10 ms sleeps between them were
            # once stretched past the 200 ms in CI, and the fifth missed the batch).
            await trio.testing.wait_all_tasks_blocked()
    assert batches == [5]
    assert await broker.queue_length("q") == 5

    batches.clear()
    async with broker.consume("q", prefetch=5) as consumer:
        deliveries: list[Delivery] = [await consumer.receive() for _ in range(5)]
        async with trio.open_nursery() as nursery:
            for delivery in deliveries:
                nursery.start_soon(consumer.ack, delivery)
                await trio.testing.wait_all_tasks_blocked()
    # The five acks in one transaction (claims may have gone inline or in their own).
    assert 5 in batches
    assert sorted(d.body for d in deliveries) == [b"%d" % n for n in range(5)]
    assert await broker.queue_length("q") == 0

    broker.set_write_linger(0)
    batches.clear()
    await broker.publish("q", b"alone")
    assert batches == [1]


@pytest.mark.parametrize(("linger", "on_trio_thread"), [(LINGER, True), (0.0, False)])
async def test_a_lingering_batch_runs_its_statements_on_trios_thread(
    broker: SqliteBroker, monkeypatch: pytest.MonkeyPatch, linger: float, on_trio_thread: bool
) -> None:
    """While writes linger (a backlog), a durable batch's statements run on trio's thread,
    so the write lock is not held across GIL hand-overs, and the log is synced afterwards;
    otherwise they run in the worker thread. Either way the publish is durable and lands."""
    await broker.declare_queue("q")
    trio_thread = threading.get_ident()
    threads: list[bool] = []
    synced: list[bool] = []
    execute = broker_sqlite._execute
    real_sync = os.fdatasync

    def spying_execute(conn: Any, batch: list[Any]) -> None:
        threads.append(threading.get_ident() == trio_thread)
        execute(conn, batch)

    def spying_sync(fd: int) -> None:
        synced.append(threading.get_ident() == trio_thread)
        real_sync(fd)

    monkeypatch.setattr(broker_sqlite, "_execute", spying_execute)
    monkeypatch.setattr(os, "fdatasync", spying_sync)
    broker.set_write_linger(linger)
    await broker.publish("q", b"m")
    assert threads == [on_trio_thread]
    # The sync never runs on trio's thread: it would stall every task for milliseconds.
    assert synced == [False]
    assert await broker.queue_length("q") == 1


async def test_a_failed_sync_after_an_inline_commit_fails_the_publish(
    broker: SqliteBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Committed but not known durable: the sender hears of a failure (and may send again:
    a possible duplicate, never a silent loss)."""
    await broker.declare_queue("q")

    def failing_sync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", failing_sync)
    broker.set_write_linger(LINGER)
    with pytest.raises(BrokerUnavailableError, match="syncing the write-ahead log failed"):
        await broker.publish("q", b"m")
