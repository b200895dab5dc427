"""ipc/sqlite_inline.py: inline transactions give way to a lock held elsewhere, never
checkpoint, roll back on errors; the Checkpointer copies the log into the database in the
background every COMMITS_PER_CHECKPOINT commits (sooner when commits are large), rewinds it
while other connections keep writing without holding them up while it waits for readers,
and both embedded stores have one; every connection
leaves checkpoints to it and caps the log (WAL_PRAGMAS); and the
embedded broker still settles, claims and counts (threaded) while another connection holds
the write lock."""

from __future__ import annotations

import sqlite3
import struct
import threading
import time
from contextlib import closing
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from ipc import broker_sqlite, state_sqlite
from ipc.broker_sqlite import SqliteBroker
from ipc.names import Namespace
from ipc.sqlite_inline import (
    COMMITS_PER_CHECKPOINT,
    JOURNAL_SIZE_LIMIT,
    RESTART_WAIT,
    Checkpointer,
    InlineRunner,
    retry_busy,
    transaction,
)
from ipc.state_sqlite import SqliteStateStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
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


def _checkpoint_now(db: Path) -> tuple[int, int]:
    """Checkpoint from another connection: (frames in the log, frames it found copied)."""
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        _, log_frames, copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(log_frames), int(copied)


def test_inline_never_checkpoints(db: Path) -> None:
    runner = InlineRunner.connect(db)
    try:
        done = [runner.run(_insert, write=True).done for _ in range(2 * COMMITS_PER_CHECKPOINT)]
        assert all(done)
        assert runner.run(_count, write=False).result == 2 * COMMITS_PER_CHECKPOINT
        # Every inline commit is still in the WAL: a checkpoint now finds them all to copy.
        wal_frames, copied = _checkpoint_now(db)
        assert wal_frames > COMMITS_PER_CHECKPOINT
        assert copied == wal_frames
    finally:
        runner.close()


async def test_checkpointer_copies_the_log_in_the_background_every_n_commits(db: Path) -> None:
    every = 20
    checkpointer = Checkpointer(db, every=every)
    runner = InlineRunner.connect(db, checkpointer=checkpointer)
    try:
        for _ in range(every - 1):
            assert runner.run(_insert, write=True).done
        await trio.sleep(0.05)
        assert checkpointer.done == 0
        # The due commit returns at once; the checkpoint runs in a worker thread.
        assert runner.run(_insert, write=True).done
        with trio.fail_after(5):
            await checkpointer.wait_idle()
        assert checkpointer.done == 1
        # The log was copied whole, so the next commit starts it over: it holds only that
        # commit, where without the checkpoint it would hold all of them.
        assert runner.run(_insert, write=True).done
        wal_frames, _ = _checkpoint_now(db)
        assert wal_frames < every
        assert runner.run(_count, write=False).result == every + 1
    finally:
        runner.close()
        await checkpointer.aclose()


async def test_checkpointer_survives_a_checkpoint_that_cannot_run(tmp_path: Path) -> None:
    """A checkpoint failing (here: the file is not a database) is skipped, not raised into
    the writers or the run; closing still works and starts no more."""
    path = tmp_path / "not-a-database"
    path.write_bytes(b"garbage" * 100)
    checkpointer = Checkpointer(path, every=1)
    checkpointer.committed()
    with trio.fail_after(5):
        await checkpointer.aclose()
    assert checkpointer.done == 0
    checkpointer.committed()
    assert checkpointer.done == 0


def _wal_index(db: Path) -> tuple[int, int]:
    """(frames in the log (mxFrame), frames of it already copied into the database
    (nBackfill)), read from the wal-index (the -shm file: https://sqlite.org/walformat.html,
    4 bytes at offsets 16 and 96, native byte order) rather than asked of SQLite, which would
    checkpoint to answer."""
    header = (db.parent / f"{db.name}-shm").read_bytes()[:100]
    frames, backfilled = (
        struct.unpack_from("=I", header, 16)[0],
        struct.unpack_from("=I", header, 96)[0],
    )
    return int(frames), int(backfilled)


def _checkpointed(db: Path) -> bool:
    """Whether a checkpoint ran: either its copied frames are still counted, or it copied the
    whole log and a later commit started the log again (which sets nBackfill back to 0), so
    the log holds fewer frames than the commits made."""
    frames, backfilled = _wal_index(db)
    return backfilled > 0 or frames < COMMITS_PER_CHECKPOINT


@pytest.mark.parametrize("store", ["state", "queue"])
async def test_each_embedded_store_checkpoints(tmp_path: Path, store: str) -> None:
    """No connection checkpoints by itself any more: the state store and the queue each have
    their Checkpointer told of their commits, or their log would grow without end."""
    path = tmp_path / f"{store}.sqlite3"
    write: Callable[[int], Awaitable[None]]
    if store == "state":
        state = await SqliteStateStore.open(path, Namespace("test"))
        close = state.aclose

        async def write(n: int) -> None:
            await state.kv_put("scope", f"key{n}", {"n": n})
    else:
        broker = await SqliteBroker.open(path, doorbells=False)
        close = broker.aclose

        async def write(n: int) -> None:
            await broker.publish("q", b"%d" % n)

    try:
        for n in range(COMMITS_PER_CHECKPOINT + 5):
            await write(n)
        for _ in range(200):
            if _checkpointed(path):
                break
            await trio.sleep(0.05)
        assert _checkpointed(path)
    finally:
        await close()


def _wal_bytes(db: Path) -> int:
    """The log file's size: the most it ever held since it was last cut back."""
    return (db.parent / f"{db.name}-wal").stat().st_size


async def test_checkpoints_rewind_the_log_under_a_steady_stream_of_writes(db: Path) -> None:
    """A writer that never pauses (another process draining a flood) keeps every passive
    checkpoint from reaching the log's end, and SQLite rewinds the log only after one has:
    the log grew by every commit (2 GB in a two-minute flood). Past `restart_frames` the
    checkpointer rewinds it, so the file stops growing."""
    restart_frames, commits = 100, 2000
    checkpointer = Checkpointer(db, every=1, restart_frames=restart_frames)
    made = 0
    stop = threading.Event()

    def flood() -> None:
        nonlocal made
        with closing(sqlite3.connect(db, isolation_level=None, timeout=0)) as conn:
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")
            while not stop.is_set():
                retry_busy(partial(transaction, conn, _insert, write=True), 5)
                made += 1
                # Between two writes a process does other work (here 0.2 ms): less than a
                # checkpoint's syncs take, so a passive one never catches up.
                time.sleep(0.0002)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.to_thread.run_sync, flood, abandon_on_cancel=False))
            with trio.fail_after(60):
                # This process is told of the flood's commits, as the flooding process's
                # own checkpointer would be.
                while made < commits:
                    checkpointer.committed()
                    await trio.sleep(0.001)
            # Read while the flood's connection is open: the last one to close removes it.
            wal_bytes = _wal_bytes(db)
            stop.set()
    finally:
        stop.set()
        await checkpointer.aclose()
    assert checkpointer.restarts > 0
    # Each commit adds one 4 KB frame: without the rewinds the log held them all.
    frame = 4096 + 24
    assert wal_bytes < commits // 4 * frame, wal_bytes // frame


async def test_a_rewind_that_must_wait_lets_writers_through(db: Path) -> None:
    """A reader on an old snapshot keeps a RESTART checkpoint from finishing. Left to
    SQLite's busy handler, the pending RESTART held the write lock for all of RESTART_WAIT
    (every writer of every process waiting behind it); tried without one, again and again,
    it holds the lock only while it tries, so a writer gets through at once."""
    checkpointer = Checkpointer(db, every=1, restart_frames=1)
    waits = []
    with (
        closing(sqlite3.connect(db, isolation_level=None, timeout=0)) as writer,
        closing(sqlite3.connect(db, isolation_level=None)) as reader,
    ):
        writer.execute("PRAGMA wal_autocheckpoint=0")
        transaction(writer, _insert, write=True)
        reader.execute("BEGIN")
        _count(reader)
        transaction(writer, _insert, write=True)  # the reader's snapshot is now an old one
        try:
            checkpointer.committed()
            # Its worker thread starts; the RESTART then waits for the reader.
            await trio.sleep(RESTART_WAIT / 10)
            end = time.monotonic() + RESTART_WAIT / 2
            while time.monotonic() < end:
                started = time.monotonic()
                retry_busy(partial(transaction, writer, _insert, write=True), RESTART_WAIT)
                waits.append(time.monotonic() - started)
                await trio.sleep(RESTART_WAIT / 20)
            with trio.fail_after(5):
                await checkpointer.wait_idle()
        finally:
            reader.execute("COMMIT")
            await checkpointer.aclose()
    # The reader stayed for the whole turn: no rewind, and the writes went on meanwhile.
    assert checkpointer.done == 1
    assert checkpointer.restarts == 0
    assert len(waits) >= 5
    assert max(waits) < RESTART_WAIT / 4, waits


async def test_checkpoints_come_sooner_when_commits_are_large(db: Path) -> None:
    """Commits of many pages (a flood's group commits) would fill the log far past
    `restart_frames` between checkpoints counted in commits: the count halves while a
    checkpoint finds more than twice that, and comes back once commits are small again."""
    restart_frames, every = 200, 40
    checkpointer = Checkpointer(db, every=every, restart_frames=restart_frames)
    runner = InlineRunner.connect(db, checkpointer=checkpointer)

    def write_pages(pages: int) -> Callable[[sqlite3.Connection], object]:
        # A blob spills over `pages` overflow pages, each one frame in the log.
        return lambda conn: conn.execute("INSERT INTO t (n) VALUES (?)", (b"x" * 4000 * pages,))

    async def commit_until_checkpoint(pages: int) -> None:
        done = checkpointer.done
        while checkpointer.done == done:
            assert runner.run(write_pages(pages), write=True).done
            with trio.fail_after(5):
                await checkpointer.wait_idle()

    try:
        await commit_until_checkpoint(40)  # 40 commits of 40 pages: 1600 frames > 2 x 200
        assert checkpointer.every == every // 2
        await commit_until_checkpoint(40)  # 800 frames
        assert checkpointer.every == every // 4
        # The log was rewound: 10, then 20 commits of a page or two (fewer than 200 / 2).
        for _ in range(2):
            await commit_until_checkpoint(1)
        assert checkpointer.every == every
    finally:
        runner.close()
        await checkpointer.aclose()


def _journal_pragmas(conn: sqlite3.Connection) -> tuple[int, int]:
    return (
        conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
        conn.execute("PRAGMA journal_size_limit").fetchone()[0],
    )


@pytest.mark.parametrize(
    "connect",
    [
        pytest.param(lambda path: state_sqlite._connect(path, 1.0), id="state store"),
        pytest.param(broker_sqlite._connect, id="queue file"),
        pytest.param(lambda path: InlineRunner.connect(path)._conn, id="inline runner"),
    ],
)
def test_every_connection_leaves_checkpoints_to_the_checkpointer_and_caps_the_log(
    db: Path, connect: Callable[[Path], sqlite3.Connection | None]
) -> None:
    conn = connect(db)
    assert conn is not None
    with closing(conn):
        # SQLite's defaults are 1000 and -1 (no auto-checkpoint would be 0, no cap -1).
        assert _journal_pragmas(conn) == (0, JOURNAL_SIZE_LIMIT)


async def test_checkpointer_connection_caps_the_log(db: Path) -> None:
    checkpointer = Checkpointer(db, every=1)
    try:
        checkpointer.committed()
        await checkpointer.wait_idle()
        assert checkpointer.done == 1
        assert checkpointer._conn is not None
        assert _journal_pragmas(checkpointer._conn) == (0, JOURNAL_SIZE_LIMIT)
    finally:
        await checkpointer.aclose()


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
