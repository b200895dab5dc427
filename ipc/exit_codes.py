"""The exit-code contract between a child process and the supervisor."""

from __future__ import annotations

from typing import Final

#: Stopped on request (drain, SIGTERM, parent gone): not restarted.
EXIT_OK: Final = 0
#: Unhandled exception: counts against the restart budget.
EXIT_SOFTWARE: Final = 70
#: Bad configuration (EX_CONFIG): a restart cannot help, the channel is marked failed at once.
EXIT_CONFIG: Final = 78
#: The state store or broker could not be reached at start: restart with backoff.
EXIT_UNAVAILABLE: Final = 69


def describe(code: int) -> str:
    """A one-line reason for an exit status as `trio.Process.returncode` reports it."""
    if code == EXIT_OK:
        return "stopped"
    if code == EXIT_CONFIG:
        return "configuration error"
    if code == EXIT_SOFTWARE:
        return "crashed (unhandled exception)"
    if code == EXIT_UNAVAILABLE:
        return "state store or broker unavailable"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with code {code}"
