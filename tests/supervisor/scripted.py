"""Commands and specs that run child_script.py, and polling helpers for process tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ipc.messages import Role
from supervisor.spec import ChildSpec, Commands, Restart

if TYPE_CHECKING:
    from collections.abc import Callable

SCRIPT = str(Path(__file__).with_name("child_script.py"))


def script_argv(*args: str) -> tuple[str, ...]:
    return (sys.executable, SCRIPT, *args)


def fake_commands(
    modes: dict[str, tuple[str, ...]], api_mode: tuple[str, ...] = ("hello",)
) -> Commands:
    """Channels run child_script.py with modes[cid] (default: hello); API workers api_mode."""
    return Commands(
        channel=lambda cid: script_argv("channel", cid, *modes.get(cid, ("hello",))),
        api=lambda fd, worker: script_argv("api", str(fd), *api_mode),
        describe=script_argv("describe", "0"),
    )


def channel(cid: str, *mode: str, shutdown: float = 5.0, timeout: float = 10.0) -> ChildSpec:
    return ChildSpec(
        id=cid,
        argv=script_argv("channel", cid, *mode),
        role=Role.CHANNEL,
        channel_id=cid,
        restart=Restart.TRANSIENT,
        shutdown=shutdown,
        start_timeout=timeout,
    )


async def wait_for(condition: Callable[[], bool], interval: float = 0.02) -> None:
    """Poll until `condition()` holds; the caller bounds it with trio.fail_after."""
    while not condition():  # noqa: ASYNC110 — the state is in other processes; no event exists
        await trio.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (PID 1 may not reap orphans here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
