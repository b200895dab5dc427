"""One child process: spawn it, wait for its Hello (readiness), watch it, stop it.

Stopping is SIGTERM, then SIGKILL after the spec's `shutdown` seconds (or at once when
`kill_now` is set). A child whose supervisor dies sees EOF on its stdin and exits.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from ipc import exit_codes
from ipc.messages import Hello, Role

if TYPE_CHECKING:
    from collections.abc import Mapping

    from supervisor.spec import ChildSpec

log = logging.getLogger(__name__)

#: Hellos kept for pids nobody waits for yet (a child can be faster than open_process).
_MAX_EARLY: Final = 256
#: The exit status reported when the command could not be executed (as a shell does).
_EXIT_NOT_RUN: Final = 127


@dataclass(frozen=True, slots=True)
class ChildExit:
    """How one attempt ended."""

    #: The process exit status as trio reports it (negative: killed by that signal).
    code: int
    #: Whether its Hello had arrived.
    ready: bool
    #: It was stopped because no Hello came within the start timeout.
    timed_out: bool = False
    #: Why it could not be started at all (the command could not be executed).
    error: str | None = None
    #: Why it exited, as the child itself reported it (its stored configuration error).
    detail: str | None = None

    @property
    def reason(self) -> str:
        if self.error is not None:
            return self.error
        if self.detail is not None:
            return self.detail
        if self.timed_out:
            return "did not become ready in time"
        if not self.ready:
            return f"{exit_codes.describe(self.code)} before it was ready"
        return exit_codes.describe(self.code)


class ChildStartError(Exception):
    """The child exited, or timed out, before its Hello arrived."""

    def __init__(self, exit: ChildExit) -> None:
        super().__init__(exit.reason)
        self.exit = exit


@dataclass(eq=False, slots=True)
class _Slot:
    arrived: trio.Event = field(default_factory=trio.Event)
    hello: Hello | None = None

    def fill(self, hello: Hello) -> None:
        self.hello = hello
        self.arrived.set()


class HelloBoard:
    """Matches Hellos arriving on the supervisor socket to the children awaiting them, by pid."""

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}
        self._early: dict[int, Hello] = {}

    def expect(self, pid: int) -> _Slot:
        slot = _Slot()
        early = self._early.pop(pid, None)
        if early is not None:
            slot.fill(early)
        self._slots[pid] = slot
        return slot

    def forget(self, pid: int) -> None:
        self._slots.pop(pid, None)

    def arrived(self, hello: Hello) -> None:
        slot = self._slots.get(hello.pid)
        if slot is not None:
            slot.fill(hello)
        elif hello.role in (Role.CHANNEL, Role.API) and len(self._early) < _MAX_EARLY:
            self._early[hello.pid] = hello

    def left(self, hello: Hello) -> None:
        self._early.pop(hello.pid, None)


@dataclass(eq=False, slots=True)
class ChildHandle:
    """A running, ready child; `wait()` returns once its process has exited."""

    spec: ChildSpec
    pid: int
    hello: Hello
    _exited: trio.Event = field(default_factory=trio.Event)
    _exit: ChildExit | None = None

    async def wait(self) -> ChildExit:
        await self._exited.wait()
        assert self._exit is not None
        return self._exit

    def _finish(self, exit: ChildExit) -> None:
        self._exit = exit
        self._exited.set()


async def run_child(
    spec: ChildSpec,
    *,
    env: Mapping[str, str],
    board: HelloBoard,
    kill_now: trio.Event,
    task_status: trio.TaskStatus[ChildHandle] = trio.TASK_STATUS_IGNORED,
) -> ChildExit:
    """Run one attempt of `spec` until the process exits.

    Calls `task_status.started(handle)` once the child's Hello has arrived.

    Raises:
        ChildStartError: (before started) it could not be executed, or it exited or timed
            out before its Hello.
    Cancellation: the child is stopped (SIGTERM, `spec.shutdown` s, SIGKILL) before
        Cancelled propagates; this cleanup is shielded and bounded by `spec.shutdown`.
    """
    try:
        # Own session: a Ctrl-C in the terminal reaches only the supervisor, which decides.
        proc = await trio.lowlevel.open_process(
            list(spec.argv),
            stdin=subprocess.PIPE,
            env=dict(env),
            pass_fds=spec.pass_fds,
            start_new_session=True,
        )
    except OSError as exc:
        error = f"cannot execute {spec.argv[0]}: {exc.strerror or exc}"
        raise ChildStartError(ChildExit(_EXIT_NOT_RUN, ready=False, error=error)) from exc
    extra = {"channel_id": spec.channel_id, "child": spec.id, "pid": proc.pid}
    log.info("started %s (pid %d)", spec.id, proc.pid, extra=extra)
    slot = board.expect(proc.pid)
    handle: ChildHandle | None = None
    try:
        with trio.move_on_after(spec.start_timeout):
            await _wait_ready(proc, slot)
        # A child may say Hello and exit at once; the Hello still counts.
        if slot.hello is None:
            timed_out = proc.returncode is None
            if timed_out:
                log.warning("%s sent no Hello within %s s", spec.id, spec.start_timeout)
                await stop_process(proc, spec.shutdown, kill_now)
            assert proc.returncode is not None
            raise ChildStartError(ChildExit(proc.returncode, ready=False, timed_out=timed_out))
        handle = ChildHandle(spec=spec, pid=proc.pid, hello=slot.hello)
        task_status.started(handle)
        await proc.wait()
    finally:
        board.forget(proc.pid)
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                await stop_process(proc, spec.shutdown, kill_now)
            assert proc.stdin is not None
            await proc.stdin.aclose()
        if handle is not None:
            assert proc.returncode is not None
            exit = ChildExit(proc.returncode, ready=True)
            handle._finish(exit)
            log.info("%s (pid %d) %s", spec.id, proc.pid, exit.reason, extra=extra)
    return exit


async def _wait_ready(proc: trio.Process, slot: _Slot) -> None:
    """Return once the child's Hello has arrived or the child has exited."""
    async with trio.open_nursery() as nursery:

        async def exited() -> None:
            await proc.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(exited)
        await slot.arrived.wait()
        nursery.cancel_scope.cancel()


async def stop_process(proc: trio.Process, grace: float, kill_now: trio.Event) -> None:
    """SIGTERM, wait up to `grace` seconds (less if kill_now is set), then SIGKILL."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(grace):
        async with trio.open_nursery() as nursery:

            async def exited() -> None:
                await proc.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(exited)
            await kill_now.wait()
            nursery.cancel_scope.cancel()
    if proc.returncode is None:
        log.warning("pid %d did not stop within %s s; killing it", proc.pid, grace)
        proc.kill()
        await proc.wait()
