"""Durable queues in one SQLite file (WAL), shared by every local process: the embedded
Broker keeps one per queue owner (ipc/broker_embedded.py).

API workers publish, a channel process consumes. A message is a row; a consumer claims rows,
`ack` deletes them, and rows claimed by a consumer that went away (kill -9 included) come back.
A publish rings the doorbells (Unix datagram sockets) of other processes' consumers of its
queue, so they wake at once; polling remains the fallback when a ring is lost.

Two connections per broker. Reads and the writes that need no fsync (claims, acks, nacks,
heartbeats) are first tried inline on the event loop's thread (ipc/sqlite_inline.py: tens of
microseconds instead of a ~70 us thread hop). When the database is locked they, and the
durable writes (publishes: their fsync must not stall the loop), run in a worker thread on
the other connection, which waits for the lock (BUSY_TIMEOUT) and group-commits every write
pending meanwhile; except that a process draining a backlog commits its batches inline and
only syncs in the thread (see SqliteBroker._commit_inline).

A durable commit syncs the write-ahead log after COMMIT, once the write lock is released,
rather than inside it (synchronous=FULL): the lock is shared by every process, and a sync
takes milliseconds, so under FULL one channel publishing events flat out kept the API's
publishes for other channels waiting. The caller still hears of success only after the sync.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import socket
import sqlite3
import sys
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar, cast

import trio

from ipc.broker import Broker, Consumer, Delivery
from ipc.errors import BrokerUnavailableError
from ipc.sqlite_inline import WAL_PRAGMAS, Attempt, Checkpointer, InlineRunner, retry_busy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable
    from pathlib import Path

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Seconds a write waits for another process's write lock before BrokerUnavailableError.
BUSY_TIMEOUT: Final = 5.0
#: SQLite has no cross-process change notification. Publishers ring the consumers' doorbells
#: (below). A consumer without one (doorbells unavailable) polls, quickly after traffic,
#: backing off to POLL_MAX when idle.
POLL_MIN: Final = 0.005
POLL_MAX: Final = 0.1
#: The poll of a consumer with a doorbell, which only a lost ring waits for (every publish
#: and release rings), so it keeps this pace even right after traffic: polling 10 times a
#: second per consumer would cost a gateway of 50 idle channels most of a core, and polling
#: quickly after each delivery (with the empty claim, see _claim) cost a channel sending
#: 50 messages a second a sixth of its CPU.
DOORBELL_POLL_MAX: Final = 1.0
#: Doorbells are Unix datagram sockets in Linux's abstract namespace: no path-length limit,
#: nothing left on disk by a killed process, and a missing one refuses at once.
DOORBELLS_AVAILABLE: Final = sys.platform == "linux"
#: A waiting consumer refreshes its heartbeat (and reclaims dead consumers' rows) this often.
HEARTBEAT_INTERVAL: Final = 5.0
#: A consumer whose heartbeat is older than this is presumed dead even if its pid exists
#: (pid reused, another host, or a process that stopped receiving and acking). Heartbeats
#: are written from receive() and ack()/nack(), so a consumer must call one of them this often.
STALE_AFTER: Final = 60.0

_HOST: Final = socket.gethostname()

# `consumer` is NULL while a row is ready; AUTOINCREMENT keeps ids rising so `id` is FIFO order.
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY, max_priority INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL, priority INTEGER NOT NULL, body BLOB NOT NULL,
    consumer INTEGER, deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, consumer, priority DESC, id);
CREATE INDEX IF NOT EXISTS messages_claimed ON messages (consumer);
CREATE TABLE IF NOT EXISTS consumers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL, heartbeat REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS consumers_queue ON consumers (queue);
"""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- statements (run in a worker thread, inside the caller's transaction) -----------------


def _declare(conn: sqlite3.Connection, queue: str, max_priority: int) -> None:
    # Like AMQP, the first declaration's arguments stick.
    conn.execute(
        "INSERT OR IGNORE INTO queues (name, max_priority) VALUES (?, ?)",
        (queue, max(0, max_priority)),
    )


def _consumers_of(conn: sqlite3.Connection, queue: str) -> list[int]:
    return [row[0] for row in conn.execute("SELECT id FROM consumers WHERE queue = ?", (queue,))]


def _insert(conn: sqlite3.Connection, queue: str, body: bytes, priority: int) -> list[int]:
    """Enqueue; returns the queue's registered consumers (whose doorbells to ring)."""
    _declare(conn, queue, 0)
    # Priorities are clamped to the queue's max_priority, as RabbitMQ does (0 when undeclared).
    conn.execute(
        "INSERT INTO messages (queue, priority, body) VALUES "
        "(?, MIN(MAX(?, 0), (SELECT max_priority FROM queues WHERE name = ?)), ?)",
        (queue, priority, queue, body),
    )
    return _consumers_of(conn, queue)


def _has_ready(conn: sqlite3.Connection, queue: str) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM messages WHERE queue = ? AND consumer IS NULL)", (queue,)
    ).fetchone()
    return bool(row[0])


def _claim(conn: sqlite3.Connection, consumer: int, queue: str, limit: int) -> list[Delivery]:
    rows = conn.execute(
        "UPDATE messages SET consumer = ?, deliveries = deliveries + 1 WHERE id IN "
        "(SELECT id FROM messages WHERE queue = ? AND consumer IS NULL "
        "ORDER BY priority DESC, id LIMIT ?) "
        "RETURNING id, body, deliveries, priority",
        (consumer, queue, limit),
    ).fetchall()
    # RETURNING gives no order guarantee.
    rows.sort(key=lambda r: (-r[3], r[0]))
    return [Delivery(body=bytes(r[1]), tag=r[0], redelivered=r[2] > 1) for r in rows]


def _settle(conn: sqlite3.Connection, consumer: int, tag: int, *, requeue: bool) -> None:
    # The consumer check makes a late ack of a row reclaimed from us a no-op.
    if requeue:
        conn.execute(
            "UPDATE messages SET consumer = NULL WHERE id = ? AND consumer = ?", (tag, consumer)
        )
    else:
        conn.execute("DELETE FROM messages WHERE id = ? AND consumer = ?", (tag, consumer))


def _release(conn: sqlite3.Connection, consumer: int) -> None:
    conn.execute("UPDATE messages SET consumer = NULL WHERE consumer = ?", (consumer,))
    conn.execute("DELETE FROM consumers WHERE id = ?", (consumer,))


def _leave(conn: sqlite3.Connection, consumer: int, queue: str) -> list[int]:
    """Release a consumer's rows and unregister it; returns the queue's other consumers."""
    released = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM messages WHERE consumer = ?)", (consumer,)
    ).fetchone()[0]
    _release(conn, consumer)
    return _consumers_of(conn, queue) if released else []


@dataclass(frozen=True, slots=True)
class _Reclaimed:
    """What a reclaim found: how many consumers were dead, and whom to ring for their rows
    (the remaining consumers of their queues)."""

    dead: int = 0
    ring: tuple[int, ...] = ()


def _reclaim_dead(conn: sqlite3.Connection) -> _Reclaimed:
    """Release the rows of consumers whose process is gone."""
    now = time.time()
    dead = [
        (cid, queue)
        for cid, queue, pid, host, beat in conn.execute(
            "SELECT id, queue, pid, host, heartbeat FROM consumers"
        )
        if now - beat > STALE_AFTER or (host == _HOST and not _pid_alive(pid))
    ]
    for cid, _ in dead:
        _release(conn, cid)
    queues = {queue for _, queue in dead}
    ring = tuple(cid for queue in sorted(queues) for cid in _consumers_of(conn, queue))
    return _Reclaimed(len(dead), ring)


def _open_consumer(conn: sqlite3.Connection, queue: str) -> tuple[int, _Reclaimed]:
    """Declare the queue, reclaim dead consumers' rows, register: (consumer id, reclaimed)."""
    _declare(conn, queue, 0)
    reclaimed = _reclaim_dead(conn)
    cur = conn.execute(
        "INSERT INTO consumers (queue, pid, host, heartbeat) VALUES (?, ?, ?, ?)",
        (queue, os.getpid(), _HOST, time.time()),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid, reclaimed


def _beat(conn: sqlite3.Connection, consumer: int) -> tuple[bool, _Reclaimed]:
    """Refresh our heartbeat and reclaim dead consumers' rows: (still registered, reclaimed).

    Not registered means another process presumed us dead and released our rows.
    """
    cur = conn.execute("UPDATE consumers SET heartbeat = ? WHERE id = ?", (time.time(), consumer))
    return cur.rowcount == 1, _reclaim_dead(conn)


# --- the broker -----------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Write:
    fn: Callable[[sqlite3.Connection], object]
    durable: bool
    done: bool = False
    result: object = None
    error: sqlite3.Error | None = None


@dataclass(slots=True)
class _Arrivals:
    """Wakes this broker's consumers when it publishes or releases rows of their queue.

    A consumer notes the queue's generation before it claims and waits only if it is
    unchanged, so a publish made while it was claiming is never slept through.
    """

    generations: dict[str, int] = field(default_factory=dict)
    #: The wait scopes of consumers idle on each queue; a notify cancels them.
    waiting: dict[str, set[trio.CancelScope]] = field(default_factory=dict)

    def generation(self, queue: str) -> int:
        return self.generations.get(queue, 0)

    def notify(self, queue: str) -> None:
        self.generations[queue] = self.generation(queue) + 1
        for scope in self.waiting.get(queue, ()):
            scope.cancel()

    def notify_all(self) -> None:
        for queue in set(self.generations) | set(self.waiting):
            self.notify(queue)


def _doorbell_prefix(path: Path) -> str:
    """Addresses of a queue file's doorbells: one per consumer id (unique within the file)."""
    digest = hashlib.blake2b(os.fsencode(os.path.realpath(path)), digest_size=12).hexdigest()
    return f"\0junebug-bell/{digest}/"


class _Doorbell:
    """A consumer's datagram socket: any byte received means "look at the queue again"."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def open(cls, address: str) -> _Doorbell | None:
        """Bind the doorbell; None (the consumer only polls) when that is not possible."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            log.debug("no doorbell at %r (polling only): %s", address, exc)
            return None
        return cls(sock)

    def drain(self) -> None:
        """Forget the rings so far (called before looking at the queue)."""
        with contextlib.suppress(BlockingIOError):
            while self._sock.recv(64):
                pass

    async def wait(self) -> None:
        await trio.lowlevel.wait_readable(self._sock)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()


class _Ringer:
    """Rings other consumers' doorbells; never blocks and never fails the caller."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def ring(self, consumer_ids: list[int]) -> None:
        for consumer_id in consumer_ids:
            # Refused: that consumer is gone (or has no doorbell); would block: its doorbell
            # already holds unread rings. Either way polling covers it, so errors are ignored.
            with contextlib.suppress(OSError):
                self._sock.sendto(b"\1", self._prefix + str(consumer_id))

    def close(self) -> None:
        self._sock.close()


class SqliteBroker(Broker):
    """`conn` is used by one worker thread at a time (under `_lock`); `inline`, which never
    waits for a lock, only on the event loop's thread (see the module docstring)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        inline: InlineRunner | None = None,
        doorbell_prefix: str | None = None,
        poll_min: float = POLL_MIN,
        poll_max: float = POLL_MAX,
        wal_fd: int | None = None,
    ) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._inline = inline
        self._checkpointer = inline.checkpointer if inline is not None else None
        #: The write-ahead log, synced after durable commits; None: commit with FULL instead.
        self._wal_fd = wal_fd
        self._lock = trio.Lock()
        self._pending: list[_Write] = []
        self._linger = 0.0
        self._arrivals = _Arrivals()
        self.poll_min = poll_min
        self.poll_max = max(poll_max, poll_min)
        self.doorbell_poll_max = max(self.poll_max, DOORBELL_POLL_MAX)
        self._doorbell_prefix = doorbell_prefix
        self._ringer = _Ringer(doorbell_prefix) if doorbell_prefix is not None else None
        #: This broker's consumers: woken by `_arrivals`, so never rung.
        self._own: set[int] = set()

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        doorbells: bool = True,
        poll_min: float = POLL_MIN,
        poll_max: float = POLL_MAX,
    ) -> SqliteBroker:
        """Open (creating it if needed) the queue file.

        doorbells=False leaves cross-process wake-ups to polling alone (and its publishes
        ring nobody). A waiting consumer without a doorbell looks at its queue after
        `poll_min` seconds, doubling up to `poll_max` while idle; one with a doorbell every
        max(`poll_max`, DOORBELL_POLL_MAX) seconds.
        """
        # Processes often open a new file together (the API's first publish to a channel and
        # the channel's consumer): setting up WAL mode can then answer "locked" at once.
        try:
            conn = await trio.to_thread.run_sync(
                retry_busy, functools.partial(_connect, path), BUSY_TIMEOUT
            )
        except (OSError, sqlite3.Error) as exc:
            raise BrokerUnavailableError(
                f"cannot open the embedded queue at {path}: {exc}"
            ) from exc
        try:
            inline = await trio.to_thread.run_sync(
                retry_busy,
                functools.partial(InlineRunner.connect, path, checkpointer=Checkpointer(path)),
                BUSY_TIMEOUT,
            )
        except (OSError, sqlite3.Error) as exc:
            conn.close()
            raise BrokerUnavailableError(
                f"cannot open the embedded queue at {path}: {exc}"
            ) from exc
        prefix = _doorbell_prefix(path) if doorbells and DOORBELLS_AVAILABLE else None
        wal_fd = await trio.to_thread.run_sync(_open_wal, path)
        return cls(
            conn,
            inline=inline,
            doorbell_prefix=prefix,
            poll_min=poll_min,
            poll_max=poll_max,
            wal_fd=wal_fd,
        )

    def _ring(self, consumer_ids: Iterable[int]) -> None:
        if self._ringer is not None:
            self._ringer.ring([cid for cid in consumer_ids if cid not in self._own])

    def _reclaimed(self, reclaimed: _Reclaimed) -> None:
        """Wake whoever may now claim rows released from dead consumers."""
        if reclaimed.dead:
            self._arrivals.notify_all()
            self._ring(reclaimed.ring)

    # --- database access ----------------------------------------------------------------

    def _try_inline(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> Attempt[T]:
        """Run `fn` inline if it need not wait (see ipc/sqlite_inline.py). The caller then
        yields with `cancel_shielded_checkpoint`: other tasks get their turn, and a result
        already committed is never lost to a cancellation."""
        if self._inline is None or self._conn is None:
            return Attempt()
        try:
            return self._inline.run(fn, write=write)
        except sqlite3.Error as exc:
            raise BrokerUnavailableError(f"embedded queue operation failed: {exc}") from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # Trio's pattern for work done synchronously: honour a pending cancellation first,
        # then yield without raising, so what was committed is never lost to one.
        await trio.lowlevel.checkpoint_if_cancelled()
        inline = self._try_inline(fn, write=False)
        if inline.done:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return cast("T", inline.result)
        async with self._lock:
            conn = self._open_conn()
            try:
                return await trio.to_thread.run_sync(
                    retry_busy, functools.partial(fn, conn), BUSY_TIMEOUT
                )
            except sqlite3.Error as exc:
                raise BrokerUnavailableError(f"embedded queue read failed: {exc}") from exc

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run `fn` in a write transaction, committed together with other tasks' pending writes.

        Group commit: whoever holds the lock commits every queued write in one transaction
        (one fsync), so concurrent publishers do not each pay for a sync. `durable=False`
        skips the fsync when losing the write to a power cut only causes a redelivery
        (claims, acks): it still survives a crash of the process.

        Cancellation: a write cancelled before its batch started is dropped; once started it
        commits (a cancelled publish may still arrive). A write that is not durable is first
        tried inline, which a cancellation cannot interrupt, unless writes linger
        (set_write_linger): then every write waits that long for others to join its batch.
        """
        if not durable and self._linger <= 0:
            await trio.lowlevel.checkpoint_if_cancelled()
            inline = self._try_inline(fn, write=True)
            if inline.done:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return cast("T", inline.result)
        op = _Write(fn, durable)
        self._pending.append(op)
        try:
            async with self._lock:
                if not op.done and self._linger > 0:
                    await trio.sleep(self._linger)
                if not op.done:
                    conn = self._open_conn()
                    batch, self._pending = self._pending, []
                    if not await self._commit_inline(batch):
                        await trio.to_thread.run_sync(_commit, conn, batch, self._wal_fd)
                        if self._checkpointer is not None:
                            self._checkpointer.committed()
        except BaseException:
            # Cancelled (or closed) before any batch took it: it never runs.
            if op in self._pending:
                self._pending.remove(op)
            raise
        if op.error is not None:
            raise BrokerUnavailableError(f"embedded queue write failed: {op.error}") from op.error
        return cast("T", op.result)

    async def _commit_inline(self, batch: list[_Write]) -> bool:
        """While writes linger, commit `batch` on trio's thread, then sync the log in a
        worker thread; False (nothing done) when they do not, when the database is locked,
        or when the log cannot be synced by hand.

        A lingering process is draining a backlog, and its batches are what every other
        process's publishes wait for. Run in a worker thread, the statements had to win the
        GIL back from the busy event loop after each one (up to the 5 ms switch interval
        each): the write lock was held for 3.5 ms per batch (median), inline for a tenth of
        that. Otherwise the worker thread is kept: its statements run beside the event loop,
        and a channel's own inbound rate was higher so (MO queued 1,300-1,500/s against
        1,000-1,080/s inline).
        """
        wal_fd, inline = self._wal_fd, self._inline
        if wal_fd is None or inline is None or self._linger <= 0:
            return False
        error: sqlite3.Error | None = None
        try:
            attempt = inline.run(lambda conn: _execute(conn, batch), write=True)
            if not attempt.done:
                return False
            if any(op.durable for op in batch):
                await trio.to_thread.run_sync(_sync_log, wal_fd)
        except sqlite3.Error as exc:
            # Rolled back, or committed but not known durable: as on the threaded path.
            error = exc
        _finish(batch, error)
        return True

    def _open_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BrokerUnavailableError("the embedded queue is closed")
        return self._conn

    # --- Broker -------------------------------------------------------------------------

    def set_write_linger(self, seconds: float) -> None:
        self._linger = seconds

    async def declare_queue(self, queue: str, *, max_priority: int = 0) -> None:
        await self._write(functools.partial(_declare, queue=queue, max_priority=max_priority))

    async def publish(self, queue: str, body: bytes, *, priority: int = 0) -> None:
        consumers = await self._write(
            functools.partial(_insert, queue=queue, body=body, priority=priority)
        )
        self._arrivals.notify(queue)
        self._ring(consumers)

    @asynccontextmanager
    async def consume(self, queue: str, *, prefetch: int) -> AsyncIterator[Consumer]:
        """Register a consumer (pid + heartbeat), after reclaiming dead consumers' rows.

        On exit its claimed, unacked rows are released (delivered again, redelivered=True).
        """
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        consumer_id, reclaimed = await self._write(functools.partial(_open_consumer, queue=queue))
        self._own.add(consumer_id)
        self._reclaimed(reclaimed)
        doorbell = None
        if self._doorbell_prefix is not None:
            doorbell = _Doorbell.open(self._doorbell_prefix + str(consumer_id))
        consumer = _SqliteConsumer(self, consumer_id, queue, prefetch, doorbell)
        # A system task rather than a nursery here: a nursery would wrap the consume block's
        # own exceptions in ExceptionGroups for every caller.
        trio.lowlevel.spawn_system_task(consumer.keep_alive, name=f"heartbeat {queue}")
        try:
            yield consumer
        finally:
            consumer.closed = True
            if doorbell is not None:
                doorbell.close()
            # A failed release is recovered by others once our heartbeat goes stale.
            with trio.move_on_after(2, shield=True), contextlib.suppress(BrokerUnavailableError):
                others = await self._write(
                    functools.partial(_leave, consumer=consumer_id, queue=queue), durable=False
                )
                self._arrivals.notify(queue)
                self._ring(others)
            self._own.discard(consumer_id)

    async def queue_length(self, queue: str) -> int:
        def count(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT COUNT(*) FROM messages WHERE queue = ? AND consumer IS NULL", (queue,)
            ).fetchone()
            return int(row[0])

        return await self._read(count)

    async def delete_queue(self, queue: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM messages WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM queues WHERE name = ?", (queue,))

        await self._write(delete)

    async def is_empty(self) -> bool:
        """No queue declared and no message kept (consumers are not counted)."""

        def empty(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT NOT EXISTS (SELECT 1 FROM queues) AND NOT EXISTS (SELECT 1 FROM messages)"
            ).fetchone()
            return bool(row[0])

        return await self._read(empty)

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            inline, self._inline = self._inline, None
            if inline is not None:
                inline.close()
            if self._checkpointer is not None:
                await self._checkpointer.aclose()
            if conn is not None:
                await trio.to_thread.run_sync(conn.close)
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
            if self._ringer is not None:
                self._ringer.close()
                self._ringer = None


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE) so a write never has
    # to upgrade a read lock, which deadlocks between processes.
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL journal mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        for pragma in WAL_PRAGMAS:
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("COMMIT")
        # From now on a locked database answers at once, and retry_busy waits (see
        # BUSY_RETRY_MIN).
        conn.execute("PRAGMA busy_timeout=0")
    except BaseException:
        conn.close()
        raise
    return conn


def _open_wal(path: Path) -> int | None:
    """A descriptor of the queue file's write-ahead log, to sync it; None if unavailable.

    The log exists while a connection is open (ours are, until aclose) and SQLite reuses it
    (a checkpoint rewinds it, never replaces it), so this descriptor stays the right file.
    """
    if not hasattr(os, "fdatasync"):
        return None
    try:
        return os.open(f"{path}-wal", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        log.warning("cannot open the queue's write-ahead log (syncing under the lock): %s", exc)
        return None


def _commit(conn: sqlite3.Connection, batch: list[_Write], wal_fd: int | None = None) -> None:
    # Anything else than a commit fails every write of the batch; a bug still propagates
    # to the task that ran the batch.
    error: sqlite3.Error | None = sqlite3.OperationalError("the write batch was aborted")
    try:
        # A durable commit survives power loss, as a RabbitMQ confirm does: synced after
        # COMMIT, outside the write lock (see the module docstring), or with FULL when the
        # log cannot be synced by hand. Syncing the log also syncs every earlier NORMAL
        # commit; and frames a checkpoint already moved to the database were synced by it
        # (in WAL mode NORMAL syncs the log before a checkpoint and the database after).
        durable = any(op.durable for op in batch)
        sync_after = durable and wal_fd is not None
        full = durable and not sync_after
        conn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
        retry_busy(functools.partial(conn.execute, "BEGIN IMMEDIATE"), BUSY_TIMEOUT)
        try:
            _execute(conn, batch)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if sync_after:
            assert wal_fd is not None
            _sync_log(wal_fd)
        error = None
    except sqlite3.Error as exc:
        error = exc
    finally:
        _finish(batch, error)


def _sync_log(wal_fd: int) -> None:
    """Sync the write-ahead log after a durable COMMIT (blocking: a worker thread's job)."""
    try:
        os.fdatasync(wal_fd)
    except OSError as exc:
        # Committed but not known durable: failing the publish makes its sender try again
        # (a possible duplicate, never a loss).
        raise sqlite3.OperationalError(f"syncing the write-ahead log failed: {exc}") from exc


def _execute(conn: sqlite3.Connection, batch: list[_Write]) -> None:
    """Run a write batch's statements (inside the caller's transaction)."""
    for op in batch:
        op.result = op.fn(conn)


def _finish(batch: list[_Write], error: sqlite3.Error | None) -> None:
    for op in batch:
        op.error = error
        op.done = True


class _SqliteConsumer(Consumer):
    def __init__(
        self,
        broker: SqliteBroker,
        consumer_id: int,
        queue: str,
        prefetch: int,
        doorbell: _Doorbell | None,
    ) -> None:
        self._broker = broker
        self._id = consumer_id
        self._queue = queue
        self._prefetch = prefetch
        self._doorbell = doorbell
        self._buffer: deque[Delivery] = deque()
        #: Claimed and not yet acked/nacked, buffered ones included: at most `prefetch`.
        self._unacked: set[int] = set()
        self._claiming = trio.Lock()
        self._settled = trio.Event()
        self._next_heartbeat = trio.current_time() + HEARTBEAT_INTERVAL
        #: The arrivals generation of a claim that took every ready row (doorbell only).
        self._emptied_at: int | None = None
        self.closed = False

    async def receive(self) -> Delivery:
        interval = self._first_wait()
        polled = False
        while True:
            if self.closed:
                raise BrokerUnavailableError("the consumer is closed")
            if self._buffer:
                return self._buffer.popleft()
            await self._heartbeat_if_due()
            if len(self._unacked) >= self._prefetch:
                settled = self._settled
                with trio.move_on_after(HEARTBEAT_INTERVAL):
                    await settled.wait()
                continue
            if self._emptied_at is not None:
                # The last claim left no ready row: anything since rang or moved `seen`.
                seen, self._emptied_at = self._emptied_at, None
            else:
                seen = self._broker._arrivals.generation(self._queue)
                if self._doorbell is not None:
                    # Before the claim: a ring for a publish the claim misses stays unread.
                    self._doorbell.drain()
                if await self._claim(check_first=polled, seen=seen):
                    interval, polled = self._first_wait(), False
                    continue
            polled = not await self._wait_for_arrival(seen, interval)
            interval = self._next_interval(interval, polled=polled)

    def _first_wait(self) -> float:
        """How long an empty queue is left before the first poll (see DOORBELL_POLL_MAX)."""
        broker = self._broker
        return broker.poll_min if self._doorbell is None else broker.doorbell_poll_max

    def _next_interval(self, interval: float, *, polled: bool) -> float:
        """Without a doorbell, back off while polling finds nothing and start over once
        woken; with one, keep the idle pace."""
        if self._doorbell is not None or not polled:
            return self._first_wait()
        return min(interval * 2, self._broker.poll_max)

    async def _wait_for_arrival(self, seen: int, interval: float) -> bool:
        """Wait for a publish (ours, or a ring from another process) or `interval` seconds.

        True when something arrived; False when the time ran out (the caller polls).
        """
        arrivals = self._broker._arrivals
        if arrivals.generation(self._queue) != seen:
            return True
        with trio.move_on_after(interval) as scope:
            waiting = arrivals.waiting.setdefault(self._queue, set())
            waiting.add(scope)
            try:
                if self._doorbell is None:
                    await trio.sleep_forever()
                await self._doorbell.wait()
            except trio.ClosedResourceError:
                # The consume block ended (closing the doorbell) under a receive.
                raise BrokerUnavailableError("the consumer is closed") from None
            finally:
                waiting.discard(scope)
                if not waiting:
                    del arrivals.waiting[self._queue]
            return True
        return arrivals.generation(self._queue) != seen

    async def _claim(self, *, check_first: bool, seen: int) -> bool:
        """Claim ready rows into the buffer; False when there were none. `seen`: the arrivals
        generation read before it (and before the doorbell was drained)."""
        async with self._claiming:
            room = self._prefetch - len(self._unacked)
            if room <= 0 or self._buffer:
                return bool(self._buffer)
            # A poll reads before claiming so idle consumers never take the write lock.
            if check_first and not await self._broker._read(
                functools.partial(_has_ready, queue=self._queue)
            ):
                return False
            # Shielded (bounded by BUSY_TIMEOUT) so that rows claimed in the database are
            # never missing from our buffer because a cancellation lost the result.
            with trio.CancelScope(shield=True):
                claimed = await self._broker._write(
                    functools.partial(_claim, consumer=self._id, queue=self._queue, limit=room),
                    durable=False,
                )
            self._unacked.update(d.tag for d in claimed)
            self._buffer.extend(claimed)
            if claimed and len(claimed) < room and self._doorbell is not None:
                # Once the buffer is used up, wait for a ring rather than claim again at once:
                # an empty claim takes the queue file's write lock, once per message
                # for a consumer that keeps up with its queue.
                self._emptied_at = seen
            return bool(claimed)

    async def _heartbeat_if_due(self) -> None:
        if trio.current_time() < self._next_heartbeat:
            return
        self._next_heartbeat = trio.current_time() + HEARTBEAT_INTERVAL
        registered, reclaimed = await self._broker._write(
            functools.partial(_beat, consumer=self._id), durable=False
        )
        self._broker._reclaimed(reclaimed)
        if not registered:
            self.closed = True
            raise BrokerUnavailableError(
                "this consumer was presumed dead and its messages released"
            )

    async def keep_alive(self) -> None:
        """Beat while the consumer is open, even when its user calls nothing for a while (a
        webhook forwarder holding its prefetch through a long outage): without this, after
        STALE_AFTER seconds another consumer would release our messages and we would have to
        start over. Failures are left to the next beat or to receive()/ack(), which report
        them; nothing may escape a system task."""
        try:
            while True:
                await trio.sleep(HEARTBEAT_INTERVAL)
                if self.closed:
                    return
                try:
                    await self._heartbeat_if_due()
                except BrokerUnavailableError as exc:
                    log.warning("heartbeat of consumer %s failed: %s", self._id, exc)
        except trio.Cancelled:
            return
        except Exception:  # a system task's exception would end the whole run
            log.exception("heartbeat task of consumer %s failed", self._id)

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(delivery, requeue=False)

    async def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        await self._settle(delivery, requeue=requeue)
        if requeue:
            self._broker._arrivals.notify(self._queue)

    async def _settle(self, delivery: Delivery, *, requeue: bool) -> None:
        # Settling twice is a no-op here; in AMQP it would kill the channel.
        if delivery.tag not in self._unacked:
            return
        await self._heartbeat_if_due()
        # Shielded (bounded by BUSY_TIMEOUT) so `_unacked` always matches the database.
        with trio.CancelScope(shield=True):
            await self._broker._write(
                functools.partial(_settle, consumer=self._id, tag=delivery.tag, requeue=requeue),
                durable=False,
            )
        self._unacked.discard(delivery.tag)
        self._settled.set()
        self._settled = trio.Event()
