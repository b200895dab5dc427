"""Child specifications and restart policy: frozen values the tree is built from (after OTP)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from ipc.messages import Role

if TYPE_CHECKING:
    from collections.abc import Callable

    from ipc.settings import Settings

#: Seconds a child has to send its Hello before the attempt counts as a crash.
START_TIMEOUT = 15.0
#: Added to the children's own grace period to get the supervisor's SIGKILL deadline.
SHUTDOWN_MARGIN = 5.0


class Restart(StrEnum):
    """When a child is restarted after it exits (OTP restart types)."""

    #: Always, even after exit 0 (API workers).
    PERMANENT = "permanent"
    #: Only after an abnormal exit; exit 0 means it was asked to stop (channels).
    TRANSIENT = "transient"
    #: Never.
    TEMPORARY = "temporary"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildSpec:
    """How to run one child.

    Args:
        id: unique within the tree: the channel id, or ``api-<n>`` for API workers.
        argv: the command; argv[0] is executed directly (no shell).
        role: the role its Hello must carry.
        channel_id: the channel the child serves, None for API workers.
        restart: when to restart it after it exits.
        shutdown: seconds between SIGTERM and SIGKILL when stopping it.
        start_timeout: seconds to wait for its Hello; running out counts as a crash.
        pass_fds: file descriptors the child inherits (the API listening socket).
    """

    id: str
    argv: tuple[str, ...]
    role: Role
    channel_id: str | None = None
    restart: Restart = Restart.TRANSIENT
    shutdown: float = 15.0
    start_timeout: float = START_TIMEOUT
    pass_fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartPolicy:
    """Restart budget (intensity restarts per period seconds) and restart delays, per child."""

    intensity: int = 5
    period: float = 30.0
    delay_base: float = 0.5
    delay_cap: float = 15.0
    #: How often a child whose budget is exhausted is tried again.
    failed_retry: float = 300.0
    #: Seconds a child has to send its Hello; running out counts as a crash.
    start_timeout: float = START_TIMEOUT

    @classmethod
    def from_settings(cls, settings: Settings) -> RestartPolicy:
        return cls(intensity=settings.restart_intensity, period=settings.restart_period)


def _channel_argv(channel_id: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "channel_proc", "run", "--channel-id", channel_id)


def _api_argv(fd: int, worker: int) -> tuple[str, ...]:
    return (sys.executable, "-m", "api", "--fd", str(fd), "--worker", str(worker))


@dataclass(frozen=True, slots=True, kw_only=True)
class Commands:
    """The commands children are started with; tests substitute small scripts.

    The supervisor never imports channel_proc or api: it starts them by module name.
    """

    channel: Callable[[str], tuple[str, ...]] = _channel_argv
    api: Callable[[int, int], tuple[str, ...]] = _api_argv
    describe: tuple[str, ...] = field(
        default_factory=lambda: (sys.executable, "-m", "channel_proc", "describe")
    )


def channel_spec(
    commands: Commands, settings: Settings, policy: RestartPolicy, channel_id: str
) -> ChildSpec:
    return ChildSpec(
        id=channel_id,
        argv=commands.channel(channel_id),
        role=Role.CHANNEL,
        channel_id=channel_id,
        restart=Restart.TRANSIENT,
        shutdown=settings.shutdown_grace + SHUTDOWN_MARGIN,
        start_timeout=policy.start_timeout,
    )


def api_spec(
    commands: Commands, settings: Settings, policy: RestartPolicy, fd: int, worker: int
) -> ChildSpec:
    return ChildSpec(
        id=f"api-{worker}",
        argv=commands.api(fd, worker),
        role=Role.API,
        restart=Restart.PERMANENT,
        shutdown=settings.shutdown_grace + SHUTDOWN_MARGIN,
        start_timeout=policy.start_timeout,
        pass_fds=(fd,),
    )
