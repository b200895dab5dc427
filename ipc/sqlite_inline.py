"""Short SQLite transactions run inline on trio's thread when they need not wait for a lock.

A hop to a worker thread and back (trio.to_thread.run_sync) costs about 70 us of CPU, while
a read in WAL mode takes about 4 us and a write that is not fsynced about 20 us. So the
embedded queue (and any store that wants it) first tries such a transaction on the event
loop's thread, on its own connection whose busy timeout is zero: when another connection
holds the lock, the attempt gives way at once and the caller takes its threaded path, which
waits for the lock. Nothing that fsyncs runs here: durable commits and checkpoints would
stall the loop for milliseconds, so this connection never checkpoints, and after
COMMITS_PER_CHECKPOINT inline commits one write is sent down the threaded path, whose
connection checkpoints the WAL as SQLite's auto-checkpoint does.

Only one thread may use an InlineRunner: the trio thread that made the calls. A transaction
run here cannot be cancelled halfway (it is synchronous), which is what callers want.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

T = TypeVar("T")

#: Inline commits between two writes sent down the threaded (checkpointing) path.
COMMITS_PER_CHECKPOINT: Final = 500

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


class InlineRunner:
    """One connection for inline transactions; see the module docstring."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._commits = 0

    @classmethod
    def connect(cls, path: Path, *, pragmas: tuple[str, ...] = ()) -> InlineRunner:
        """Open the (existing) database file; blocking, so call it from a worker thread.

        `pragmas` are run after ours (synchronous=NORMAL, no auto-checkpoint), e.g.
        "foreign_keys=ON".
        """
        # timeout=0: a locked database answers SQLITE_BUSY at once instead of blocking.
        conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            for pragma in ("synchronous=NORMAL", "wal_autocheckpoint=0", *pragmas):
                conn.execute(f"PRAGMA {pragma}")
        except BaseException:
            conn.close()
            raise
        return cls(conn)

    def run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> Attempt[T]:
        """`fn` in a transaction (BEGIN IMMEDIATE when `write`), unless it would have to wait.

        Not done when the database is locked, when this runner is closed, and for one write
        in COMMITS_PER_CHECKPOINT. Any other sqlite3.Error propagates (rolled back).
        """
        conn = self._conn
        if conn is None:
            return Attempt()
        if write and self._commits >= COMMITS_PER_CHECKPOINT:
            self._commits = 0
            return Attempt()
        try:
            result = transaction(conn, fn, write=write)
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                return Attempt()
            raise
        if write:
            self._commits += 1
        return Attempt(done=True, result=result)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
