"""Fault 8: SIGTERM to the supervisor during a send burst.

The SMSC takes 1 s to answer each submit (10 a second with the window of 10, half the send
rate), so the channel always has sends in flight and a backlog queued. The supervisor must
stop within its grace period, with exit status 0, after the channel finished what it had
started: after a restart every message the API accepted is sent, none twice (the sends in
flight were answered before the channel stopped), each with its event, and the MO messages
taken before the stop reach the mo_url.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import pytest
import trio

from tests.e2e.gateway import WAIT, channel_pids, running_gateway, wait_for
from tests.fakes.fake_smsc import SubmitAnswer
from tests.fakes.webhook import open_fake_webhook
from tests.faults.harness import (
    create_smpp_channel,
    mo_contents,
    open_sender,
    open_timed_smsc,
    submit_counts,
    wait_all_events,
    wait_all_submitted,
    wait_smpp_bound,
)

if TYPE_CHECKING:
    from ipc.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE: Final = 20.0
GRACE: Final = 5.0
#: What the supervisor may take beyond the grace period: stopping the API workers first,
#: then the channels, and its own exit.
MARGIN: Final = 3.0


async def test_sigterm_under_load_drains_and_loses_nothing(settings: Settings) -> None:
    args = ["--shutdown-grace", str(GRACE)]
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc,
        running_gateway(settings, extra_args=args) as gateway,
    ):
        smsc.script_submits(*[SubmitAnswer(delay=1.0)] * 10_000)
        cid = await create_smpp_channel(gateway, smsc, hook)
        await wait_smpp_bound(gateway, cid)
        mos = [f"mo {n}" for n in range(5)]
        for content in mos:
            assert (await smsc.send_deliver_sm(short_message=content.encode())).ok
        async with open_sender(gateway, cid, hook, "m") as sender:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.steady, RATE, stop)

                async def busy() -> bool:
                    return len(sender.accepted) >= 40 and len(smsc.submits) >= 10

                with trio.fail_after(WAIT):
                    await wait_for(busy)
                assert gateway.process is not None
                sent_at_stop = len(smsc.submits)
                began = trio.current_time()
                code = await gateway.stop()
                took = trio.current_time() - began
                stop.set()
            assert code == 0, gateway.output()
            assert took <= GRACE + MARGIN, f"the supervisor took {took:.1f} s to stop"
            assert channel_pids(cid) == []
            # The SIGTERM fell with sends in flight and messages still queued.
            queued = len(sender.accepted) - len(smsc.submitted())
            print(
                f"stopped in {took:.2f} s; {len(sender.accepted)} accepted, "
                f"{sent_at_stop} submitted at SIGTERM, {queued} left queued, "
                f"{len(sender.failures)} refused while stopping"
            )
            assert queued > 0
            await gateway.start()
            with trio.fail_after(60):
                await wait_all_submitted(smsc, sender)
                await wait_all_events(hook, sender)

                async def mos_delivered() -> bool:
                    return set(mos) <= mo_contents(hook)

                await wait_for(mos_delivered)
        assert set(submit_counts(smsc, sender).values()) == {1}
        assert all(f.status in (0, 503) for f in sender.failures), sender.failures
