"""RideThrough on its own (trio's mock clock): which failures are retried, for how long, and
how the AMQP adapter classifies aiormq's errors."""

from __future__ import annotations

# The AMQP adapter's translation of aiormq's errors is under test here.
import asyncio  # noqa: TID251
from typing import Any

import pytest
import trio
import trio.testing
from aiormq.exceptions import (  # noqa: TID251
    AuthenticationError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ConnectionClosed,
    IncompatibleProtocolError,
    ProbableAuthenticationError,
)

from ipc.broker_amqp import _unavailable
from ipc.errors import BackendUnavailableError, BrokerUnavailableError, StoreUnavailableError
from ipc.ride_through import MAX_DELAY, RideThrough


class Flaky:
    """An operation failing with `errors` in turn, then answering "ok"; notes when it ran."""

    def __init__(self, *errors: BackendUnavailableError) -> None:
        self.errors = list(errors)
        self.calls: list[float] = []

    async def __call__(self) -> str:
        self.calls.append(trio.current_time())
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def refused(n: int, kind: type[BackendUnavailableError] = StoreUnavailableError) -> list[Any]:
    return [kind("connection refused", unreachable=True) for _ in range(n)]


@pytest.mark.parametrize(
    ("seconds", "errors", "answered", "calls"),
    [
        # Refused a few times: answered once the backend is back.
        (5.0, refused(3), True, 4),
        (5.0, refused(3, BrokerUnavailableError), True, 4),
        # Nothing to wait out.
        (5.0, [], True, 1),
        # Ride-through off: the first refusal fails.
        (0.0, refused(1), False, 1),
        # An error answer, or a backend that did not answer in time, is not retried.
        (5.0, [StoreUnavailableError("WRONGTYPE")], False, 1),
        (5.0, [BrokerUnavailableError("RabbitMQ did not answer within 10 s")], False, 1),
        # Refused for longer than the ride-through: the last try comes at the deadline.
        (1.0, refused(100), False, 6),
    ],
    ids=["refused-then-back", "broker-refused", "no-outage", "off", "error", "timeout", "long"],
)
async def test_ride_through_retries_only_unreachable_backends_until_the_deadline(
    autojump_clock: trio.testing.MockClock,
    seconds: float,
    errors: list[BackendUnavailableError],
    answered: bool,
    calls: int,
) -> None:
    op = Flaky(*errors)
    ride = RideThrough(seconds, "backend")
    began = trio.current_time()
    if answered:
        assert await ride.run(op) == "ok"
    else:
        with pytest.raises(BackendUnavailableError):
            await ride.run(op)
    assert len(op.calls) == calls
    assert op.calls[-1] - began <= seconds + 1e-9
    gaps = [b - a for a, b in zip(op.calls, op.calls[1:], strict=False)]
    # The backoff doubles; only the try at the deadline may come sooner.
    assert gaps[:-1] == sorted(gaps[:-1])
    assert all(gap <= MAX_DELAY + 1e-9 for gap in gaps)


async def test_ride_through_deadline_counts_from_the_first_refusal_of_each_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ride = RideThrough(1.0, "backend")
    with pytest.raises(BackendUnavailableError):
        await ride.run(Flaky(*refused(100)))
    # A later call gets a ride-through of its own.
    assert await ride.run(Flaky(*refused(3))) == "ok"


async def test_ride_through_logs_an_outage_once_and_its_end(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[str | None] = []
    ride = RideThrough(
        5.0, "redis://db", on_outage=lambda exc: heard.append(None if exc is None else str(exc))
    )
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ride.run, Flaky(*refused(2)))
    assert heard == ["connection refused", None]
    waits = [r for r in caplog.records if "retried for up to 5 s" in r.getMessage()]
    back = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert (len(waits), len(back)) == (1, 1)
    assert back[0].getMessage().startswith("redis://db: reachable again after")


@pytest.mark.parametrize(
    ("error", "unreachable"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (ConnectionResetError(104, "reset"), True),
        (ConnectionClosed(320, "CONNECTION_FORCED - broker forced connection closure"), True),
        (ChannelInvalidStateError("channel closed"), True),
        (asyncio.CancelledError(), True),
        (AuthenticationError("ACCESS_REFUSED"), False),
        (ProbableAuthenticationError("closed at login"), False),
        (IncompatibleProtocolError("AMQP 0-8"), False),
        (ChannelNotFoundEntity("NOT_FOUND - no queue 'x'"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_amqp_errors_are_unreachable_only_when_waiting_may_help(
    error: BaseException, unreachable: bool
) -> None:
    translated = _unavailable(error)
    assert isinstance(translated, BrokerUnavailableError)
    assert translated.unreachable is unreachable
