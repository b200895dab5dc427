"""Fixtures for supervisor tests: a short run dir, a Hello-collecting server, child commands."""

from __future__ import annotations

import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ipc.messages import Hello, Ok, Reply, Request, Role
from ipc.names import supervisor_socket
from ipc.server import serve_ipc
from supervisor.child import HelloBoard
from supervisor.run import child_env

if TYPE_CHECKING:
    from collections.abc import Iterator

    import trio

    from ipc.settings import Settings


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # tmp_path is too long for Unix socket paths once a channel id is appended.
    path = Path(tempfile.mkdtemp(prefix="jbt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def child_settings(embedded_settings: Settings, run_dir: Path) -> Settings:
    return embedded_settings.model_copy(update={"run_dir": run_dir})


@pytest.fixture
def gw_settings(embedded_settings: Settings) -> Settings:
    """Settings for a whole in-process supervisor: API on 127.0.0.1, any free port."""
    return embedded_settings.model_copy(update={"interface": "127.0.0.1", "port": 0})


@pytest.fixture
def env(child_settings: Settings) -> dict[str, str]:
    return child_env(child_settings)


class BoardHandler:
    """Just enough of the supervisor's socket to let children report ready."""

    def __init__(self, board: HelloBoard) -> None:
        self.board = board

    async def handle(self, request: Request, peer: Hello) -> Reply:
        return Ok(id=request.id)

    async def connected(self, peer: Hello) -> None:
        self.board.arrived(peer)

    async def disconnected(self, peer: Hello) -> None:
        self.board.left(peer)


@pytest.fixture
async def board(run_dir: Path, nursery: trio.Nursery) -> HelloBoard:
    result = HelloBoard()
    path = supervisor_socket(run_dir)
    await nursery.start(partial(serve_ipc, path, BoardHandler(result), role=Role.SUPERVISOR))
    return result
