"""Fault 1: kill -9 of a channel process, again and again, while it is sent a burst.

Two smpp channels on fake SMSCs: A is sent a burst (and MO messages) and killed five times
with SIGKILL, each time once its new process has started sending; B is sent a steady rate
throughout. At the end every message the API accepted for A reached the SMSC at least once
(a resend only for what was in the SMPP window at a kill), each has its `submitted` event
at the event_url, every MO that A acknowledged reached the mo_url, and B kept its rate in
the same process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import pytest
import trio

from tests.e2e.gateway import WAIT, channel_pids, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook
from tests.faults.harness import (
    create_smpp_channel,
    event_message_ids,
    kill,
    mo_contents,
    open_sender,
    open_timed_smsc,
    rate_report,
    submit_counts,
    wait_all_events,
    wait_all_submitted,
    wait_smpp_bound,
)

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.faults.harness import TimedSmsc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KILLS: Final = 5
#: Sends per second to A (the burst) and to B (the bystander).
BURST_RATE: Final = 25.0
STEADY_RATE: Final = 10.0
#: The smpp channel's default window: at most this many submits are unanswered at a kill.
WINDOW: Final = 10
#: The restart budget is not under test here: a short period keeps each restart's delay at
#: its first step (0.5 s) rather than doubling across the five kills.
GATEWAY_ARGS: Final = ["--restart-intensity", "10", "--restart-period", "2"]


async def send_mo(smsc: TimedSmsc, acknowledged: list[str], stop: trio.Event) -> None:
    """An MO every 100 ms while the channel is bound; note what it acknowledged."""
    for n in range(10_000):
        if stop.is_set():
            return
        if any(conn.receives for conn in smsc.bound):
            content = f"mo {n}"
            # A channel killed mid-request never answers: that MO is simply not counted.
            with trio.move_on_after(2):
                try:
                    response = await smsc.send_deliver_sm(short_message=content.encode())
                except AssertionError:  # no bound receiver any more
                    response = None
                if response is not None and response.ok:
                    acknowledged.append(content)
        with trio.move_on_after(0.1):
            await stop.wait()


async def kill_when_busy(smsc: TimedSmsc, channel_id: str, mo_acknowledged: list[str]) -> int:
    """Wait until the channel's current process has submitted a few messages and taken an
    MO, then kill it."""
    (pid,) = channel_pids(channel_id)
    submits, mos = len(smsc.submits), len(mo_acknowledged)

    async def busy() -> bool:
        return len(smsc.submits) >= submits + 5 and len(mo_acknowledged) > mos

    with trio.fail_after(WAIT):
        await wait_for(busy)
    kill(pid)

    async def replaced() -> bool:
        pids = channel_pids(channel_id)
        return bool(pids) and pids != [pid]

    with trio.fail_after(WAIT):
        await wait_for(replaced)
    return pid


async def test_kill_9_channel_repeatedly_during_a_send_burst(settings: Settings) -> None:
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc_a,
        open_timed_smsc() as smsc_b,
        running_gateway(settings, extra_args=GATEWAY_ARGS) as gateway,
    ):
        a = await create_smpp_channel(gateway, smsc_a, hook)
        b = await create_smpp_channel(gateway, smsc_b, hook)
        await wait_smpp_bound(gateway, a)
        await wait_smpp_bound(gateway, b)
        (b_pid,) = channel_pids(b)
        mo_acknowledged: list[str] = []
        async with (
            open_sender(gateway, a, hook, "a") as sender_a,
            open_sender(gateway, b, hook, "b") as sender_b,
        ):
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender_b.steady, STEADY_RATE, stop)
                nursery.start_soon(sender_a.steady, BURST_RATE, stop)
                nursery.start_soon(send_mo, smsc_a, mo_acknowledged, stop)
                began = trio.current_time()
                for _ in range(KILLS):
                    await kill_when_busy(smsc_a, a, mo_acknowledged)
                await wait_smpp_bound(gateway, a)
                ended = trio.current_time()
                stop.set()

            with trio.fail_after(60):
                await wait_all_submitted(smsc_a, sender_a)
                await wait_all_submitted(smsc_b, sender_b)
                await wait_all_events(hook, sender_a)
                await wait_all_events(hook, sender_b)

                async def mo_delivered() -> bool:
                    return set(mo_acknowledged) <= mo_contents(hook)

                await wait_for(mo_delivered)

        # Nothing the API accepted was refused or lost; A alone was restarted.
        assert not sender_a.failures, sender_a.failures[:3]
        assert not sender_b.failures, sender_b.failures[:3]
        assert channel_pids(b) == [b_pid]
        counts = submit_counts(smsc_a, sender_a)
        assert min(counts.values()) >= 1
        resent = sum(n - 1 for n in counts.values())
        assert resent <= KILLS * WINDOW, f"{resent} resends for {KILLS} kills"
        assert set(submit_counts(smsc_b, sender_b).values()) == {1}
        # Each message's events carry its own id, resends included.
        assert event_message_ids(hook) == set(sender_a.accepted.values()) | set(
            sender_b.accepted.values()
        )
        assert len(mo_acknowledged) >= KILLS
        report = rate_report(smsc_b, sender_b, STEADY_RATE, began, ended)
        print(f"A: {len(counts)} accepted, {resent} resent; B during the kills: {report}")
        assert report.achieved >= 0.8 * STEADY_RATE, report
        assert report.latency_max < 2.0, report
