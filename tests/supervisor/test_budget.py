"""RestartBudget (intensity/period window) and restart_delay (capped, jittered backoff)."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from supervisor.budget import RestartBudget, restart_delay


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_allows_intensity_restarts_then_refuses() -> None:
    clock = FakeClock()
    budget = RestartBudget(3, 30.0, clock)
    assert [budget.allow() for _ in range(4)] == [True, True, True, False]
    assert budget.count() == 3


def test_budget_refusal_records_nothing() -> None:
    clock = FakeClock()
    budget = RestartBudget(1, 10.0, clock)
    assert budget.allow()
    clock.now += 5
    assert not budget.allow()
    clock.now += 5  # exactly one period after the only recorded restart
    assert budget.allow()


def test_budget_window_slides() -> None:
    clock = FakeClock()
    budget = RestartBudget(2, 10.0, clock)
    assert budget.allow()
    clock.now += 6
    assert budget.allow()
    clock.now += 3
    assert not budget.allow()
    clock.now += 1.5  # the first restart is now older than the period
    assert budget.allow()
    assert budget.count() == 2


def test_budget_intensity_zero_never_allows() -> None:
    assert not RestartBudget(0, 1.0, FakeClock()).allow()


@pytest.mark.parametrize(("intensity", "period"), [(-1, 1.0), (1, 0.0), (1, -2.0)])
def test_budget_rejects_nonsense(intensity: int, period: float) -> None:
    with pytest.raises(ValueError, match="bad restart budget"):
        RestartBudget(intensity, period, FakeClock())


async def test_budget_with_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    budget = RestartBudget(5, 30.0, trio.current_time)
    assert all(budget.allow() for _ in range(5))
    assert not budget.allow()
    await trio.sleep(30.0)
    assert budget.allow()


@given(
    intensity=st.integers(min_value=0, max_value=6),
    period=st.floats(min_value=0.5, max_value=60.0),
    gaps=st.lists(st.floats(min_value=0.0, max_value=20.0), max_size=60),
)
def test_budget_never_more_than_intensity_in_any_window(
    intensity: int, period: float, gaps: list[float]
) -> None:
    clock = FakeClock()
    budget = RestartBudget(intensity, period, clock)
    allowed: list[float] = []
    for gap in gaps:
        clock.now += gap
        in_window = [t for t in allowed if t > clock.now - period]
        ok = budget.allow()
        # Allowed exactly when the window (now - period, now] has room.
        assert ok == (len(in_window) < intensity)
        if ok:
            allowed.append(clock.now)
    for t in allowed:
        assert sum(1 for u in allowed if t - period < u <= t) <= intensity


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 15.0), (50, 15.0), (5000, 15.0)],
)
def test_delay_doubles_up_to_the_cap(n: int, expected: float) -> None:
    assert restart_delay(n, rand=lambda: 0.5) == pytest.approx(expected)


def test_delay_jitter_is_plus_minus_20_percent() -> None:
    assert restart_delay(3, rand=lambda: 0.0) == pytest.approx(1.6)
    assert restart_delay(3, rand=lambda: 0.999999) == pytest.approx(2.4, rel=1e-5)


@given(n=st.integers(min_value=1, max_value=100))
def test_delay_stays_within_bounds(n: int) -> None:
    delay = restart_delay(n, base=0.5, cap=15.0)
    nominal = min(15.0, 0.5 * 2 ** (n - 1))
    assert 0.8 * nominal <= delay <= 1.2 * nominal


def test_delay_custom_base_and_cap() -> None:
    assert restart_delay(3, base=0.1, cap=0.3, rand=lambda: 0.5) == pytest.approx(0.3)


def test_delay_rejects_restart_zero() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        restart_delay(0)
