"""run_child with real subprocesses: readiness by Hello, exits, stop escalation, environment."""

from __future__ import annotations

import json
import signal
import socket
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from ipc import exit_codes
from ipc.messages import Hello, Role
from supervisor.child import ChildExit, ChildHandle, ChildStartError, HelloBoard, run_child
from supervisor.spec import ChildSpec, Restart
from tests.supervisor.scripted import channel, script_argv, wait_for

if TYPE_CHECKING:
    from pathlib import Path


class Runner:
    """run_child bound to the test's env and board."""

    def __init__(self, env: dict[str, str], board: HelloBoard) -> None:
        self.env = env
        self.board = board
        self.kill_now = trio.Event()

    async def start(self, nursery: trio.Nursery, spec: ChildSpec) -> ChildHandle:
        handle: ChildHandle = await nursery.start(
            partial(run_child, spec, env=self.env, board=self.board, kill_now=self.kill_now)
        )
        return handle

    async def run(self, spec: ChildSpec) -> ChildExit:
        return await run_child(spec, env=self.env, board=self.board, kill_now=self.kill_now)


@pytest.fixture
def runner(env: dict[str, str], board: HelloBoard) -> Runner:
    return Runner(env, board)


def test_board_keeps_a_hello_that_arrives_before_the_pid_is_expected() -> None:
    board = HelloBoard()
    board.arrived(Hello(role=Role.CHANNEL, pid=4242, channel_id="c"))
    slot = board.expect(4242)
    assert slot.arrived.is_set()
    assert slot.hello is not None
    assert slot.hello.channel_id == "c"


def test_board_drops_early_hellos_on_disconnect_and_ignores_clients() -> None:
    board = HelloBoard()
    hello = Hello(role=Role.CHANNEL, pid=4243)
    board.arrived(hello)
    board.left(hello)
    board.arrived(Hello(role=Role.CLI, pid=4244))
    assert not board.expect(4243).arrived.is_set()
    assert not board.expect(4244).arrived.is_set()


@pytest.mark.slow
async def test_child_started_only_after_its_hello(
    runner: Runner, nursery: trio.Nursery, tmp_path: Path
) -> None:
    ready = trio.Event()
    handles: list[ChildHandle] = []

    async def start() -> None:
        handles.append(await runner.start(nursery, channel("c1", "gate", str(tmp_path))))
        ready.set()

    nursery.start_soon(start)
    with trio.fail_after(10):
        await wait_for((tmp_path / "started").exists)
        pid = int((tmp_path / "started").read_text())
        assert not ready.is_set()
        (tmp_path / "go").write_text("")
        await ready.wait()
    assert handles[0].pid == pid
    assert handles[0].hello.pid == pid
    assert handles[0].hello.channel_id == "c1"


@pytest.mark.slow
async def test_child_exit_before_hello_is_a_start_error(runner: Runner) -> None:
    with trio.fail_after(10), pytest.raises(ChildStartError) as info:
        await runner.run(channel("c1", "exit", "78"))
    assert info.value.exit == ChildExit(exit_codes.EXIT_CONFIG, ready=False)
    assert info.value.exit.reason == "configuration error before it was ready"


@pytest.mark.slow
async def test_child_start_timeout_stops_it(runner: Runner) -> None:
    with trio.fail_after(10), pytest.raises(ChildStartError) as info:
        await runner.run(channel("c1", "silent", timeout=0.5))
    assert info.value.exit.timed_out
    # It was stopped with SIGTERM: the script exits cleanly, or dies of it when the signal
    # beats its handler (a loaded machine can take over 0.5 s to start Python).
    assert info.value.exit.code in (0, -signal.SIGTERM)
    assert info.value.exit.reason == "did not become ready in time"


@pytest.mark.slow
async def test_child_exit_after_ready_is_reported(runner: Runner, nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        handle = await runner.start(nursery, channel("c1", "hello-exit", "70"))
        assert await handle.wait() == ChildExit(exit_codes.EXIT_SOFTWARE, ready=True)


@pytest.mark.slow
async def test_child_cancel_stops_it_with_sigterm(runner: Runner) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            handle = await runner.start(nursery, channel("c1", "hello"))
            nursery.cancel_scope.cancel()
        assert await handle.wait() == ChildExit(0, ready=True)


@pytest.mark.slow
async def test_child_stop_escalates_to_sigkill(runner: Runner, tmp_path: Path) -> None:
    marker = tmp_path / "term"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            handle = await runner.start(
                nursery, channel("c1", "stubborn", str(marker), shutdown=0.5)
            )
            started = trio.current_time()
            nursery.cancel_scope.cancel()
        exit = await handle.wait()
    assert exit.code == -signal.SIGKILL
    assert trio.current_time() - started >= 0.5
    assert marker.read_text() == "SIGTERM\n"


@pytest.mark.slow
async def test_child_kill_now_skips_the_grace(runner: Runner, tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            spec = channel("c1", "stubborn", str(tmp_path / "term"), shutdown=60)
            handle = await runner.start(nursery, spec)
            runner.kill_now.set()
            nursery.cancel_scope.cancel()
        assert (await handle.wait()).code == -signal.SIGKILL


@pytest.mark.slow
async def test_child_gets_settings_a_stdin_pipe_and_its_own_session(
    runner: Runner, nursery: trio.Nursery, tmp_path: Path, run_dir: Path
) -> None:
    record = tmp_path / "record.json"
    with trio.fail_after(10):
        await runner.start(nursery, channel("c1", "record", str(record)))
    info = json.loads(record.read_text())
    assert info["run_dir"] == str(run_dir)
    assert info["namespace"].startswith("jbtest-")
    assert info["stdin_is_pipe"]
    assert info["session_leader"]


@pytest.mark.slow
async def test_api_child_inherits_the_listening_socket(
    runner: Runner, nursery: trio.Nursery, tmp_path: Path
) -> None:
    record = tmp_path / "record.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        fd = sock.fileno()
        spec = ChildSpec(
            id="api-0",
            argv=script_argv("api", str(fd), "record", str(record)),
            role=Role.API,
            restart=Restart.PERMANENT,
            pass_fds=(fd,),
        )
        with trio.fail_after(10):
            handle = await runner.start(nursery, spec)
        info = json.loads(record.read_text())
        assert handle.hello.role is Role.API
        assert info["port"] == sock.getsockname()[1]
        assert info["listening"]


async def test_child_command_that_cannot_run_is_a_start_error(runner: Runner) -> None:
    spec = replace(channel("c1", "hello"), argv=("/nonexistent/junebug-child",))
    with pytest.raises(ChildStartError) as info:
        await runner.run(spec)
    assert info.value.exit.code == 127
    assert info.value.exit.reason.startswith("cannot execute /nonexistent/junebug-child")
