"""`python -m api` as a real process: inherited socket, readiness, graceful exits, exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from functools import partial
from typing import IO, TYPE_CHECKING

import httpx
import pytest
import trio

from ipc.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE
from ipc.messages import Role
from ipc.names import Namespace, supervisor_socket
from ipc.observability import DISABLE_LOGGING_ENV
from ipc.server import serve_ipc
from ipc.settings import SETTINGS_ENV, RedisSettings
from ipc.state import open_state
from tests.api.fake_sentry import serving_sentry
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


async def _start_worker(
    settings: Settings,
    sock: socket.socket,
    *,
    extra_env: dict[str, str] | None = None,
    output: IO[bytes] | None = None,
) -> trio.Process:
    env = {key: value for key, value in os.environ.items() if key != DISABLE_LOGGING_ENV}
    env.update({SETTINGS_ENV: settings.to_env(), **(extra_env or {})})
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "api", "--fd", str(sock.fileno()), "--worker", "1"],
        stdin=subprocess.PIPE,
        stdout=output,
        stderr=output,
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


async def _cause_a_500(settings: Settings, port: int) -> None:
    """A stored inbound message that is not a vumi message makes a reply fail unexpectedly."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        body = {"type": "fake", "config": {"host": "h"}, "mo_url": "http://example.com/mo"}
        response = await client.post("/channels/", json=body)
        assert response.status_code == 201
        channel_id = response.json()["result"]["id"]
        async with open_state(settings, Namespace(settings.namespace)) as store:
            await store.put_inbound(channel_id, "in1", {"message_id": 5}, 60)
        reply = {"reply_to": "in1", "content": "x"}
        response = await client.post(f"/channels/{channel_id}/messages/", json=reply)
    assert response.status_code == 500
    assert response.json()["description"] == "generic error"


async def _stop(process: trio.Process) -> None:
    assert process.stdin is not None
    await process.stdin.aclose()
    with trio.fail_after(15):
        assert await process.wait() == EXIT_OK


@pytest.mark.parametrize("disabled", [False, True])
async def test_junebug_disable_logging_silences_the_worker(
    embedded_settings: Settings,
    socket_dir: Path,
    supervisor: FakeSupervisor,
    tmp_path: Path,
    disabled: bool,
) -> None:
    settings = embedded_settings.model_copy(update={"run_dir": socket_dir})
    extra_env = {DISABLE_LOGGING_ENV: "1"} if disabled else {}
    output_path = tmp_path / "worker.out"
    with _listening_socket() as sock, output_path.open("wb") as output:
        process = await _start_worker(settings, sock, extra_env=extra_env, output=output)
        try:
            status = await _wait_ready_and_get_health(supervisor, sock.getsockname()[1])
            assert status == 200
            await _cause_a_500(settings, sock.getsockname()[1])
            await _stop(process)
        finally:
            process.kill()
            await process.wait()
    printed = output_path.read_text()
    if disabled:
        assert printed == ""
    else:
        assert "serving on" in printed
        assert "unhandled error in POST" in printed


async def test_unhandled_errors_reach_sentry_even_with_logging_disabled(
    embedded_settings: Settings, socket_dir: Path, supervisor: FakeSupervisor, tmp_path: Path
) -> None:
    output_path = tmp_path / "worker.out"
    async with serving_sentry() as sentry:
        settings = embedded_settings.model_copy(
            update={"run_dir": socket_dir, "sentry_dsn": sentry.dsn}
        )
        extra_env = {DISABLE_LOGGING_ENV: "1"}
        with _listening_socket() as sock, output_path.open("wb") as output:
            process = await _start_worker(settings, sock, extra_env=extra_env, output=output)
            try:
                status = await _wait_ready_and_get_health(supervisor, sock.getsockname()[1])
                assert status == 200
                await _cause_a_500(settings, sock.getsockname()[1])
                with trio.fail_after(15):
                    while not any(b"ValidationError" in e for e in sentry.envelopes):
                        await sentry.received.wait()
                        sentry.received = trio.Event()
                await _stop(process)
            finally:
                process.kill()
                await process.wait()
    assert output_path.read_text() == ""
    [event] = [e for e in sentry.envelopes if b"unhandled error in POST" in e]
    assert b'"junebug.role":"api"' in event.replace(b" ", b"")


async def test_a_bad_sentry_dsn_is_a_config_error(
    embedded_settings: Settings, socket_dir: Path
) -> None:
    settings = embedded_settings.model_copy(
        update={"run_dir": socket_dir, "sentry_dsn": "not a dsn"}
    )
    with _listening_socket() as sock:
        process = await _start_worker(settings, sock)
        try:
            with trio.fail_after(START_TIMEOUT):
                assert await process.wait() == EXIT_CONFIG
        finally:
            process.kill()
            await process.wait()
