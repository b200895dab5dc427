"""poll_store: the doubling pause, the first answer, and giving up in time."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from api.errors import ApiError
from api.store_wait import POLL_FIRST, POLL_MAX, poll_store


class GaveUpError(ApiError):
    status = 503


@pytest.mark.parametrize(
    ("answer_on", "wait", "tries", "gives_up"),
    [
        (1, 1.0, 1, False),
        (4, 1.0, 4, False),
        # Pauses 0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.25: the next would end past 1 s.
        (None, 1.0, 8, True),
        (None, 0.0, 1, True),
    ],
)
async def test_poll_store(
    autojump_clock: trio.testing.MockClock,
    answer_on: int | None,
    wait: float,
    tries: int,
    gives_up: bool,
) -> None:
    times: list[float] = []

    async def attempt() -> str | None:
        times.append(trio.current_time())
        return "held" if len(times) == answer_on else None

    start = trio.current_time()
    if gives_up:
        with pytest.raises(GaveUpError):
            await poll_store(attempt, wait=wait, give_up=lambda: GaveUpError("busy"))
    else:
        assert await poll_store(attempt, wait=wait, give_up=lambda: GaveUpError("busy")) == "held"
    assert len(times) == tries
    pauses = [b - a for a, b in itertools.pairwise(times)]
    expected = [min(POLL_FIRST * 2**n, POLL_MAX) for n in range(len(pauses))]
    assert pauses == pytest.approx(expected)
    assert times[-1] - start <= wait
