"""The supervision tree: one restart loop per child (one_for_one), start/stop, listing.

Each child's loop restarts it after abnormal exits within its RestartBudget, waiting a
capped, jittered delay; exit 78 marks it failed at once; an exhausted budget marks it
failed and retries it slowly. Exit 69 (store or broker unavailable) is not the child's
fault: it is retried with the capped delay for as long as it lasts, outside the budget.
Channel children's state is written to the state store, and a ChildListener (the plugins)
hears when each started child is first ready and when it is stopped.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from ipc import exit_codes
from ipc.errors import StoreUnavailableError
from ipc.messages import ChildInfo, ChildState, Role
from supervisor.budget import RestartBudget, restart_delay
from supervisor.child import ChildExit, ChildStartError, run_child
from supervisor.spec import Restart

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ipc.state import StateStore
    from supervisor.child import ChildHandle, HelloBoard
    from supervisor.spec import ChildSpec, RestartPolicy

log = logging.getLogger(__name__)

#: The state-store component the supervisor reports a channel's process under.
COMPONENT: Final = "process"
#: The component a channel process reports its own configuration errors under.
CHANNEL_COMPONENT: Final = "channel"


class ChildListener(Protocol):
    """Told about each child started with `ChildTree.start`, whatever its role."""

    async def child_ready(self, spec: ChildSpec) -> None:
        """It is ready for the first time since `start` (ready again after a crash is not
        reported). Runs before `start` returns, so the caller's reply waits for it."""

    async def child_stopped(self, spec: ChildSpec) -> None:
        """A child reported ready has stopped for good (stopped, replaced, or exited 0).

        Not called while the whole tree stops. Runs shielded: it must bound itself.
        """


class ShuttingDownError(Exception):
    """The tree is stopping and accepts no new children."""


@dataclass(eq=False, slots=True)
class _Child:
    spec: ChildSpec
    budget: RestartBudget
    state: ChildState = ChildState.STARTING
    pid: int | None = None
    restarts: int = 0
    reason: str | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    finished: trio.Event = field(default_factory=trio.Event)
    #: Set once the first attempt is ready, or has ended and its state and status are
    #: updated; `first_exit` None means ready.
    first_done: trio.Event = field(default_factory=trio.Event)
    first_exit: ChildExit | None = None
    #: The listener was told it is ready (so it must be told it stopped).
    announced: bool = False
    #: Exits 69 in a row (store or broker unavailable); reset once it is ready again.
    unavailable: int = 0

    def first_result(self, exit: ChildExit | None) -> None:
        if not self.first_done.is_set():
            self.first_exit = exit
            self.first_done.set()

    def info(self) -> ChildInfo:
        return ChildInfo(
            channel_id=self.spec.channel_id or self.spec.id,
            state=self.state,
            pid=self.pid,
            restarts=self.restarts,
            reason=self.reason,
        )


class ChildTree:
    """Owns every child's restart loop; its tasks run in `nursery`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        env: Mapping[str, str],
        board: HelloBoard,
        policy: RestartPolicy,
        store: StateStore | None,
        kill_now: trio.Event,
        listener: ChildListener | None = None,
    ) -> None:
        self._nursery = nursery
        self._env = env
        self._board = board
        self._policy = policy
        self._store = store
        self._kill_now = kill_now
        self._listener = listener
        self._children: dict[str, _Child] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._closing = False

    def _lock(self, child_id: str) -> trio.Lock:
        return self._locks.setdefault(child_id, trio.Lock())

    async def start(self, spec: ChildSpec, *, replace: bool = True) -> ChildExit | None:
        """Start `spec` (stopping a child with the same id first) and wait for its first attempt.

        With replace=False a child with the same id is left alone and its first attempt is
        waited for instead. Returns None once it is ready, else how the first attempt ended
        (its loop goes on restarting it by policy). Raises ShuttingDownError while the tree
        is stopping.
        """
        async with self._lock(spec.id):
            if self._closing:
                raise ShuttingDownError("the supervisor is shutting down")
            existing = self._children.get(spec.id)
            if existing is not None and not replace:
                child = existing
            else:
                await self._stop_locked(spec.id)
                child = self._new_child(spec)
        await child.first_done.wait()
        return child.first_exit

    def _new_child(self, spec: ChildSpec) -> _Child:
        budget = RestartBudget(self._policy.intensity, self._policy.period, trio.current_time)
        child = _Child(spec=spec, budget=budget)
        self._children[spec.id] = child
        self._nursery.start_soon(self._supervise, child)
        return child

    async def stop(self, child_id: str) -> bool:
        """Stop the child and forget it. False if there was none."""
        async with self._lock(child_id):
            return await self._stop_locked(child_id)

    async def _stop_locked(self, child_id: str) -> bool:
        child = self._children.pop(child_id, None)
        if child is None:
            return False
        child.state = ChildState.STOPPING
        child.scope.cancel()
        await child.finished.wait()
        return True

    async def stop_all(self, role: Role | None = None) -> None:
        """Stop every child (of `role`) concurrently; refuse new starts from now on."""
        self._closing = True
        async with trio.open_nursery() as nursery:
            for child in list(self._children.values()):
                if role is None or child.spec.role == role:
                    nursery.start_soon(self.stop, child.spec.id)

    def children(self, role: Role | None = Role.CHANNEL) -> list[ChildInfo]:
        return [c.info() for c in self._children.values() if role is None or c.spec.role == role]

    async def _supervise(self, child: _Child) -> None:
        try:
            with child.scope:
                await self._restart_loop(child)
        finally:
            if child.state is not ChildState.FAILED:
                child.state = ChildState.STOPPED
            child.pid = None
            child.first_result(child.first_exit or ChildExit(0, ready=False))
            if child.announced and not self._closing and self._listener is not None:
                with trio.CancelScope(shield=True):
                    await self._listener.child_stopped(child.spec)
            child.finished.set()

    async def _restart_loop(self, child: _Child) -> None:
        spec = child.spec
        while True:
            child.state = ChildState.STARTING
            exit = await self._attempt(child)
            child.pid = None
            if exit.code == exit_codes.EXIT_CONFIG:
                exit = await self._with_reported_reason(child, exit)
            child.reason = exit.reason
            clean = exit.code == exit_codes.EXIT_OK and not exit.timed_out
            # Each branch writes the status before changing the state, so whoever sees the
            # new state (or the first-start result) can read the matching status.
            if exit.code == exit_codes.EXIT_CONFIG:
                # A restart cannot fix the configuration: wait for a StartChannel.
                log.error("%s failed: %s", spec.id, exit.reason, extra=_extra(spec))
                await self._report(child, "config_error", exit)
                self._settle(child, ChildState.FAILED, exit)
                await trio.sleep_forever()
            elif spec.restart is Restart.TEMPORARY or (clean and spec.restart is Restart.TRANSIENT):
                self._settle(child, ChildState.STOPPED, exit)
                return
            elif exit.code == exit_codes.EXIT_UNAVAILABLE and not exit.timed_out:
                await trio.sleep(await self._wait_for_backend(child, exit))
            elif child.budget.allow():
                await trio.sleep(await self._back_off(child, exit))
            else:
                await trio.sleep(await self._give_up(child, exit))

    def _settle(self, child: _Child, state: ChildState, exit: ChildExit) -> None:
        child.state = state
        child.first_result(exit)

    async def _back_off(self, child: _Child, exit: ChildExit) -> float:
        """Record a restart; returns the delay before it."""
        child.restarts += 1
        policy = self._policy
        delay = restart_delay(child.budget.count(), base=policy.delay_base, cap=policy.delay_cap)
        spec = child.spec
        log.warning("%s %s; restarting in %.1f s", spec.id, exit.reason, delay, extra=_extra(spec))
        await self._report(child, "crashed", exit, f"; restarting in {delay:.1f} s")
        self._settle(child, ChildState.BACKOFF, exit)
        return delay

    async def _wait_for_backend(self, child: _Child, exit: ChildExit) -> float:
        """Record a restart the budget does not count; returns the delay before it.

        The store or broker being down says nothing about the child, and giving up on it
        (minutes before the slow retry) would keep it down long after they are back.
        """
        child.restarts += 1
        child.unavailable += 1
        policy = self._policy
        delay = restart_delay(child.unavailable, base=policy.delay_base, cap=policy.delay_cap)
        spec = child.spec
        log.warning("%s %s; retrying in %.1f s", spec.id, exit.reason, delay, extra=_extra(spec))
        await self._report(child, "unavailable", exit, f"; retrying in {delay:.1f} s")
        self._settle(child, ChildState.BACKOFF, exit)
        return delay

    async def _give_up(self, child: _Child, exit: ChildExit) -> float:
        """Mark the child failed (budget exhausted); returns the delay before a slow retry."""
        budget = child.budget
        child.reason = (
            f"{exit.reason}; restart budget exhausted "
            f"({budget.intensity} restarts in {budget.period:g} s)"
        )
        retry = self._policy.failed_retry
        log.error(
            "%s failed: %s; retrying in %g s",
            child.spec.id,
            child.reason,
            retry,
            extra=_extra(child.spec),
        )
        await self._report(child, "failed", exit)
        self._settle(child, ChildState.FAILED, exit)
        return retry

    async def _attempt(self, child: _Child) -> ChildExit:
        """Run the child once; returns when its process has exited."""
        async with trio.open_nursery() as nursery:
            try:
                handle: ChildHandle = await nursery.start(
                    partial(
                        run_child,
                        child.spec,
                        env=self._env,
                        board=self._board,
                        kill_now=self._kill_now,
                    )
                )
            except ChildStartError as exc:
                return exc.exit
            child.pid = handle.pid
            child.reason = None
            child.unavailable = 0
            await self._report_running(child)
            child.state = ChildState.RUNNING
            if not child.announced and self._listener is not None:
                child.announced = True
                await self._listener.child_ready(child.spec)
            child.first_result(None)
            return await handle.wait()

    async def _with_reported_reason(self, child: _Child, exit: ChildExit) -> ChildExit:
        """`exit` with the configuration error the channel process stored, when it did."""
        cid = child.spec.channel_id
        if self._store is None or child.spec.role is not Role.CHANNEL or cid is None:
            return exit
        try:
            status = (await self._store.get_statuses(cid)).get(CHANNEL_COMPONENT)
        except StoreUnavailableError as exc:
            log.warning("could not read %s status: %s", cid, exc, extra=_extra(child.spec))
            return exit
        if status is None or status.get("type") != "config_error":
            return exit
        message = status.get("message")
        if not isinstance(message, str) or not message:
            return exit
        return dataclasses.replace(exit, detail=message)

    async def _report_running(self, child: _Child) -> None:
        await self._write(
            child,
            {
                "status": "ok",
                "type": "running",
                "message": "channel process running",
                "details": {"restarts": child.restarts, "pid": child.pid},
            },
        )

    async def _report(self, child: _Child, kind: str, exit: ChildExit, note: str = "") -> None:
        await self._write(
            child,
            {
                "status": "down",
                "type": kind,
                "message": f"{child.reason}{note}",
                "details": {"restarts": child.restarts, "exit": exit.code},
            },
        )

    async def _write(self, child: _Child, status: dict[str, Any]) -> None:
        cid = child.spec.channel_id
        if self._store is None or child.spec.role is not Role.CHANNEL or cid is None:
            return
        event = {"component": COMPONENT, "channel_id": cid, **status}
        try:
            # A deleted channel must not get a status key back.
            if await self._store.get_channel(cid) is not None:
                await self._store.set_status(cid, COMPONENT, event)
        except StoreUnavailableError as exc:
            log.warning("could not write %s status: %s", cid, exc, extra=_extra(child.spec))


def _extra(spec: ChildSpec) -> dict[str, str | None]:
    return {"channel_id": spec.channel_id, "child": spec.id}
