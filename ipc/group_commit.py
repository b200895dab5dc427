"""Group commit: the writes that tasks of one process have ready at the same moment go to a
store together (one SQLite transaction, one Redis MULTI/EXEC round trip).

Under load a channel process has several state writes ready at once (its sends' timelines,
the forwarder's events and rate counts), and the API several requests' records. Committed
together they take the embedded store's write lock, which every process shares, once and
append each touched page to its log once, or cost Redis one round trip and one thread hop,
instead of one per write.

The first writer (the flusher) yields once, so that tasks ready to run queue their writes
(or waits `linger` seconds, when set, for more to come), then commits the batch and wakes the
oldest write that came meanwhile to commit the next.
Alone, a write costs one scheduler turn and nothing else. Each caller gets its own write's
outcome: the store's `commit` says which writes succeeded.

Cancellation: a write cancelled before a batch took it never runs; once taken it commits.
The flusher cannot be cancelled while it commits (it commits other tasks' writes too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import outcome
import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

W = TypeVar("W")


@dataclass(eq=False, slots=True)
class _Entry(Generic[W]):
    """One write waiting for its batch, and what came of it."""

    write: W
    #: Set when the write is done, or (while it is still pending) when its task is to
    #: commit the next batch; made only for a write that waits (most do not).
    wake: trio.Event | None = None
    result: outcome.Outcome[Any] | None = None


class GroupCommit(Generic[W]):
    """Batches the writes of one store; see the module docstring. One trio thread only."""

    def __init__(
        self,
        commit: Callable[[Sequence[W]], Awaitable[Sequence[outcome.Outcome[Any]]]],
        commit_one: Callable[[W], Awaitable[Any]],
    ) -> None:
        """`commit` writes a batch and gives one outcome per write, in order; `commit_one`
        writes a batch of one, returning its result or raising its error (the common case
        when a process is not busy, without the batch's bookkeeping). Neither may be
        cancellable (shield any wait): a batch holds other tasks' writes."""
        self._commit = commit
        self._commit_one = commit_one
        self._pending: list[_Entry[W]] = []
        self._flushing = False
        #: Seconds the flusher waits for more writes before it commits (0: a scheduler turn).
        self.linger = 0.0

    async def run(self, write: W) -> Any:
        """Commit `write` with whatever else is ready; its result, or its error raised."""
        await trio.lowlevel.checkpoint_if_cancelled()
        entry = _Entry(write)
        self._pending.append(entry)
        if self._flushing:
            entry.wake = trio.Event()
            try:
                await entry.wake.wait()
            except BaseException:
                if entry in self._pending:
                    self._pending.remove(entry)
                    if entry.wake.is_set():
                        # It was to commit the next batch: that falls to the next in line.
                        self._hand_over()
                raise
        else:
            self._flushing = True
        if entry.result is None:
            # This task commits the next batch (its own write included).
            try:
                await trio.lowlevel.cancel_shielded_checkpoint()
                if self.linger > 0:
                    with trio.CancelScope(shield=True):
                        await trio.sleep(self.linger)
                batch, self._pending = self._pending, []
                if len(batch) == 1:
                    return await self._commit_one(write)
                await self._commit_batch(batch)
            finally:
                if entry in self._pending:
                    self._pending.remove(entry)
                self._hand_over()
        assert entry.result is not None
        return entry.result.unwrap()

    def _hand_over(self) -> None:
        """Make the oldest pending write's task the next flusher, if any write is pending."""
        self._flushing = bool(self._pending)
        if self._pending:
            successor = self._pending[0]
            if successor.wake is not None:
                successor.wake.set()

    async def _commit_batch(self, batch: list[_Entry[W]]) -> None:
        try:
            results = list(await self._commit([entry.write for entry in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"a commit of {len(batch)} writes gave {len(results)} results")
        except BaseException as exc:
            # A bug in the store's commit: the flusher raises it, every other writer hears.
            failed = f"group commit failed: {exc!r}"
            results = [outcome.Error(RuntimeError(failed)) for _ in batch]
            raise
        finally:
            for entry, result in zip(batch, results, strict=True):
                entry.result = result
                if entry.wake is not None:
                    entry.wake.set()
