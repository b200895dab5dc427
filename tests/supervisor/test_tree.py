"""ChildTree with real subprocesses: restart policy, failure states, status in the store."""

from __future__ import annotations

import os
import signal
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import trio

from ipc.messages import ChildInfo, ChildState, Role
from ipc.state import open_state
from supervisor.spec import Restart, RestartPolicy
from supervisor.tree import ChildTree
from tests.supervisor.scripted import channel, pid_alive, wait_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.names import Namespace
    from ipc.settings import Settings
    from ipc.state import StateStore
    from supervisor.child import HelloBoard

pytestmark = pytest.mark.slow

POLICY = RestartPolicy(intensity=2, period=30.0, delay_base=0.05, delay_cap=0.2)


@pytest.fixture
async def store(embedded_settings: Settings, namespace: Namespace) -> AsyncIterator[StateStore]:
    async with open_state(embedded_settings, namespace) as opened:
        yield opened


@pytest.fixture
async def any_store(settings: Settings, namespace: Namespace) -> AsyncIterator[StateStore]:
    """The store of each backend (embedded, Redis); what a test stored is deleted after."""
    async with open_state(settings, namespace) as opened:
        try:
            yield opened
        finally:
            for cid in await opened.list_channels():
                await opened.delete_channel(cid)


@asynccontextmanager
async def open_tree(
    env: dict[str, str], board: HelloBoard, store: StateStore, policy: RestartPolicy = POLICY
) -> AsyncIterator[ChildTree]:
    async with trio.open_nursery() as nursery:
        tree = ChildTree(
            nursery, env=env, board=board, policy=policy, store=store, kill_now=trio.Event()
        )
        yield tree
        await tree.stop_all()


def info(tree: ChildTree, child_id: str) -> ChildInfo:
    (found,) = [c for c in tree.children(role=None) if c.channel_id == child_id]
    return found


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def test_tree_crash_is_restarted_after_a_delay(
    env: dict[str, str], board: HelloBoard, store: StateStore, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    await store.save_channel("c1", {"type": "fake"})
    policy = replace(POLICY, delay_base=1.0, delay_cap=1.0)
    async with open_tree(env, board, store, policy) as tree:
        with trio.fail_after(15):
            first = await tree.start(channel("c1", "crash-first", "1", str(runs)))
            assert first is not None
            assert (first.code, first.ready) == (70, False)
            crashed_at = trio.current_time()
            await wait_for(lambda: info(tree, "c1").state is ChildState.RUNNING)
        # Delay 1 s ±20 %; an immediate restart would be up in well under 0.8 s.
        assert trio.current_time() - crashed_at >= 0.8
        assert info(tree, "c1").restarts == 1
        assert len(lines(runs)) == 2
        status = (await store.get_statuses("c1"))["process"]
        assert status["status"] == "ok"
        assert status["type"] == "running"
        assert status["details"]["restarts"] == 1


async def test_tree_clean_exit_is_not_restarted(
    env: dict[str, str], board: HelloBoard, store: StateStore, tmp_path: Path
) -> None:
    count = tmp_path / "count"
    async with open_tree(env, board, store) as tree:
        with trio.fail_after(10):
            assert await tree.start(channel("c1", "hello-exit", "0", "--count", str(count))) is None
            await wait_for(lambda: info(tree, "c1").state is ChildState.STOPPED)
        assert info(tree, "c1").restarts == 0
        assert info(tree, "c1").pid is None
        assert len(lines(count)) == 1


async def test_tree_config_error_fails_at_once_with_status(
    env: dict[str, str], board: HelloBoard, any_store: StateStore, tmp_path: Path
) -> None:
    store = any_store
    count = tmp_path / "count"
    await store.save_channel("c1", {"type": "fake"})
    async with open_tree(env, board, store) as tree:
        with trio.fail_after(10):
            exit = await tree.start(channel("c1", "exit", "78", "--count", str(count)))
            assert exit is not None
            assert exit.code == 78
            await wait_for(lambda: info(tree, "c1").state is ChildState.FAILED)
        assert info(tree, "c1").restarts == 0
        assert len(lines(count)) == 1
        assert (await store.get_statuses("c1"))["process"] == {
            "component": "process",
            "channel_id": "c1",
            "status": "down",
            "type": "config_error",
            "message": "configuration error before it was ready",
            "details": {"restarts": 0, "exit": 78},
        }


async def test_tree_exhausted_budget_fails_while_the_sibling_runs_untouched(
    env: dict[str, str], board: HelloBoard, store: StateStore, tmp_path: Path
) -> None:
    count = tmp_path / "count"
    await store.save_channel("bad", {"type": "fake"})
    async with open_tree(env, board, store) as tree:
        with trio.fail_after(20):
            assert await tree.start(channel("good", "hello")) is None
            sibling = info(tree, "good").pid
            await tree.start(channel("bad", "exit", "70", "--count", str(count)))
            await wait_for(lambda: info(tree, "bad").state is ChildState.FAILED)
        assert len(lines(count)) == 3  # the first run and POLICY.intensity restarts
        bad = info(tree, "bad")
        assert bad.restarts == 2
        assert bad.reason is not None
        assert "restart budget exhausted (2 restarts in 30 s)" in bad.reason
        status = (await store.get_statuses("bad"))["process"]
        assert (status["status"], status["type"]) == ("down", "failed")
        assert status["details"] == {"restarts": 2, "exit": 70}
        good = info(tree, "good")
        assert (good.state, good.pid, good.restarts) == (ChildState.RUNNING, sibling, 0)
        assert sibling is not None
        assert pid_alive(sibling)


async def test_tree_start_replaces_a_running_child(
    env: dict[str, str], board: HelloBoard, store: StateStore
) -> None:
    async with open_tree(env, board, store) as tree:
        with trio.fail_after(10):
            await tree.start(channel("c1", "hello"))
            old = info(tree, "c1").pid
            await tree.start(channel("c1", "hello"))
        new = info(tree, "c1").pid
        assert old is not None
        assert new is not None
        assert new != old
        assert not pid_alive(old)


async def test_tree_stop_forgets_the_child(
    env: dict[str, str], board: HelloBoard, store: StateStore
) -> None:
    async with open_tree(env, board, store) as tree:
        with trio.fail_after(10):
            await tree.start(channel("c1", "hello"))
            pid = info(tree, "c1").pid
            assert await tree.stop("c1")
        assert tree.children() == []
        assert pid is not None
        assert not pid_alive(pid)
        assert not await tree.stop("c1")


async def test_tree_stop_all_stops_children_concurrently(
    env: dict[str, str], board: HelloBoard, store: StateStore, tmp_path: Path
) -> None:
    async with open_tree(env, board, store) as tree:
        with trio.fail_after(10):
            for cid in ("c1", "c2", "c3"):
                await tree.start(channel(cid, "stubborn", str(tmp_path / cid), shutdown=1.0))
            pids = [c.pid for c in tree.children()]
            began = trio.current_time()
            await tree.stop_all()
        # Each needs the full 1 s grace before SIGKILL; one after the other would take 3 s.
        assert 1.0 <= trio.current_time() - began < 2.5
        assert not any(pid_alive(pid) for pid in pids if pid is not None)
        assert [(tmp_path / cid).read_text() for cid in ("c1", "c2", "c3")] == ["SIGTERM\n"] * 3


async def test_tree_permanent_child_is_restarted_after_a_clean_exit(
    env: dict[str, str], board: HelloBoard, store: StateStore
) -> None:
    spec = replace(channel("api-0", "hello-exit", "0"), role=Role.API, restart=Restart.PERMANENT)
    async with open_tree(env, board, store) as tree:
        with trio.fail_after(10):
            assert await tree.start(spec) is None
            await wait_for(lambda: info(tree, "api-0").restarts >= 1)
        assert tree.children() == []  # only channels are listed by default


async def test_tree_killed_child_counts_as_a_crash(
    env: dict[str, str], board: HelloBoard, store: StateStore
) -> None:
    async with open_tree(env, board, store) as tree:
        with trio.fail_after(10):
            await tree.start(channel("c1", "hello"))
            pid = info(tree, "c1").pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await wait_for(lambda: info(tree, "c1").restarts == 1)
            await wait_for(lambda: info(tree, "c1").state is ChildState.RUNNING)
        assert info(tree, "c1").pid != pid


async def test_tree_failed_child_is_retried_slowly(
    env: dict[str, str], board: HelloBoard, store: StateStore, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    policy = replace(POLICY, intensity=1, failed_retry=0.5)
    async with open_tree(env, board, store, policy) as tree:
        with trio.fail_after(15):
            await tree.start(channel("c1", "crash-first", "2", str(runs)))
            await wait_for(lambda: info(tree, "c1").state is ChildState.FAILED)
            failed_at = trio.current_time()
            await wait_for(lambda: info(tree, "c1").state is ChildState.RUNNING)
        assert trio.current_time() - failed_at >= 0.5
        assert len(lines(runs)) == 3


async def test_tree_start_without_replace_leaves_a_running_child_alone(
    env: dict[str, str], board: HelloBoard, store: StateStore, tmp_path: Path
) -> None:
    starts = tmp_path / "starts"
    async with open_tree(env, board, store) as tree:
        with trio.fail_after(15):
            assert await tree.start(channel("c1", "hello", "--count", str(starts))) is None
            pid = info(tree, "c1").pid
            # What the boot-time restore does for a channel the API has started meanwhile.
            assert await tree.start(channel("c1", "hello"), replace=False) is None
            assert info(tree, "c1").pid == pid
            assert len(lines(starts)) == 1
            # The default replaces it.
            assert await tree.start(channel("c1", "hello")) is None
            assert info(tree, "c1").pid != pid
            assert pid is not None
            assert not pid_alive(pid)
