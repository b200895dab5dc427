"""GroupCommit on its own: which writes share a batch, and what each caller hears."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import outcome
import pytest
import trio
import trio.testing

from ipc.group_commit import GroupCommit

if TYPE_CHECKING:
    from collections.abc import Sequence


class FailedWriteError(Exception):
    pass


class Store:
    """Commits batches of ints; a negative one fails by itself; `gate` holds a commit."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate: trio.Event | None = None
        self.broken = False

    async def commit_one(self, write: int) -> Any:
        (result,) = await self.commit([write])
        return result.unwrap()

    async def commit(self, batch: Sequence[int]) -> list[outcome.Outcome[Any]]:
        if self.gate is not None:
            with trio.CancelScope(shield=True):
                await self.gate.wait()
        if self.broken:
            raise ZeroDivisionError("a bug in the store")
        self.batches.append(list(batch))
        return [
            outcome.Error(FailedWriteError(n)) if n < 0 else outcome.Value(n * 10) for n in batch
        ]


def gated() -> tuple[Store, trio.Event, GroupCommit[int]]:
    """A store whose commits wait for the event, and its group."""
    store = Store()
    store.gate = trio.Event()
    return store, store.gate, GroupCommit(store.commit, store.commit_one)


async def start(nursery: trio.Nursery, group: GroupCommit[int], *writes: int) -> None:
    """Start writers and wait until each is committing or waiting."""
    for n in writes:
        nursery.start_soon(group.run, n)
    await trio.testing.wait_all_tasks_blocked()


async def test_writes_ready_together_share_a_batch_and_get_their_own_results() -> None:
    store = Store()
    group = GroupCommit(store.commit, store.commit_one)
    results: dict[int, object] = {}

    async def write(n: int) -> None:
        try:
            results[n] = await group.run(n)
        except FailedWriteError as exc:
            results[n] = exc

    async with trio.open_nursery() as nursery:
        for n in (1, 2, -3, 4):
            nursery.start_soon(write, n)
    # In one batch, in whatever order trio ran the writers.
    assert [sorted(batch) for batch in store.batches] == [[-3, 1, 2, 4]]
    assert {n: r for n, r in results.items() if n > 0} == {1: 10, 2: 20, 4: 40}
    assert isinstance(results[-3], FailedWriteError)


async def test_a_write_alone_is_committed_alone() -> None:
    store = Store()
    group = GroupCommit(store.commit, store.commit_one)
    assert [await group.run(n) for n in (1, 2)] == [10, 20]
    assert store.batches == [[1], [2]]


async def test_writes_that_come_during_a_commit_go_in_the_next_batch() -> None:
    store, gate, group = gated()
    async with trio.open_nursery() as nursery:
        await start(nursery, group, 1)
        await start(nursery, group, 2, 3)
        gate.set()
    assert [sorted(batch) for batch in store.batches] == [[1], [2, 3]]


async def test_a_write_cancelled_while_it_waits_is_never_committed() -> None:
    store, gate, group = gated()
    async with trio.open_nursery() as nursery:
        await start(nursery, group, 1)
        with trio.CancelScope() as scope:
            nursery.start_soon(group.run, 3)
            scope.cancel()
            await group.run(2)
        await start(nursery, group, 4)
        gate.set()
    # 2 was cancelled before it was queued (a cancelled caller stops at once); 3, started
    # outside the scope, goes with 4.
    assert [sorted(batch) for batch in store.batches] == [[1], [3, 4]]


async def test_a_waiter_cancelled_first_in_line_does_not_strand_the_rest() -> None:
    # 2 is the oldest waiter, the one to be woken to commit the next batch; cancelled, it
    # leaves the line, and 3 still gets committed.
    store, gate, group = gated()
    async with trio.open_nursery() as nursery:
        await start(nursery, group, 1)
        with trio.move_on_after(0.01) as waited:
            nursery.start_soon(group.run, 3)
            await group.run(2)
        assert waited.cancelled_caught
        gate.set()
    assert store.batches == [[1], [3]]


async def test_a_bug_in_the_commit_reaches_every_writer_and_does_not_stick() -> None:
    store = Store()
    store.broken = True
    group = GroupCommit(store.commit, store.commit_one)
    heard: list[BaseException] = []

    async def write(n: int) -> None:
        try:
            await group.run(n)
        except (ZeroDivisionError, RuntimeError) as exc:
            heard.append(exc)

    async with trio.open_nursery() as nursery:
        for n in (1, 2, 3):
            nursery.start_soon(write, n)
    assert sorted(type(exc).__name__ for exc in heard) == [
        "RuntimeError",
        "RuntimeError",
        "ZeroDivisionError",
    ]
    store.broken = False
    assert await group.run(4) == 40


@pytest.mark.parametrize("writers", [1, 50])
async def test_every_write_is_committed_once(writers: int) -> None:
    store = Store()
    group = GroupCommit(store.commit, store.commit_one)
    async with trio.open_nursery() as nursery:
        for n in range(writers):
            nursery.start_soon(group.run, n)
    committed = [n for batch in store.batches for n in batch]
    assert sorted(committed) == list(range(writers))


@pytest.mark.parametrize(
    ("linger", "batches"),
    [(0.0, [[1], [2], [3], [4]]), (0.003, [[1, 2, 3], [4]])],
    ids=["no-linger", "linger"],
)
async def test_a_lingering_flusher_takes_the_writes_that_come_meanwhile(
    autojump_clock: trio.testing.MockClock, linger: float, batches: list[list[int]]
) -> None:
    store = Store()
    group = GroupCommit(store.commit, store.commit_one)
    group.linger = linger
    async with trio.open_nursery() as nursery:
        for n, after in ((1, 0.001), (2, 0.001), (3, 0.01), (4, 0.0)):
            nursery.start_soon(group.run, n)
            await trio.sleep(after)
    assert store.batches == batches
