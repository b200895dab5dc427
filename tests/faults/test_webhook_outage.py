"""Fault 4: the mo_url and event_url receiver goes down for a while, then comes back.

An smpp channel takes MO messages (deliver_sm from the fake SMSC) and sends MT messages (their
`submitted` events go to the event_url) at a steady rate the whole time. While the receiver
answers 503, the channel reports delivery_failing and keeps everything; once it is back
every MO message and event arrives, none lost, the MO messages in the order they came when
webhook_concurrency is 1, the retries visible in the message timeline, and the channel
reports delivery_recovered. Then, with a short webhook_max_age, what cannot be delivered
dead-letters, is listed by GET dead_letters and, replayed with the receiver up, is delivered.

The outage lasts OUTAGE seconds (JUNEBUG_FAULT_WEBHOOK_OUTAGE to change it; issue 6 speaks of
minutes, CI uses a few seconds per run).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final

import pytest
import trio

from tests.e2e.gateway import WAIT, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook
from tests.faults.harness import (
    create_smpp_channel,
    event_message_ids,
    open_sender,
    open_timed_smsc,
    wait_all_events,
    wait_smpp_bound,
)

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook
    from tests.faults.harness import TimedSmsc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OUTAGE: Final = float(os.environ.get("JUNEBUG_FAULT_WEBHOOK_OUTAGE", "8"))
#: MO messages and MT sends per second, each, during the whole run.
RATE: Final = 10.0
MAX_AGE: Final = 3.0


class MoSender:
    """Sends numbered MO messages through the SMSC, one after the other (each answered)."""

    def __init__(self, smsc: TimedSmsc, prefix: str = "mo") -> None:
        self.smsc = smsc
        self.prefix = prefix
        self.sent: list[str] = []
        #: When each was answered (accepted by the channel).
        self.times: list[float] = []

    async def steady(self, rate: float, stop: trio.Event) -> None:
        next_at = trio.current_time()
        while not stop.is_set():
            content = f"{self.prefix} {len(self.sent)}"
            resp = await self.smsc.send_deliver_sm(short_message=content.encode())
            assert resp.ok, resp
            self.sent.append(content)
            self.times.append(trio.current_time())
            next_at += 1 / rate
            with trio.move_on_at(next_at):
                await stop.wait()


def mo_delivered(hook: FakeWebhook) -> list[str]:
    """MO contents in the order the receiver accepted them."""
    return [r.json()["content"] for r in hook.on_path("/mo")]


async def component(gateway: Gateway, channel_id: str, name: str) -> dict[str, Any]:
    body = (await gateway.request("GET", f"/channels/{channel_id}")).json()
    found: dict[str, Any] = body["result"]["status"]["components"].get(name, {})
    return found


async def wait_component_type(gateway: Gateway, channel_id: str, name: str, kind: str) -> None:
    last: dict[str, Any] = {}

    async def reached() -> bool:
        last.update(await component(gateway, channel_id, name))
        return last.get("type") == kind

    try:
        with trio.fail_after(WAIT):
            await wait_for(reached)
    except trio.TooSlowError:
        raise AssertionError(f"{name} never reached {kind}; last seen: {last}") from None


async def start_channel(gateway: Gateway, smsc: TimedSmsc, hook: FakeWebhook) -> str:
    cid = await create_smpp_channel(gateway, smsc, hook)
    await wait_smpp_bound(gateway, cid)
    return cid


async def test_receiver_outage_delays_but_keeps_the_order(settings: Settings) -> None:
    """With webhook_concurrency 1, on both backends."""
    await outage_run(settings, 1)


async def test_receiver_outage_loses_nothing_with_concurrent_delivery(
    redis_settings: Settings,
) -> None:
    """With webhook_concurrency 8 (RabbitMQ's redeliveries are the harder case)."""
    await outage_run(redis_settings, 8)


async def outage_run(settings: Settings, concurrency: int) -> None:
    args = ["--webhook-concurrency", str(concurrency)]
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc,
        running_gateway(settings, extra_args=args) as gateway,
    ):
        cid = await start_channel(gateway, smsc, hook)
        mo = MoSender(smsc)
        async with open_sender(gateway, cid, hook, "mt") as sender:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(mo.steady, RATE, stop)
                nursery.start_soon(sender.steady, RATE, stop)
                await trio.sleep(1)  # traffic flowing before the outage
                hook.go_down(status=503)
                outage_began = trio.current_time()
                await wait_component_type(gateway, cid, "mo_url", "delivery_failing")
                await wait_component_type(gateway, cid, "event_url", "delivery_failing")
                await trio.sleep_until(outage_began + OUTAGE)
                sent_in_outage = len(mo.sent)
                hook.come_up()
                await trio.sleep(1)  # and after it
                stop.set()
            with trio.fail_after(WAIT + OUTAGE):
                await wait_all_events(hook, sender)

                async def all_mo() -> bool:
                    return set(mo.sent) <= set(mo_delivered(hook))

                await wait_for(all_mo)
            await wait_component_type(gateway, cid, "mo_url", "delivery_recovered")
            await wait_component_type(gateway, cid, "event_url", "delivery_recovered")
        delivered = mo_delivered(hook)
        print(
            f"concurrency {concurrency}: {len(mo.sent)} MO ({sent_in_outage} by the end of the "
            f"outage), {len(sender.accepted)} MT, {len(hook.requests)} POSTs "
            f"({len(hook.requests) - len(hook.delivered)} refused)"
        )
        assert sent_in_outage > RATE * OUTAGE / 2, "MO traffic stalled during the outage"
        assert not sender.failures, sender.failures[:3]
        assert set(sender.accepted.values()) <= event_message_ids(hook)
        if concurrency == 1:
            assert delivered == mo.sent
        else:
            assert sorted(set(delivered)) == sorted(mo.sent)
        # The retries are in the timeline of a message whose event waited for the receiver.
        mid = next(r.json()["message_id"] for r in hook.requests if r.path == "/event" and not r.ok)
        status = (await gateway.request("GET", f"/channels/{cid}/messages/{mid}")).json()
        attempts = [
            entry["details"]
            for entry in status["result"]["timeline"]
            if entry.get("stage") == "webhook_attempt"
        ]
        assert attempts[0]["delivered"] is False
        assert attempts[-1]["delivered"] is True
        assert any(a["status"] == 503 for a in attempts)


async def test_undeliverable_items_dead_letter_and_replay(settings: Settings) -> None:
    args = ["--webhook-max-age", str(MAX_AGE)]
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc,
        running_gateway(settings, extra_args=args) as gateway,
    ):
        cid = await start_channel(gateway, smsc, hook)
        hook.go_down(status=500)
        mos = [f"mo {n}" for n in range(5)]
        for content in mos:
            assert (await smsc.send_deliver_sm(short_message=content.encode())).ok
        async with open_sender(gateway, cid, hook, "mt") as sender:
            await sender.burst(3)
        assert len(sender.accepted) == 3, sender.failures
        base = f"/channels/{cid}/dead_letters"
        letters: list[dict[str, Any]] = []

        async def all_dead() -> bool:
            nonlocal letters
            letters = (await gateway.request("GET", base)).json()["result"]
            return len(letters) >= len(mos) + 3

        with trio.fail_after(WAIT + 4 * MAX_AGE):
            await wait_for(all_dead)
        assert sorted(letter["source"] for letter in letters) == ["event"] * 3 + ["inbound"] * 5
        assert all("gave up" in letter["reason"] for letter in letters)
        assert {
            letter["body"]["content"] for letter in letters if letter["source"] == "inbound"
        } == set(mos)
        assert hook.delivered == []
        hook.come_up()
        response = await gateway.request("POST", f"{base}/replay")
        assert response.status_code == 200, response.text
        assert len(response.json()["result"]["replayed"]) == len(letters)
        with trio.fail_after(WAIT):
            await wait_all_events(hook, sender)

            async def all_mo() -> bool:
                return set(mos) <= set(mo_delivered(hook))

            await wait_for(all_mo)
        assert (await gateway.request("GET", base)).json()["result"] == []
