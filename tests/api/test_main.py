"""`python -m api` as a real process: inherited socket, readiness, graceful exits, exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from functools import partial
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from ipc.exit_codes import EXIT_OK, EXIT_UNAVAILABLE
from ipc.messages import Role
from ipc.names import supervisor_socket
from ipc.server import serve_ipc
from ipc.settings import SETTINGS_ENV, RedisSettings
from tests.api.harness import FakeSupervisor

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.settings import Settings

pytestmark = pytest.mark.slow

#: Interpreter start plus imports of quart, hypercorn and pydantic on a slow machine.
START_TIMEOUT = 30


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


async def _start_worker(settings: Settings, sock: socket.socket) -> trio.Process:
    env = {**os.environ, SETTINGS_ENV: settings.to_env()}
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "api", "--fd", str(sock.fileno()), "--worker", "1"],
        stdin=subprocess.PIPE,
        pass_fds=(sock.fileno(),),
        env=env,
    )


async def _run_fake_supervisor(
    fake: FakeSupervisor, run_dir: Path, *, task_status: trio.TaskStatus[None]
) -> None:
    await serve_ipc(supervisor_socket(run_dir), fake, role=Role.SUPERVISOR, task_status=task_status)


async def _wait_ready_and_get_health(fake: FakeSupervisor, port: int) -> int:
    with trio.fail_after(START_TIMEOUT):
        await fake.hello.wait()
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/health/")
    return response.status_code


@pytest.fixture
async def supervisor(socket_dir: Path) -> AsyncIterator[FakeSupervisor]:
    fake = FakeSupervisor()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(_run_fake_supervisor, fake, socket_dir))
        yield fake
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("stop_by", ["stdin_eof", "sigterm"])
async def test_worker_serves_connects_and_stops_gracefully(
    embedded_settings: Settings, socket_dir: Path, supervisor: FakeSupervisor, stop_by: str
) -> None:
    settings = embedded_settings.model_copy(update={"run_dir": socket_dir})
    with _listening_socket() as sock:
        process = await _start_worker(settings, sock)
        try:
            status = await _wait_ready_and_get_health(supervisor, sock.getsockname()[1])
            assert status == 200
            [peer] = supervisor.peers
            assert peer.role == Role.API
            assert peer.pid == process.pid
            if stop_by == "sigterm":
                process.send_signal(signal.SIGTERM)
            else:
                assert process.stdin is not None
                await process.stdin.aclose()
            with trio.fail_after(15):
                assert await process.wait() == EXIT_OK
        finally:
            process.kill()
            await process.wait()


async def test_store_unreachable_at_start_exits_69(
    embedded_settings: Settings, socket_dir: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = embedded_settings.model_copy(
        update={"run_dir": socket_dir, "redis": RedisSettings(host="127.0.0.1", port=closed_port)}
    )
    with _listening_socket() as sock:
        process = await _start_worker(settings, sock)
        try:
            with trio.fail_after(START_TIMEOUT):
                assert await process.wait() == EXIT_UNAVAILABLE
        finally:
            process.kill()
            await process.wait()
