"""What every transport that serves a TCP port shares: binding with retries, and readiness.

A port that cannot be bound (in use, no permission) is reported as `bind_failed` and
retried with capped backoff instead of crashing, so the channel runs and shows why.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from channel_proc.backoff import Backoff
from channel_proc.transports.base import StatusLevel

if TYPE_CHECKING:
    from channel_proc.transports.base import TransportLink

log = logging.getLogger(__name__)


class Once:
    """Calls task_status.started() the first time it is called."""

    def __init__(self, task_status: trio.TaskStatus[None]) -> None:
        self._task_status: trio.TaskStatus[None] | None = task_status

    def __call__(self) -> None:
        if self._task_status is not None:
            self._task_status.started()
            self._task_status = None


async def open_listeners_with_retry(
    link: TransportLink,
    component: str,
    interface: str,
    port: int,
    ready: Once,
    *,
    backlog: int | None = None,
) -> list[trio.SocketListener]:
    """Bind, retrying with backoff; report ready after the first failure so that the
    channel runs and shows `bind_failed` instead of timing out at start."""
    backoff = Backoff(initial=1.0, cap=30.0)
    while True:
        try:
            return await trio.open_tcp_listeners(port, host=interface, backlog=backlog)
        except OSError as exc:
            delay = backoff.next_delay()
            reason = exc.strerror or str(exc)
            log.warning(
                "cannot listen on %s:%d (%s); retrying in %.1f s", interface, port, reason, delay
            )
            link.status(
                component,
                StatusLevel.DOWN,
                "bind_failed",
                f"Cannot listen on {interface}:{port}: {reason}",
                {"interface": interface, "port": port},
            )
            ready()
            await trio.sleep(delay)
