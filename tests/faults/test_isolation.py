"""Fault 7: one channel flooded with queued messages while another sends at a steady rate.

Two smpp channels on fake SMSCs. B is sent a steady open-loop rate for a window, alone.
Then A is paused and FLOOD messages are queued on it through the API; A is resumed, so it
drains them flat out, while B is sent the same steady rate for another window. B's
submit_sm seen by its SMSC within the second window stay within 10% of the first (the
open-loop rate, so a slowdown shows as fewer in the window), and every message A was
accepted reaches its SMSC exactly once. While A drains its backlog its process runs at a
lower CPU priority (channel_proc/priority.py), and at B's once it has caught up.
bench/isolation.py measures the same at 50,000.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import trio

from channel_proc.metrics import QUEUES_INTERVAL
from channel_proc.priority import BACKLOG_NICE
from tests.e2e.gateway import WAIT, channel_pids, running_gateway
from tests.fakes.webhook import open_fake_webhook
from tests.faults.harness import (
    create_smpp_channel,
    open_sender,
    open_timed_smsc,
    submit_counts,
    wait_all_submitted,
    wait_smpp_bound,
)

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.faults.harness import Sender, TimedSmsc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FLOOD: Final = 5000
FLOOD_CONCURRENCY: Final = 16
STEADY_RATE: Final = 20.0
WINDOW: Final = 10.0
TOLERANCE: Final = 0.10


def process_nice(channel_id: str) -> int:
    """The channel process's nice (field 19 of /proc/PID/stat)."""
    (pid,) = channel_pids(channel_id)
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


async def wait_nice(channel_id: str, expected: int) -> None:
    # The process decides on its own clock (each QUEUES_INTERVAL); /proc is all there is.
    with trio.fail_after(10 * QUEUES_INTERVAL):
        while True:
            if process_nice(channel_id) == expected:
                return
            await trio.sleep(0.05)


def submits_between(smsc: TimedSmsc, start: float, end: float) -> int:
    return sum(
        1
        for pdu, at in zip(smsc.received, smsc.times, strict=True)
        if pdu.command == "submit_sm" and start <= at < end
    )


async def steady_window(sender: Sender, smsc: TimedSmsc) -> int:
    """B's sender at STEADY_RATE for WINDOW seconds; submit_sm its SMSC saw in the window."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(sender.steady, STEADY_RATE, stop)
        # The window's length is the measurement, not a synchronisation.
        await trio.sleep(WINDOW)
        stop.set()
    return submits_between(smsc, start, start + WINDOW)


async def control(gateway: Gateway, channel_id: str, action: str) -> None:
    response = await gateway.request("POST", f"/channels/{channel_id}/{action}")
    assert response.status_code == 200, response.text


async def test_flooded_channel_leaves_the_other_channels_rate_alone(settings: Settings) -> None:
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc_a,
        open_timed_smsc() as smsc_b,
        running_gateway(settings) as gateway,
    ):
        a = await create_smpp_channel(gateway, smsc_a, hook)
        b = await create_smpp_channel(gateway, smsc_b, hook)
        await wait_smpp_bound(gateway, a)
        await wait_smpp_bound(gateway, b)
        async with (
            open_sender(gateway, a, hook, "a") as sender_a,
            open_sender(gateway, b, hook, "b") as sender_b,
        ):
            alone = await steady_window(sender_b, smsc_b)

            await control(gateway, a, "pause")
            await sender_a.burst(FLOOD, concurrency=FLOOD_CONCURRENCY)
            assert not sender_a.failures, sender_a.failures[:3]
            assert len(sender_a.accepted) == FLOOD
            held = len(smsc_a.submits)
            await control(gateway, a, "resume")
            with trio.fail_after(WAIT):
                await smsc_a.wait_until(lambda: len(smsc_a.submits) > held)
            began = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_nice, a, process_nice(b) + BACKLOG_NICE)
                flooded = await steady_window(sender_b, smsc_b)
            a_in_window = submits_between(smsc_a, began, trio.current_time())

            with trio.fail_after(120):
                await wait_all_submitted(smsc_a, sender_a)
                await wait_all_submitted(smsc_b, sender_b)
            # Caught up: A is back at the priority it started with (B's).
            await wait_nice(a, process_nice(b))

        print(f"B alone: {alone} submit_sm in {WINDOW:g} s; while A drained: {flooded}")
        print(f"A: {a_in_window} of {FLOOD} sent during B's window")
        assert alone >= (1 - TOLERANCE) * STEADY_RATE * WINDOW
        assert flooded >= (1 - TOLERANCE) * alone
        # A really was draining flat out during the window, not idle or done before it.
        assert a_in_window >= 100
        # Nothing lost, nothing sent twice: no process died, so no redelivery either.
        assert not sender_b.failures, sender_b.failures[:3]
        assert set(submit_counts(smsc_a, sender_a).values()) == {1}
        assert set(submit_counts(smsc_b, sender_b).values()) == {1}
