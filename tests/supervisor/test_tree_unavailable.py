"""Exit 69 (store or broker unavailable) is retried outside the restart budget."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import trio

from ipc.messages import ChildState
from ipc.state import open_state
from supervisor.spec import RestartPolicy
from tests.supervisor.scripted import channel, wait_for
from tests.supervisor.test_tree import info, lines, open_tree

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


async def test_tree_unavailable_exits_never_exhaust_the_budget(
    env: dict[str, str], board: HelloBoard, store: StateStore, tmp_path: Path
) -> None:
    count = tmp_path / "count"
    await store.save_channel("c1", {"type": "fake"})
    async with open_tree(env, board, store, POLICY) as tree:
        with trio.fail_after(20):
            exit = await tree.start(channel("c1", "exit", "69", "--count", str(count)))
            assert exit is not None
            assert exit.code == 69
            # Twice the budget's intensity, and still retried rather than failed.
            await wait_for(lambda: len(lines(count)) >= 2 * POLICY.intensity + 2)
        child = info(tree, "c1")
        assert child.state is not ChildState.FAILED
        assert child.reason == "state store or broker unavailable before it was ready"
        status = (await store.get_statuses("c1"))["process"]
        assert (status["status"], status["type"]) == ("down", "unavailable")
        assert "retrying in" in status["message"]


async def test_tree_unavailable_retries_back_off_to_the_cap(
    env: dict[str, str], board: HelloBoard, store: StateStore, tmp_path: Path
) -> None:
    count = tmp_path / "count"
    policy = replace(POLICY, delay_base=0.1, delay_cap=0.4)
    async with open_tree(env, board, store, policy) as tree:
        with trio.fail_after(30):
            await tree.start(channel("c1", "exit", "69", "--count", str(count)))
            began = trio.current_time()
            await wait_for(lambda: len(lines(count)) >= 6)
        # Delays 0.1, 0.2, 0.4, 0.4, 0.4 (±20 %) between the six runs: at least 1.2 s.
        assert trio.current_time() - began >= 0.8 * 1.5
