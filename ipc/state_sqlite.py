"""The embedded StateStore: one SQLite file in WAL mode, shared by every local process.

Each store holds one connection used by one worker thread at a time; every read is one
short transaction, and writes are group-committed: those that tasks of one process have
ready at the same moment go in one transaction (ipc/group_commit.py). TTLs are
`expires_at` columns (epoch seconds).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import time
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import outcome
import trio

from ipc.errors import StoreUnavailableError
from ipc.group_commit import GroupCommit
from ipc.sqlite_inline import (
    WAL_PRAGMAS,
    Attempt,
    Checkpointer,
    InlineRunner,
    retry_busy,
    transaction,
)
from ipc.state import (
    JsonObject,
    KvEntry,
    OutboundRecord,
    OutboundWrites,
    RateCount,
    StateStore,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from ipc.names import Namespace

T = TypeVar("T")

SCHEMA_VERSION: Final = 2
#: Seconds a write waits for another process's write lock before StoreUnavailableError.
BUSY_TIMEOUT: Final = 5.0
#: Expired rows are deleted at most this often (seconds) per store, after a write.
PURGE_INTERVAL: Final = 30.0

# Every table is keyed by `ns` first so namespaces never see each other's rows.
# Events hang off their outbound row (ON DELETE CASCADE) and share its expiry;
# their rowid gives insertion order.
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS channels (
    ns TEXT NOT NULL, channel_id TEXT NOT NULL, properties TEXT NOT NULL,
    PRIMARY KEY (ns, channel_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS statuses (
    ns TEXT NOT NULL, channel_id TEXT NOT NULL, component TEXT NOT NULL, status TEXT NOT NULL,
    PRIMARY KEY (ns, channel_id, component)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbound (
    ns TEXT NOT NULL, channel_id TEXT NOT NULL, message_id TEXT NOT NULL,
    message TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (ns, channel_id, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inbound_expiry ON inbound (expires_at);
CREATE TABLE IF NOT EXISTS outbound (
    ns TEXT NOT NULL, channel_id TEXT NOT NULL, message_id TEXT NOT NULL,
    message TEXT, expires_at REAL NOT NULL,
    PRIMARY KEY (ns, channel_id, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbound_expiry ON outbound (expires_at);
CREATE TABLE IF NOT EXISTS outbound_events (
    seq INTEGER PRIMARY KEY,
    ns TEXT NOT NULL, channel_id TEXT NOT NULL, message_id TEXT NOT NULL,
    event_id TEXT NOT NULL, event TEXT NOT NULL,
    UNIQUE (ns, channel_id, message_id, event_id),
    FOREIGN KEY (ns, channel_id, message_id)
        REFERENCES outbound (ns, channel_id, message_id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS rates (
    ns TEXT NOT NULL, owner_id TEXT NOT NULL, label TEXT NOT NULL, bucket INTEGER NOT NULL,
    count INTEGER NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (ns, owner_id, label, bucket)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rates_expiry ON rates (expires_at);
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL, scope TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    expires_at REAL,
    PRIMARY KEY (ns, scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at);
"""


def _dump(obj: JsonObject) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _load(text: str) -> JsonObject:
    result: JsonObject = json.loads(text)
    return result


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; each call opens its own BEGIN.
    conn = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: in WAL mode a process crash (our failure model) loses nothing; only an OS
        # crash can drop the last commits, and FULL would fsync every hot-path write.
        conn.execute("PRAGMA synchronous=NORMAL")
        for pragma in WAL_PRAGMAS:
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("PRAGMA foreign_keys=ON")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version < SCHEMA_VERSION:
            # Inside the script: executescript() commits any transaction opened before it.
            conn.executescript(
                f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
            )
        # From now on a locked database answers at once and retry_busy waits, in shorter
        # steps than SQLite's busy handler (see ipc.sqlite_inline.BUSY_RETRY_MIN).
        conn.execute("PRAGMA busy_timeout=0")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()
        raise
    return conn


class SqliteStateStore(StateStore):
    """The same semantics as the Redis store; rows expire by `expires_at` and are purged lazily."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        namespace: Namespace,
        *,
        inline: InlineRunner | None = None,
        busy_timeout: float = BUSY_TIMEOUT,
    ) -> None:
        self._conn = conn
        #: How long a threaded transaction waits for another process's lock (retry_busy).
        self._busy_timeout = busy_timeout
        # Calls that need not wait for a lock run on trio's thread (ipc/sqlite_inline.py).
        self._inline = inline
        self._checkpointer = inline.checkpointer if inline is not None else None
        self._path = path
        self._ns = namespace.prefix
        # One thread at a time touches the connection.
        self._limiter = trio.CapacityLimiter(1)
        self._group: GroupCommit[Callable[[sqlite3.Connection], Any]] = GroupCommit(
            self._commit, self._commit_once
        )
        self._closed = False
        self._next_purge = time.time() + PURGE_INTERVAL

    @classmethod
    async def open(
        cls, path: Path, namespace: Namespace, *, busy_timeout: float = BUSY_TIMEOUT
    ) -> SqliteStateStore:
        """Open (creating it and its parent directories if needed) the store file.

        Raises StoreUnavailableError when the file cannot be created, opened or is not a database.
        """
        try:
            conn = await trio.to_thread.run_sync(_connect, path, busy_timeout)
        except (OSError, sqlite3.DatabaseError) as exc:
            raise StoreUnavailableError(f"cannot open {path}: {exc}") from exc
        try:
            inline = await trio.to_thread.run_sync(
                functools.partial(
                    InlineRunner.connect,
                    path,
                    pragmas=("foreign_keys=ON",),
                    checkpointer=Checkpointer(path),
                )
            )
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreUnavailableError(f"cannot open {path}: {exc}") from exc
        return cls(conn, path, namespace, inline=inline, busy_timeout=busy_timeout)

    # --- plumbing ---------------------------------------------------------------------

    def set_write_linger(self, seconds: float) -> None:
        self._group.linger = seconds

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run fn in a worker thread; the one place sqlite3 errors are translated."""
        if self._closed:
            raise StoreUnavailableError(f"{self._path}: the store is closed")
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailableError(f"{self._path}: {exc}") from exc

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        """Run fn(connection) in one transaction, a write with the other tasks' pending ones
        (see _write)."""
        if write:
            return await self._write(fn)
        return await self._read(fn)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(connection) in a write transaction shared with the writes other tasks have
        ready (ipc/group_commit.py)."""
        if self._closed:
            raise StoreUnavailableError(f"{self._path}: the store is closed")
        return cast("T", await self._group.run(fn))

    async def _commit(
        self, batch: Sequence[Callable[[sqlite3.Connection], Any]]
    ) -> list[outcome.Outcome[Any]]:
        """Run `batch` (two writes or more: one goes to _commit_once) in one transaction. A
        write that fails by itself (a bug, a constraint) fails the whole transaction, so then
        each is run alone and gets its own outcome; when the database failed (locked too
        long, disk full, read-only), each would too."""
        results: list[Any] = []

        def run(conn: sqlite3.Connection) -> None:
            results.clear()
            results.extend(fn(conn) for fn in batch)

        try:
            await self._commit_once(run)
        except Exception as exc:  # noqa: BLE001 -- each caller gets its write's error
            database_failed = isinstance(exc, StoreUnavailableError) and isinstance(
                exc.__cause__, sqlite3.OperationalError
            )
            if database_failed:
                return [outcome.Error(StoreUnavailableError(str(exc))) for _ in batch]
            return [await outcome.acapture(self._commit_once, fn) for fn in batch]
        return [outcome.Value(result) for result in results]

    async def _commit_once(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(connection) in one write transaction, not to be cancelled: inline when it need
        not wait for the lock and no purge is due, else in the thread."""
        if time.time() < self._next_purge:
            attempt = self._try_inline(fn, write=True)
            if attempt.done:
                return cast("T", attempt.result)
        with trio.CancelScope(shield=True):
            result = await self._run(functools.partial(self._transaction, fn, True))
        if self._checkpointer is not None:
            self._checkpointer.committed()
        return result

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(connection) in one read transaction: inline when the database lets it,
        else in the thread."""
        # A cancelled caller stops here, as it would at the threaded path's checkpoint,
        # rather than doing work it can no longer act on.
        await trio.lowlevel.checkpoint_if_cancelled()
        attempt = self._try_inline(fn, write=False)
        if attempt.done:
            # Every trio call checkpoints: other tasks get their turn (as with the threaded
            # path).
            await trio.lowlevel.cancel_shielded_checkpoint()
            return cast("T", attempt.result)
        return await self._run(functools.partial(self._transaction, fn, False))

    def _try_inline(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> Attempt[T]:
        """fn(connection) on trio's thread if the database need not be waited for (see
        ipc/sqlite_inline.py); not done when it must be, or when there is no inline runner."""
        if self._inline is None or self._closed:
            return Attempt()
        try:
            return self._inline.run(fn, write=write)
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailableError(f"{self._path}: {exc}") from exc

    def _transaction(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        conn = self._conn
        # A transaction that finds the database busy is rolled back and tried again whole.
        result = retry_busy(
            functools.partial(transaction, conn, fn, write=write), self._busy_timeout
        )
        if write and time.time() >= self._next_purge:
            self._next_purge = time.time() + PURGE_INTERVAL
            # Busy or full: the write above is committed, so skip the housekeeping;
            # the next interval (in this or another process) tries again.
            with contextlib.suppress(sqlite3.OperationalError):
                self._purge(conn)
        return result

    def _purge(self, conn: sqlite3.Connection) -> int:
        now = time.time()

        def delete(conn: sqlite3.Connection) -> int:
            return sum(
                conn.execute(f"DELETE FROM {table} WHERE expires_at <= ?", (now,)).rowcount
                for table in ("inbound", "outbound", "rates", "kv")
            )

        return transaction(conn, delete, write=True)

    async def purge_expired(self) -> int:
        """Delete expired rows of every namespace now; returns how many records went."""
        return await self._run(functools.partial(self._purge, self._conn))

    def _drop_expired_outbound(
        self, conn: sqlite3.Connection, cid: str, mid: str, now: float
    ) -> None:
        # An expired record is gone as far as readers know: a new write starts afresh
        # instead of reviving its old message and events (as an expired Redis key would).
        conn.execute(
            "DELETE FROM outbound WHERE ns=? AND channel_id=? AND message_id=? AND expires_at<=?",
            (self._ns, cid, mid, now),
        )

    # --- channels ---------------------------------------------------------------------

    async def save_channel(self, channel_id: str, properties: JsonObject) -> None:
        row = (self._ns, channel_id, _dump(properties))
        await self._call(
            lambda conn: conn.execute(
                "INSERT INTO channels VALUES (?, ?, ?) ON CONFLICT DO UPDATE"
                " SET properties=excluded.properties",
                row,
            ),
            write=True,
        )

    async def get_channel(self, channel_id: str) -> JsonObject | None:
        row = await self._call(
            lambda conn: conn.execute(
                "SELECT properties FROM channels WHERE ns=? AND channel_id=?",
                (self._ns, channel_id),
            ).fetchone()
        )
        return None if row is None else _load(row[0])

    async def list_channels(self) -> list[str]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT channel_id FROM channels WHERE ns=? ORDER BY channel_id", (self._ns,)
            ).fetchall()
        )
        return [channel_id for (channel_id,) in rows]

    async def delete_channel(self, channel_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            key = (self._ns, channel_id)
            existed = conn.execute("DELETE FROM channels WHERE ns=? AND channel_id=?", key).rowcount
            for table in ("statuses", "inbound", "outbound"):
                conn.execute(f"DELETE FROM {table} WHERE ns=? AND channel_id=?", key)
            conn.execute("DELETE FROM rates WHERE ns=? AND owner_id=?", key)
            # Scopes "{channel_id}:..." as a range: ";" is the character after ":".
            conn.execute(
                "DELETE FROM kv WHERE ns=? AND scope>=? AND scope<?",
                (self._ns, f"{channel_id}:", f"{channel_id};"),
            )
            return existed > 0

        return await self._call(run, write=True)

    # --- status -----------------------------------------------------------------------

    async def set_status(self, channel_id: str, component: str, status: JsonObject) -> None:
        row = (self._ns, channel_id, component, _dump(status))
        await self._call(
            lambda conn: conn.execute(
                "INSERT INTO statuses VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE"
                " SET status=excluded.status",
                row,
            ),
            write=True,
        )

    async def get_statuses(self, channel_id: str) -> dict[str, JsonObject]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT component, status FROM statuses WHERE ns=? AND channel_id=?",
                (self._ns, channel_id),
            ).fetchall()
        )
        return {component: _load(status) for component, status in rows}

    # --- message records --------------------------------------------------------------

    async def put_inbound(
        self, channel_id: str, message_id: str, message: JsonObject, ttl: float
    ) -> None:
        row = (self._ns, channel_id, message_id, _dump(message), time.time() + ttl)
        await self._call(
            lambda conn: conn.execute(
                "INSERT INTO inbound VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
                " SET message=excluded.message, expires_at=excluded.expires_at",
                row,
            ),
            write=True,
        )

    async def get_inbound(self, channel_id: str, message_id: str, ttl: float) -> JsonObject | None:
        now = time.time()
        # The read refreshes the TTL, so it is an UPDATE ... RETURNING in a write transaction.
        rows = await self._call(
            lambda conn: conn.execute(
                "UPDATE inbound SET expires_at=? WHERE ns=? AND channel_id=? AND message_id=?"
                " AND expires_at>? RETURNING message",
                (now + ttl, self._ns, channel_id, message_id, now),
            ).fetchall(),
            write=True,
        )
        # fetchall: a RETURNING statement left unfinished would block the COMMIT.
        return _load(rows[0][0]) if rows else None

    def _put_outbound(
        self, conn: sqlite3.Connection, cid: str, mid: str, record: str, expires: float, now: float
    ) -> None:
        self._drop_expired_outbound(conn, cid, mid, now)
        conn.execute(
            "INSERT INTO outbound VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
            " SET message=excluded.message, expires_at=excluded.expires_at",
            (self._ns, cid, mid, record, expires),
        )

    def _add_event(
        self,
        conn: sqlite3.Connection,
        cid: str,
        mid: str,
        event_id: str,
        event: str,
        expires: float,
        now: float,
        *,
        record_live: bool = False,
    ) -> str | None:
        """The send record as stored (None when there is none). `record_live`: this
        transaction has just written the record with `expires`, in the future, so it needs
        neither the expiry check nor the refresh (and None is returned)."""
        record = None
        if not record_live:
            self._drop_expired_outbound(conn, cid, mid, now)
            # fetchall: a RETURNING statement left unfinished would block the COMMIT.
            rows = conn.execute(
                "INSERT INTO outbound VALUES (?, ?, ?, NULL, ?) ON CONFLICT DO UPDATE"
                " SET expires_at=excluded.expires_at RETURNING message",
                (self._ns, cid, mid, expires),
            ).fetchall()
            record = rows[0][0] if rows else None
        # A redelivered event replaces its earlier copy and keeps its place.
        conn.execute(
            "INSERT INTO outbound_events (ns, channel_id, message_id, event_id, event)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET event=excluded.event",
            (self._ns, cid, mid, event_id, event),
        )
        return record

    async def put_outbound(
        self, channel_id: str, message_id: str, record: JsonObject, ttl: float
    ) -> None:
        now = time.time()
        raw = _dump(record)
        await self._call(
            lambda conn: self._put_outbound(conn, channel_id, message_id, raw, now + ttl, now),
            write=True,
        )

    async def add_event(
        self, channel_id: str, message_id: str, event_id: str, event: JsonObject, ttl: float
    ) -> JsonObject | None:
        now = time.time()
        raw = _dump(event)
        record = await self._call(
            lambda conn: self._add_event(
                conn, channel_id, message_id, event_id, raw, now + ttl, now
            ),
            write=True,
        )
        return None if record is None else _load(record)

    async def write_outbound(self, writes: OutboundWrites) -> None:
        now = time.time()
        mid, expires = writes.message_id, now + writes.ttl
        # Serialized once, outside the transaction: every owner stores the same text.
        record = None if writes.record is None else _dump(writes.record)
        entry = None if writes.entry is None else (writes.entry[0], _dump(writes.entry[1]))
        record_live = record is not None and expires > now

        def run(conn: sqlite3.Connection) -> None:
            for owner in writes.owners:
                if record is not None:
                    self._put_outbound(conn, owner, mid, record, expires, now)
                if entry is not None:
                    self._add_event(conn, owner, mid, *entry, expires, now, record_live=record_live)
            for rate in writes.rates:
                self._incr_rate(conn, rate, now)

        await self._call(run, write=True)

    async def get_outbound(
        self, channel_id: str, message_id: str, ttl: float
    ) -> OutboundRecord | None:
        now = time.time()
        key = (self._ns, channel_id, message_id)

        def run(conn: sqlite3.Connection) -> OutboundRecord | None:
            rows = conn.execute(
                "UPDATE outbound SET expires_at=? WHERE ns=? AND channel_id=? AND message_id=?"
                " AND expires_at>? RETURNING message",
                (now + ttl, *key, now),
            ).fetchall()
            if not rows:
                return None
            (raw_message,) = rows[0]
            events = conn.execute(
                "SELECT event FROM outbound_events WHERE ns=? AND channel_id=? AND message_id=?"
                " ORDER BY seq",
                key,
            ).fetchall()
            message = None if raw_message is None else _load(raw_message)
            return OutboundRecord(message=message, events=[_load(e) for (e,) in events])

        return await self._call(run, write=True)

    # --- rates ------------------------------------------------------------------------

    def _incr_rate(self, conn: sqlite3.Connection, rate: RateCount, now: float) -> None:
        conn.execute(
            "INSERT INTO rates VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT DO UPDATE"
            " SET count=CASE WHEN expires_at<=? THEN 1 ELSE count+1 END,"
            " expires_at=excluded.expires_at",
            (self._ns, rate.owner_id, rate.label, rate.bucket, now + rate.ttl, now),
        )

    async def incr_rates(self, rates: Sequence[RateCount]) -> None:
        now = time.time()

        def run(conn: sqlite3.Connection) -> None:
            for rate in rates:
                self._incr_rate(conn, rate, now)

        if rates:
            await self._call(run, write=True)

    async def get_rates(self, owner_id: str, labels: Sequence[str], bucket: int) -> dict[str, int]:
        now = time.time()
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT label, count FROM rates WHERE ns=? AND owner_id=? AND bucket=?"
                " AND expires_at>?",
                (self._ns, owner_id, bucket, now),
            ).fetchall()
        )
        found = dict(rows)
        return {label: int(found.get(label, 0)) for label in labels}

    # --- small keyed records -----------------------------------------------------------

    async def kv_put(
        self, scope: str, key: str, value: JsonObject, ttl: float | None = None
    ) -> None:
        await self.kv_put_many((KvEntry(scope, key, value, ttl),))

    async def kv_put_many(self, entries: Sequence[KvEntry]) -> None:
        now = time.time()
        rows = [
            (self._ns, e.scope, e.key, _dump(e.value), None if e.ttl is None else now + e.ttl)
            for e in entries
        ]
        if not rows:
            return
        await self._call(
            lambda conn: conn.executemany(
                "INSERT INTO kv VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
                " SET value=excluded.value, expires_at=excluded.expires_at",
                rows,
            ),
            write=True,
        )

    async def kv_put_if_absent(
        self, scope: str, key: str, value: JsonObject, ttl: float | None = None
    ) -> bool:
        now = time.time()
        expires = None if ttl is None else now + ttl
        # One statement in one write transaction: a live row keeps its value (the WHERE of
        # the upsert), an expired one is replaced as if it were not there.
        rowcount = await self._call(
            lambda conn: (
                conn.execute(
                    "INSERT INTO kv VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
                    " SET value=excluded.value, expires_at=excluded.expires_at"
                    " WHERE kv.expires_at IS NOT NULL AND kv.expires_at<=?",
                    (self._ns, scope, key, _dump(value), expires, now),
                ).rowcount
            ),
            write=True,
        )
        return rowcount > 0

    async def kv_get(self, scope: str, key: str) -> JsonObject | None:
        row = await self._call(
            lambda conn: conn.execute(
                "SELECT value FROM kv WHERE ns=? AND scope=? AND key=?"
                " AND (expires_at IS NULL OR expires_at>?)",
                (self._ns, scope, key, time.time()),
            ).fetchone()
        )
        return None if row is None else _load(row[0])

    async def kv_delete(self, scope: str, key: str) -> bool:
        now = time.time()
        rows = await self._call(
            lambda conn: conn.execute(
                "DELETE FROM kv WHERE ns=? AND scope=? AND key=? RETURNING expires_at",
                (self._ns, scope, key),
            ).fetchall(),
            write=True,
        )
        return any(expires is None or expires > now for (expires,) in rows)

    async def kv_delete_if(self, scope: str, key: str, value: JsonObject) -> bool:
        rowcount = await self._call(
            lambda conn: (
                conn.execute(
                    "DELETE FROM kv WHERE ns=? AND scope=? AND key=? AND value=?"
                    " AND (expires_at IS NULL OR expires_at>?)",
                    (self._ns, scope, key, _dump(value), time.time()),
                ).rowcount
            ),
            write=True,
        )
        return rowcount > 0

    async def kv_items(self, scope: str) -> dict[str, JsonObject]:
        rows = await self._call(
            lambda conn: conn.execute(
                "SELECT key, value FROM kv WHERE ns=? AND scope=?"
                " AND (expires_at IS NULL OR expires_at>?) ORDER BY key",
                (self._ns, scope, time.time()),
            ).fetchall()
        )
        return {key: _load(value) for key, value in rows}

    async def kv_clear(self, scope: str) -> None:
        await self._call(
            lambda conn: conn.execute("DELETE FROM kv WHERE ns=? AND scope=?", (self._ns, scope)),
            write=True,
        )

    # --- lifecycle --------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(lambda conn: conn.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._inline is not None:
            self._inline.close()
        if self._checkpointer is not None:
            await self._checkpointer.aclose()
        # Waits for a call still running in its thread, so the close never races it.
        async with self._limiter:
            self._conn.close()
