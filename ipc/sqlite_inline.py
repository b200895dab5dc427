"""Short SQLite transactions run inline on trio's thread when they need not wait for a lock,
and the write-ahead log checkpointed in the background.

A hop to a worker thread and back (trio.to_thread.run_sync) costs about 70 us of CPU, while
a read in WAL mode takes about 4 us and a write that is not fsynced about 20 us. So the
embedded queue (and any store that wants it) first tries such a transaction on the event
loop's thread, on its own connection whose busy timeout is zero: when another connection
holds the lock, the attempt gives way at once and the caller takes its threaded path, which
waits for the lock. Nothing that fsyncs runs here: durable commits and checkpoints would
stall the loop for milliseconds.

No write pays for a checkpoint either (SQLite's auto-checkpoint runs inside the COMMIT that
crosses its threshold, 5 to 15 ms under load, which that commit's caller waited for): every
connection runs with wal_autocheckpoint=0, and a Checkpointer copies the log into the
database in a worker thread, on a connection of its own, once every COMMITS_PER_CHECKPOINT
commits of the process. A PASSIVE checkpoint takes no write lock, so writers go on meanwhile.

But SQLite rewinds the log to its start only when a write begins with the whole log copied,
and under a steady stream of writes from other connections a passive checkpoint never
catches up with the log's end: the log then grew by every commit, never reusing its space
(seen: the state file's log at 4.6 GB and a flooded channel's queue log at 1.8 GB in a
2.5-minute bench.isolation run), and every sync of a growing file also commits the file
system's journal, which all the gateway's files share. So once the log holds RESTART_FRAMES
frames, the checkpointer follows its passive checkpoint with a RESTART one, which takes the
write lock, waits for readers of the old log, copies what the passive one left (a few
frames), and lets the next write start the log over. A pending RESTART blocks every writer,
so it is tried without a busy handler, again and again for RESTART_WAIT at most: a try
holds the write lock only while it checks, copies and syncs, and writers go on between
tries. (With SQLite's busy handler, which sleeps 1, 2, 5, 10 ms between looks, a flooded
channel's RESTARTs of the state file took 14 ms at the median and up to 42 ms, some 180
times in a bench.isolation run, every writer of every process waiting meanwhile.)
Every connection also sets journal_size_limit, so that a log grown large once (before this,
or by a long lock) is cut back to JOURNAL_SIZE_LIMIT when it is next rewound.

Only one thread may use an InlineRunner: the trio thread that made the calls. A transaction
run here cannot be cancelled halfway (it is synchronous), which is what callers want.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Generic, TypeVar

import trio

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

T = TypeVar("T")

log = logging.getLogger(__name__)

#: A process's commits (inline or threaded) between two of its background checkpoints.
COMMITS_PER_CHECKPOINT: Final = 500
#: The fewest commits between two checkpoints (see Checkpointer).
MIN_COMMITS_PER_CHECKPOINT: Final = 10
#: Log frames (pages) from which a checkpoint also rewinds the log (16 MB of 4 KB pages).
RESTART_FRAMES: Final = 4096
#: Seconds a rewinding checkpoint keeps trying (for the write lock and for readers of the
#: old log to finish) before giving up until the next turn.
RESTART_WAIT: Final = 0.1
#: Bytes a rewound log is cut back to (PRAGMA journal_size_limit).
JOURNAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
#: Run by every connection of ours to a file in WAL mode (store, queue, inline runner and
#: checkpointer connections): no checkpoint inside a COMMIT (the Checkpointer does them),
#: and a rewound log cut back to JOURNAL_SIZE_LIMIT.
WAL_PRAGMAS: Final = ("wal_autocheckpoint=0", f"journal_size_limit={JOURNAL_SIZE_LIMIT}")

_BUSY_CODES: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
#: A threaded transaction finding the database locked by another process tries again after
#: BUSY_RETRY_MIN seconds, doubling up to BUSY_RETRY_MAX (see retry_busy). SQLite's own busy
#: handler sleeps 1, 2, 5, 10, ... up to 100 ms between tries, so a write behind a process
#: writing flat out (each of its transactions holding the lock for tens of microseconds)
#: waited tens of milliseconds.
BUSY_RETRY_MIN: Final = 0.0001
BUSY_RETRY_MAX: Final = 0.002


@dataclass(frozen=True, slots=True)
class Attempt(Generic[T]):
    """An inline attempt: `done` with its result, or not done (take the threaded path)."""

    done: bool = False
    result: T | None = None


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """The database is locked by another connection (not a fault: wait, or go elsewhere)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "locked" in str(exc) or "busy" in str(exc)
    return code & 0xFF in _BUSY_CODES


def transaction(
    conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], *, write: bool
) -> T:
    """`fn(conn)` in one transaction, rolled back if anything fails. IMMEDIATE when `write`:
    the write lock is taken up front, so a busy database fails at BEGIN rather than midway,
    when a read would have to be upgraded."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def retry_busy(fn: Callable[[], T], timeout: float) -> T:
    """`fn()`, tried again while the database is locked, for up to `timeout` seconds; for a
    connection whose own busy timeout is zero. Blocking: call it from a worker thread."""
    deadline = time.monotonic() + timeout
    delay = BUSY_RETRY_MIN
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, BUSY_RETRY_MAX)


class Checkpointer:
    """Checkpoints a database's write-ahead log in a worker thread, on a connection of its
    own, once every `every` commits it is told of (see the module docstring).

    A commit may add one frame or hundreds (a flooded channel's group commits carry dozens
    of messages), so `every` adapts to the log size each checkpoint finds: halved (down to
    MIN_COMMITS_PER_CHECKPOINT) while that is over twice `restart_frames`, doubled back (up
    to the `every` given) while under half of it. The log then stays near `restart_frames`,
    below JOURNAL_SIZE_LIMIT, rather than growing with the size of the commits."""

    def __init__(
        self,
        path: Path,
        *,
        every: int = COMMITS_PER_CHECKPOINT,
        restart_frames: int = RESTART_FRAMES,
    ) -> None:
        self._path = path
        self._max_every = every
        self._every = every
        self._restart_frames = restart_frames
        self._commits = 0
        self._conn: sqlite3.Connection | None = None
        #: Set when the running checkpoint ends; None while none runs.
        self._running: trio.Event | None = None
        self._closed = False
        #: Checkpoints completed, and those of them that rewound the log (for tests).
        self.done = 0
        self.restarts = 0

    def committed(self) -> None:
        """Count a commit, and start a checkpoint when one is due. Call on trio's thread."""
        self._commits += 1
        if self._commits < self._every or self._running is not None or self._closed:
            return
        self._commits = 0
        self._running = trio.Event()
        # A system task: the stores have no nursery, and their writers must not wait for it.
        trio.lowlevel.spawn_system_task(self._run, self._running)

    @property
    def every(self) -> int:
        """Commits between two checkpoints, as adapted so far."""
        return self._every

    async def _run(self, finished: trio.Event) -> None:
        try:
            frames = await trio.to_thread.run_sync(self._checkpoint)
            self.done += 1
            if frames > 2 * self._restart_frames:
                self._every = max(MIN_COMMITS_PER_CHECKPOINT, self._every // 2)
            elif frames < self._restart_frames // 2:
                self._every = min(self._max_every, self._every * 2)
        except sqlite3.Error as exc:
            # Another process checkpointing, a full or read-only disk: the writes themselves
            # report that; the next turn tries again.
            log.debug("checkpoint of %s skipped: %s", self._path, exc)
        finally:
            self._running = None
            finished.set()

    def _checkpoint(self) -> int:
        """Returns the frames the log held."""
        conn = self._conn
        if conn is None:
            conn = self._conn = sqlite3.connect(
                self._path, timeout=0, isolation_level=None, check_same_thread=False
            )
            for pragma in WAL_PRAGMAS:
                conn.execute(f"PRAGMA {pragma}")
        _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames < self._restart_frames:
            return int(frames)
        if self._restart(conn):
            self.restarts += 1
        else:
            log.debug("log of %s not rewound: busy for %.1f s", self._path, RESTART_WAIT)
        return int(frames)

    @staticmethod
    def _restart(conn: sqlite3.Connection) -> bool:
        """RESTART tries, on a connection whose busy timeout is zero, until one rewinds the
        log (True) or RESTART_WAIT has passed; a try that finds readers or a writer in the
        way does what a passive checkpoint would and lets go of the write lock."""

        def attempt() -> None:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            if busy:
                # The pragma answers a busy flag, not an error: made one for retry_busy.
                raise sqlite3.OperationalError("database is busy")

        try:
            retry_busy(attempt, RESTART_WAIT)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            return False
        return True

    async def wait_idle(self) -> None:
        """Return once no checkpoint runs."""
        if self._running is not None:
            await self._running.wait()

    async def aclose(self) -> None:
        """Wait for a running checkpoint, then close the connection; no more start."""
        self._closed = True
        await self.wait_idle()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class InlineRunner:
    """One connection for inline transactions; see the module docstring."""

    def __init__(self, conn: sqlite3.Connection, checkpointer: Checkpointer | None = None) -> None:
        self._conn: sqlite3.Connection | None = conn
        #: Told of every inline commit.
        self.checkpointer = checkpointer

    @classmethod
    def connect(
        cls, path: Path, *, pragmas: tuple[str, ...] = (), checkpointer: Checkpointer | None = None
    ) -> InlineRunner:
        """Open the (existing) database file; blocking, so call it from a worker thread.

        `pragmas` are run after ours (synchronous=NORMAL, WAL_PRAGMAS), e.g.
        "foreign_keys=ON". `checkpointer` is told of every commit.
        """
        # timeout=0: a locked database answers SQLITE_BUSY at once instead of blocking.
        conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            for pragma in ("synchronous=NORMAL", *WAL_PRAGMAS, *pragmas):
                conn.execute(f"PRAGMA {pragma}")
        except BaseException:
            conn.close()
            raise
        return cls(conn, checkpointer)

    def run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> Attempt[T]:
        """`fn` in a transaction (BEGIN IMMEDIATE when `write`), unless it would have to wait.

        Not done when the database is locked and when this runner is closed. Any other
        sqlite3.Error propagates (rolled back).
        """
        conn = self._conn
        if conn is None:
            return Attempt()
        try:
            result = transaction(conn, fn, write=write)
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                return Attempt()
            raise
        if write and self.checkpointer is not None:
            self.checkpointer.committed()
        return Attempt(done=True, result=result)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
