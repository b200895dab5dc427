"""Waiting out a backend that refuses connections for a moment (a restart, a failover).

Channel processes use it for the state store and the queue broker: a call that finds its
backend unreachable is tried again, with backoff, for up to `seconds` from the first
refusal, so a short outage delays a channel instead of restarting it (and re-binding its
provider link). Only errors flagged `unreachable` are retried: an error answer or a
backend that stopped answering (a timeout) fails at once, as waiting again would hold every
caller as long again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeVar

import trio

from ipc.errors import BackendUnavailableError

if TYPE_CHECKING:
    from collections.abc import Awaitable

T = TypeVar("T")

log = logging.getLogger(__name__)

#: The first and the longest wait between tries while the backend refuses connections.
FIRST_DELAY: Final = 0.05
MAX_DELAY: Final = 1.0


#: Told of each outage as it is first met (with its error) and when it is over (None).
OutageListener = Callable[[BackendUnavailableError | None], None]


class RideThrough:
    """Retries for one backend (`where` names it in the log); `seconds` 0 retries nothing."""

    def __init__(
        self, seconds: float, where: str, *, on_outage: OutageListener | None = None
    ) -> None:
        self.seconds = seconds
        self._where = where
        self._on_outage = on_outage
        #: When (trio clock) the current outage was first met, while calls are riding it out.
        self._outage_since: float | None = None

    async def run(self, op: Callable[[], Awaitable[T]]) -> T:
        """op(), tried again while it fails with an unreachable backend, for up to `seconds`
        from the first such failure; then, or on any other failure, its error."""
        if self.seconds <= 0:
            return await op()
        delay = FIRST_DELAY
        deadline: float | None = None
        while True:
            try:
                result = await op()
            except BackendUnavailableError as exc:
                now = trio.current_time()
                if not exc.unreachable:
                    raise
                if deadline is None:
                    deadline = now + self.seconds
                    self._met(exc, now)
                elif now >= deadline:
                    raise
                # The last try comes at the deadline.
                await trio.sleep(min(delay, deadline - now))
                delay = min(2 * delay, MAX_DELAY)
            else:
                self.recovered()
                return result

    def recovered(self) -> None:
        """Note that the backend answered (once per outage in the log)."""
        if self._outage_since is not None:
            log.warning(
                "%s: reachable again after %.1f s",
                self._where,
                trio.current_time() - self._outage_since,
            )
            self._outage_since = None
            if self._on_outage is not None:
                self._on_outage(None)

    def _met(self, exc: BackendUnavailableError, now: float) -> None:
        if self._outage_since is None:
            self._outage_since = now
            log.warning("%s; calls are retried for up to %g s before they fail", exc, self.seconds)
            if self._on_outage is not None:
                self._on_outage(exc)
