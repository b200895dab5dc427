"""The embedded Broker: one queue file (ipc/broker_sqlite.py) per queue owner.

Every queue is named `{owner}.{kind}` (ipc.names: a channel's, router's or destination's
outbound, inbound, event and dead-letter queues), and an owner's queues live in
`{directory}/{owner}.sqlite3`, apart from every other owner's. A SQLite file has one write
lock and one write-ahead log: when all channels shared one, a channel draining a backlog
made every other channel's publishes wait for its lock and for its log syncs (fault
scenario 7: B's POST -> submit_sm under A's flood 41.7-48.0 ms p99 with one file, 34.4-34.5
ms with one per owner, on the same machine).

A file is opened on first use and kept open; deleting an owner's last queue removes it, and
the other processes that had it open close it the next time they open an owner's file (a
newly created channel's; at most every SWEEP_INTERVAL), so that a gateway whose channels
come and go does not pile up descriptors and disk space held by deleted files. The
single-file layout's `queues.sqlite3` (beside the directory) is moved into the owners' files
when the broker opens (at least once: a crash in the middle may copy an owner's rows twice,
never drop them).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import sqlite3
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Final

import trio

from ipc.broker import Broker, Consumer
from ipc.broker_sqlite import SqliteBroker
from ipc.errors import BrokerUnavailableError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

#: The file of queues whose name has no `.` (none of the gateway's own; tests', tools').
#: It is opened with the broker, so an unusable directory fails open(), and ping() reads it.
DEFAULT_OWNER: Final = "_"
#: Owners that are safe as a file name as they are (uuids, namespace prefixes); any other is
#: hashed, so a queue name can never point outside the directory.
_PLAIN_OWNER: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_MIGRATION_LOCK: Final = ".migration.lock"
#: Seconds between two looks for owners' files deleted by another process (one stat per open
#: file each time, so not at every open: an API worker opens one per channel it serves).
SWEEP_INTERVAL: Final = 5.0


def queue_owner(queue: str) -> str:
    """The owner whose file holds `queue`: its name without the last `.kind`."""
    owner, dot, _ = queue.rpartition(".")
    return owner if dot and owner else DEFAULT_OWNER


def owner_file(directory: Path, owner: str) -> Path:
    if _PLAIN_OWNER.fullmatch(owner):
        return directory / f"{owner}.sqlite3"
    return directory / f"h-{hashlib.sha256(owner.encode()).hexdigest()[:32]}.sqlite3"


class EmbeddedBroker(Broker):
    def __init__(self, directory: Path, default: SqliteBroker) -> None:
        self._directory = directory
        self._shards: dict[str, SqliteBroker] = {DEFAULT_OWNER: default}
        #: The file each owner's broker opened, as (device, inode).
        self._files: dict[str, tuple[int, int]] = {}
        #: Seconds between two looks for deleted owners' files (_close_deleted).
        self.sweep_interval = SWEEP_INTERVAL
        self._next_sweep = 0.0
        self._opening = trio.Lock()
        self._linger = 0.0

    @classmethod
    async def open(cls, directory: Path, *, legacy: Path | None = None) -> EmbeddedBroker:
        """Open the queue directory (creating it); move `legacy`'s queues in if it exists."""
        default = await SqliteBroker.open(owner_file(directory, DEFAULT_OWNER))
        broker = cls(directory, default)
        if legacy is not None and await trio.to_thread.run_sync(legacy.exists):
            try:
                await broker._migrate(legacy)
            except BaseException:
                await broker.aclose()
                raise
        return broker

    @property
    def _closed(self) -> bool:
        # The `_` file's broker is opened with this one and dropped only by aclose.
        return DEFAULT_OWNER not in self._shards

    def path_for(self, queue: str) -> Path:
        """The file holding `queue`."""
        return owner_file(self._directory, queue_owner(queue))

    async def _shard(self, queue: str) -> SqliteBroker:
        return await self._owner_shard(queue_owner(queue))

    async def _owner_shard(self, owner: str) -> SqliteBroker:
        shard = self._shards.get(owner)
        if shard is not None:
            return shard
        async with self._opening:
            if self._closed:
                raise BrokerUnavailableError("the embedded queue is closed")
            shard = self._shards.get(owner)
            if shard is None:
                await self._close_deleted()
                path = owner_file(self._directory, owner)
                shard = await SqliteBroker.open(path)
                shard.set_write_linger(self._linger)
                self._shards[owner] = shard
                with suppress(OSError):
                    self._files[owner] = _file_id(path)
            return shard

    async def _close_deleted(self) -> None:
        """Close the owners' files that another process deleted (with the owner's last queue),
        unless that was looked for less than `sweep_interval` ago. Under `_opening`."""
        if trio.current_time() < self._next_sweep:
            return
        self._next_sweep = trio.current_time() + self.sweep_interval
        for owner, opened in list(self._files.items()):
            try:
                current: tuple[int, int] | None = _file_id(owner_file(self._directory, owner))
            except FileNotFoundError:
                current = None
            except OSError:
                continue
            if current != opened:
                del self._files[owner]
                shard = self._shards.pop(owner, None)
                if shard is not None:
                    await shard.aclose()

    async def _migrate(self, legacy: Path) -> None:
        """Copy each owner's queues and rows from `legacy` into its file, then delete them
        there; once it is empty, remove it. One process at a time (an advisory lock)."""
        try:
            lock_fd = os.open(self._directory / _MIGRATION_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                await trio.to_thread.run_sync(fcntl.flock, lock_fd, fcntl.LOCK_EX)
                if not await trio.to_thread.run_sync(legacy.exists):
                    return  # another process has moved it meanwhile
                for owner in await trio.to_thread.run_sync(_legacy_owners, legacy):
                    await self._owner_shard(owner)  # creates the owner's file and tables
                    target = owner_file(self._directory, owner)
                    await trio.to_thread.run_sync(_move_owner, legacy, target, owner)
                await trio.to_thread.run_sync(_remove_database, legacy)
            finally:
                os.close(lock_fd)
        except (OSError, sqlite3.Error) as exc:
            raise BrokerUnavailableError(
                f"cannot move the queues of {legacy} into {self._directory}: {exc}"
            ) from exc

    async def declare_queue(self, queue: str, *, max_priority: int = 0) -> None:
        await (await self._shard(queue)).declare_queue(queue, max_priority=max_priority)

    async def publish(self, queue: str, body: bytes, *, priority: int = 0) -> None:
        await (await self._shard(queue)).publish(queue, body, priority=priority)

    @asynccontextmanager
    async def consume(self, queue: str, *, prefetch: int) -> AsyncIterator[Consumer]:
        shard = await self._shard(queue)
        async with shard.consume(queue, prefetch=prefetch) as consumer:
            yield consumer

    async def queue_length(self, queue: str) -> int:
        return await (await self._shard(queue)).queue_length(queue)

    async def delete_queue(self, queue: str) -> None:
        """Delete the queue; its owner's file goes too once it holds no queue (a deleted
        channel's, router's or destination's), so files and descriptors do not pile up."""
        owner = queue_owner(queue)
        shard = await self._owner_shard(owner)
        await shard.delete_queue(queue)
        if owner == DEFAULT_OWNER or not await shard.is_empty():
            return
        async with self._opening:
            if self._shards.get(owner) is not shard:
                return
            del self._shards[owner]
            self._files.pop(owner, None)
        await shard.aclose()
        await trio.to_thread.run_sync(_remove_files, owner_file(self._directory, owner))

    async def ping(self) -> None:
        if self._closed:
            raise BrokerUnavailableError("the embedded queue is closed")
        await self._shards[DEFAULT_OWNER].ping()

    def set_write_linger(self, seconds: float) -> None:
        self._linger = seconds
        for shard in self._shards.values():
            shard.set_write_linger(seconds)

    async def aclose(self) -> None:
        async with self._opening:
            shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            await shard.aclose()


def _file_id(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


# --- moving the single-file layout's queues (blocking: run in a worker thread) -------------


def _legacy_owners(legacy: Path) -> list[str]:
    conn = sqlite3.connect(legacy, isolation_level=None)
    try:
        names = [row[0] for row in conn.execute("SELECT name FROM queues")]
        names += [row[0] for row in conn.execute("SELECT DISTINCT queue FROM messages")]
    finally:
        conn.close()
    return sorted({queue_owner(name) for name in names})


def _move_owner(legacy: Path, target: Path, owner: str) -> None:
    """Copy `owner`'s queues and messages (claimed ones as ready, FIFO order kept) into
    `target` (whose tables exist), durably, then delete them from `legacy`."""
    conn = sqlite3.connect(target, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("ATTACH DATABASE ? AS legacy", (str(legacy),))
        conn.create_function("queue_owner", 1, queue_owner, deterministic=True)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT OR IGNORE INTO main.queues (name, max_priority) "
            "SELECT name, max_priority FROM legacy.queues WHERE queue_owner(name) = ?",
            (owner,),
        )
        conn.execute(
            "INSERT INTO main.messages (queue, priority, body, deliveries) "
            "SELECT queue, priority, body, deliveries FROM legacy.messages "
            "WHERE queue_owner(queue) = ? ORDER BY id",
            (owner,),
        )
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM legacy.messages WHERE queue_owner(queue) = ?", (owner,))
        conn.execute("DELETE FROM legacy.queues WHERE queue_owner(name) = ?", (owner,))
        conn.execute("COMMIT")
    finally:
        conn.close()


def _remove_database(path: Path) -> None:
    # Fold the log into the file first, so that no committed state lives only in -wal.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    _remove_files(path)


def _remove_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
