"""ipc/sqlite_inline.py: inline transactions give way to a lock held elsewhere, never
checkpoint, hand every COMMITS_PER_CHECKPOINT-th write to the threaded path, roll back on
errors; and the embedded broker still settles, claims and counts (threaded) while another
connection holds the write lock."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from typing import TYPE_CHECKING

import pytest
import trio

from ipc.broker_sqlite import SqliteBroker
from ipc.sqlite_inline import COMMITS_PER_CHECKPOINT, InlineRunner

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "inline.sqlite3"
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (n INTEGER)")
    return path


def _insert(conn: sqlite3.Connection) -> int:
    return conn.execute("INSERT INTO t (n) VALUES (1)").rowcount


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM t").fetchone()[0])


def test_inline_write_and_read_commit(db: Path) -> None:
    runner = InlineRunner.connect(db)
    try:
        assert runner.run(_insert, write=True).result == 1
        read = runner.run(_count, write=False)
        assert read.done
        assert read.result == 1
    finally:
        runner.close()
    with closing(sqlite3.connect(db)) as other:
        assert _count(other) == 1


def test_inline_write_gives_way_to_a_held_lock(db: Path) -> None:
    runner = InlineRunner.connect(db)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        attempt = runner.run(_insert, write=True)
        assert not attempt.done
        # WAL readers are not blocked by a writer.
        assert runner.run(_count, write=False).done
        holder.execute("COMMIT")
        assert runner.run(_insert, write=True).done
    finally:
        holder.close()
        runner.close()


def test_inline_error_rolls_back_and_propagates(db: Path) -> None:
    runner = InlineRunner.connect(db)

    def half_then_fail(conn: sqlite3.Connection) -> None:
        _insert(conn)
        conn.execute("INSERT INTO missing_table VALUES (1)")

    try:
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            runner.run(half_then_fail, write=True)
        assert runner.run(_count, write=False).result == 0
    finally:
        runner.close()


def test_inline_never_checkpoints_and_hands_one_write_in_n_to_the_thread(db: Path) -> None:
    runner = InlineRunner.connect(db)
    try:
        done = [runner.run(_insert, write=True).done for _ in range(2 * COMMITS_PER_CHECKPOINT)]
        assert done.count(False) == 1
        assert done.index(False) == COMMITS_PER_CHECKPOINT
        assert runner.run(_count, write=False).result == 2 * COMMITS_PER_CHECKPOINT - 1
        # Every inline commit is still in the WAL: a checkpoint now finds them all to copy.
        with closing(sqlite3.connect(db, isolation_level=None)) as other:
            _, wal_frames, copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert wal_frames > COMMITS_PER_CHECKPOINT
        assert copied == wal_frames
    finally:
        runner.close()


def test_closed_inline_runner_does_nothing(db: Path) -> None:
    runner = InlineRunner.connect(db)
    runner.close()
    assert not runner.run(_insert, write=True).done
    with closing(sqlite3.connect(db)) as other:
        assert _count(other) == 0


@pytest.mark.slow
async def test_broker_works_while_another_connection_holds_the_lock(tmp_path: Path) -> None:
    """Inline attempts fail on the lock; the threaded path waits for it and completes."""
    path = tmp_path / "queues.sqlite3"
    broker = await SqliteBroker.open(path, doorbells=False)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        for n in range(3):
            await broker.publish("q", b"m%d" % n)
        async with broker.consume("q", prefetch=2) as consumer:
            first = await consumer.receive()
            holder.execute("BEGIN IMMEDIATE")
            acked = trio.Event()

            async def ack() -> None:
                await consumer.ack(first)
                acked.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ack)
                await trio.sleep(0.3)
                assert not acked.is_set()  # waiting for the lock, not failed
                holder.execute("COMMIT")
            assert [(await consumer.receive()).body for _ in range(2)] == [b"m1", b"m2"]
        assert await broker.queue_length("q") == 2
    finally:
        holder.close()
        await broker.aclose()
    with closing(sqlite3.connect(path)) as check:
        bodies = [row[0] for row in check.execute("SELECT body FROM messages ORDER BY id")]
    assert bodies == [b"m1", b"m2"]
