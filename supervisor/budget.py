"""Restart budget (OTP intensity/period) and the capped, jittered restart delay; pure."""

from __future__ import annotations

import random
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

#: ±20 %: spreads restarts of channels that crashed together (e.g. one SMSC went away).
JITTER = 0.2


class RestartBudget:
    """Allows at most `intensity` restarts in any window of `period` seconds.

    A window is half-open, (now - period, now]: a restart exactly `period` seconds ago
    no longer counts.
    """

    def __init__(self, intensity: int, period: float, clock: Callable[[], float]) -> None:
        if intensity < 0 or period <= 0:
            raise ValueError(f"bad restart budget: {intensity} in {period} s")
        self.intensity = intensity
        self.period = period
        self._clock = clock
        self._times: deque[float] = deque()

    def _prune(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.period:
            self._times.popleft()

    def allow(self) -> bool:
        """Record a restart now if the budget has room; False (nothing recorded) if not."""
        now = self._clock()
        self._prune(now)
        if len(self._times) >= self.intensity:
            return False
        self._times.append(now)
        return True

    def count(self) -> int:
        """Restarts inside the current window."""
        self._prune(self._clock())
        return len(self._times)


def restart_delay(
    n: int,
    *,
    base: float = 0.5,
    cap: float = 15.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds before the n-th restart in the window (n >= 1): min(cap, base*2^(n-1)) ±20 %.

    `rand` returns a float in [0, 1); tests pass a fixed one.
    """
    if n < 1:
        raise ValueError(f"restart number must be >= 1, got {n}")
    # The exponent is bounded so a long-running crash loop cannot overflow the float.
    nominal = min(cap, base * 2.0 ** min(n - 1, 64))
    return nominal * (1.0 - JITTER + 2.0 * JITTER * rand())
