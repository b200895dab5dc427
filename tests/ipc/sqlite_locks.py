"""A SQLite file's write lock held by "another process": for a block, or for a number of the
waiter's tries."""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import pytest


@contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Hold `path`'s write lock (an open write transaction) for the block."""
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
        holder.execute("ROLLBACK")
    finally:
        holder.close()


@contextmanager
def lock_held_for_tries(
    path: Path, tries: int, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[float]]:
    """Hold `path`'s write lock until a waiter has slept `tries` times (time.sleep, as
    ipc.sqlite_inline.retry_busy does); yields the list of the waiter's sleeps."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    delays: list[float] = []
    real_sleep = time.sleep

    def spying_sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == tries:
            holder.execute("ROLLBACK")
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", spying_sleep)
    try:
        yield delays
    finally:
        monkeypatch.undo()
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
