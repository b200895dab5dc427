"""Capped exponential backoff with full jitter (pure; the caller sleeps)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays `initial`, `initial*factor`, ... capped at `cap`, each jittered into [d/2, d].

    Half-jitter keeps retries from synchronising across channels while never retrying
    much sooner than the schedule says.
    """

    initial: float = 0.5
    cap: float = 60.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def base_delay(self) -> float:
        """The un-jittered delay before the next attempt."""
        # Past ~60 doublings the float power overflows; the cap was reached long before.
        exponent = min(self.attempts, 60)
        return min(self.cap, self.initial * self.factor**exponent)

    def next_delay(self) -> float:
        """The delay to wait now; each call moves one step up the schedule."""
        delay = self.base_delay()
        self.attempts += 1
        return delay / 2 + self.rng.random() * delay / 2

    def reset(self) -> None:
        self.attempts = 0
