"""SIGTERM / SIGINT handling: the first asks for an orderly shutdown, a second SIGINT kills."""

from __future__ import annotations

import logging
import signal
from typing import NoReturn

import trio

log = logging.getLogger(__name__)


async def watch_signals(
    shutdown: trio.Event,
    kill_now: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Set `shutdown` on SIGTERM or SIGINT; set `kill_now` on a SIGINT after that.

    Calls task_status.started() once the handlers are installed (until then trio's
    default applies: SIGINT raises KeyboardInterrupt).
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            name = _name(signum)
            if not shutdown.is_set():
                log.info("%s received: stopping (send SIGINT again to kill children)", name)
                shutdown.set()
            elif signum == signal.SIGINT and not kill_now.is_set():
                log.warning("second SIGINT: killing children")
                kill_now.set()
            else:
                log.info("%s received: already stopping", name)
    raise AssertionError("the signal receiver never ends")  # pragma: no cover


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # pragma: no cover - only the two signals above are received
        return str(signum)
