"""The supervisor as its own process: SIGTERM, SIGINT twice, and SIGKILL (no orphans)."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from ipc.client import open_ipc_client
from ipc.errors import ConnectionClosedError
from ipc.messages import ChildrenReply, ChildState, ListChildren, Role
from ipc.names import Namespace, supervisor_socket
from ipc.state import open_state
from tests.supervisor.scripted import pid_alive, wait_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.settings import Settings

pytestmark = pytest.mark.slow

RUNNER = str(Path(__file__).with_name("sup_runner.py"))
ROOT = str(Path(__file__).resolve().parents[2])


async def _children(run_dir: Path) -> dict[str, int]:
    """channel id -> pid once every listed child runs; {} while any is not up yet."""
    try:
        async with open_ipc_client(supervisor_socket(run_dir), role=Role.CLI) as client:
            reply = await client.request(ListChildren(id=0))
    except ConnectionClosedError:
        return {}
    assert isinstance(reply, ChildrenReply)
    if any(c.state is not ChildState.RUNNING or c.pid is None for c in reply.children):
        return {}
    return {c.channel_id: c.pid for c in reply.children if c.pid is not None}


@asynccontextmanager
async def supervisor_process(
    settings: Settings, run_dir: Path, tmp_path: Path, modes: dict[str, list[str]]
) -> AsyncIterator[tuple[trio.Process, dict[str, int]]]:
    """Start sup_runner.py with channels `modes` (stored first); yield it once all run."""
    async with open_state(settings, Namespace(settings.namespace)) as store:
        for cid in modes:
            await store.save_channel(cid, {"type": "fake"})
    config = {
        "settings": settings.model_copy(update={"run_dir": run_dir}).model_dump(mode="json"),
        "modes": modes,
        "api_mode": ["hello"],
    }
    env = {**os.environ, "PYTHONPATH": ROOT}
    with (tmp_path / "supervisor.log").open("w") as log:
        proc = await trio.lowlevel.open_process(
            [sys.executable, RUNNER, json.dumps(config)], env=env, stderr=log
        )
        try:
            pids: dict[str, int] = {}
            with trio.fail_after(20):
                while len(pids) != len(modes):
                    await trio.sleep(0.05)
                    if supervisor_socket(run_dir).exists():
                        pids = await _children(run_dir)
            yield proc, pids
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()


@pytest.fixture
def lifecycle_settings(embedded_settings: Settings) -> Settings:
    return embedded_settings.model_copy(
        update={"interface": "127.0.0.1", "port": 0, "shutdown_grace": 25.0}
    )


async def test_sigterm_stops_every_child_and_exits_0(
    lifecycle_settings: Settings, run_dir: Path, tmp_path: Path
) -> None:
    modes = {"c1": ["hello"], "c2": ["hello"]}
    async with supervisor_process(lifecycle_settings, run_dir, tmp_path, modes) as (proc, pids):
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await proc.wait() == 0
    assert not any(pid_alive(pid) for pid in pids.values())
    assert not supervisor_socket(run_dir).exists()
    log = (tmp_path / "supervisor.log").read_text()
    assert "SIGTERM received: stopping" in log


async def test_second_sigint_kills_children_that_ignore_sigterm(
    lifecycle_settings: Settings, run_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "term"
    modes = {"c1": ["stubborn", str(marker)]}
    async with supervisor_process(lifecycle_settings, run_dir, tmp_path, modes) as (proc, pids):
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            await wait_for(marker.exists)
        began = trio.current_time()
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await proc.wait() == 0
        # The child's own shutdown deadline is 30 s; the second SIGINT cut it short.
        assert trio.current_time() - began < 5
    assert not pid_alive(pids["c1"])


async def test_sigkilled_supervisor_leaves_no_orphans(
    lifecycle_settings: Settings, run_dir: Path, tmp_path: Path
) -> None:
    modes = {"c1": ["hello"], "c2": ["stubborn", str(tmp_path / "term")]}
    async with supervisor_process(lifecycle_settings, run_dir, tmp_path, modes) as (proc, pids):
        proc.kill()
        await proc.wait()
        with trio.fail_after(10):
            await wait_for(lambda: not any(pid_alive(pid) for pid in pids.values()))
    # They left because their stdin closed, not because anyone signalled them.
    assert not (tmp_path / "term").exists()
