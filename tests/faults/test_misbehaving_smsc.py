"""Fault 6: an SMSC that misbehaves, against the real gateway.

Channel A is bound to a fake SMSC that misbehaves (drops the connection mid-PDU, sends
garbage, stops answering enquire_link, throttles every submit_sm for a while, floods MO);
channel B is bound to one that behaves. Both are sent a steady rate throughout. Each test
checks that A's `smpp` status (as POSTed to its status_url) shows the fault and its
recovery, that every message the API accepted for A reached the SMSC (twice only where a
connection was lost with the message's answer in flight; each message id is the API's own
however often it was submitted), that A sends again after recovering, and that B's
delivery rate during the fault stayed near its rate before it.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio

from tests.e2e.gateway import WAIT, channel_pids, remember_channel, running_gateway, wait_for
from tests.fakes.fake_smsc import FRAMED_GARBAGE, GARBAGE, smpp_config
from tests.fakes.webhook import open_fake_webhook
from tests.faults.harness import (
    REQUEST_TIMEOUT,
    event_message_ids,
    open_sender,
    open_timed_smsc,
    wait_all_events,
    wait_all_submitted,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from channel_proc.transports.smpp.pdu import Pdu
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook
    from tests.faults.harness import Sender, TimedSmsc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Sends per second to each channel.
RATE: Final = 10.0
#: How long B's rate is measured before the fault.
BASELINE: Final = 2.0
#: B's delivery rate during A's fault, as a share of its baseline: generous, because this
#: checks that nothing stalls on a shared machine, not how fast anything is.
KEPT_SHARE: Final = 0.5
#: The smpp channel's default window: at most this many submits are unanswered at a loss.
WINDOW: Final = 10
#: The issue's throttling lasts a minute; CI waits this long instead (the gateway's
#: behaviour does not depend on the length, only on the SMSC answering ESME_RTHROTTLED).
THROTTLE_PERIOD: Final = 12.0
#: deliver_sm PDUs in the MO flood (the issue says 5,000; that passes too, in about twice
#: the time), and how many are answered before the SMSC cuts the connection mid-flood.
FLOOD: Final = 3000
CUT_AFTER: Final = 1000
#: A's keep-alive: short, so that a silent SMSC is noticed within seconds.
ENQUIRE_INTERVAL: Final = 1.0
#: A's bind timeout, which is also how long it waits for the rest of a PDU begun.
PARTIAL_PDU_PATIENCE: Final = 2.0


@dataclass
class Scene:
    gateway: Gateway
    hook: FakeWebhook
    bad: TimedSmsc
    good: TimedSmsc
    a: str
    b: str
    sender_a: Sender
    sender_b: Sender
    stop: trio.Event = field(default_factory=trio.Event)
    stopped: trio.Event = field(default_factory=trio.Event)

    async def send_steadily(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.sender_a.steady, RATE, self.stop)
            nursery.start_soon(self.sender_b.steady, RATE, self.stop)
        self.stopped.set()

    def statuses(self) -> list[dict[str, Any]]:
        """A's `smpp` statuses in the order it POSTed them to its status_url."""
        found = [r.json() for r in self.hook.on_path("/status/a")]
        return [s for s in found if s["component"] == "smpp"]

    async def wait_status(self, types: set[str], after: int) -> dict[str, Any]:
        """The first of A's statuses past the first `after` whose type is one of `types`."""
        found: list[dict[str, Any]] = []

        async def seen() -> bool:
            found[:] = [s for s in self.statuses()[after:] if s["type"] in types]
            return bool(found)

        with trio.fail_after(WAIT):
            await wait_for(seen)
        return found[0]

    async def wait_rebound(self, after: int) -> dict[str, Any]:
        """A reported a loss after the first `after` statuses, then bound again; the loss."""
        lost = await self.wait_status({"connection_lost"}, after)
        assert lost["status"] == "down", lost
        await self.wait_status({"bound"}, self.statuses().index(lost) + 1)
        with trio.fail_after(WAIT):
            await self.bad.wait_bound()
        return lost

    async def survive(self, fault: Callable[[], Awaitable[None]]) -> None:
        """Run `fault` (which returns once A recovered) while measuring B; then A sends
        again, in the same process, and every accepted message is settled."""
        (pid,) = channel_pids(self.a)
        await measure_b_during(self, fault)
        await wait_a_sends_again(self)
        # Handled inside the channel process: it was never restarted.
        assert channel_pids(self.a) == [pid]
        await self.settle()

    def channel_log(self, channel_id: str) -> str:
        return (Path(self.gateway.settings.logging_path) / channel_id).read_text(errors="replace")

    def mo_contents(self) -> set[str]:
        return {r.json()["content"] for r in self.hook.on_path("/mo/a")}

    def b_rate(self, start: float, end: float) -> float:
        """B's submits per second at its SMSC between `start` and `end`."""
        count = sum(
            start <= at <= end
            for pdu, at in zip(self.good.received, self.good.times, strict=True)
            if pdu.command == "submit_sm"
        )
        return count / (end - start)

    async def settle(self) -> None:
        """Stop sending; then every message the API accepted reached its SMSC and has its
        `submitted` event."""
        self.stop.set()
        with trio.fail_after(60):
            await self.stopped.wait()
            await wait_all_submitted(self.bad, self.sender_a)
            await wait_all_submitted(self.good, self.sender_b)
            await wait_all_events(self.hook, self.sender_a)
            await wait_all_events(self.hook, self.sender_b)
        assert not self.sender_a.failures, self.sender_a.failures[:3]
        assert not self.sender_b.failures, self.sender_b.failures[:3]
        # Each message's events carry its own id, resends included.
        assert event_message_ids(self.hook) == set(self.sender_a.accepted.values()) | set(
            self.sender_b.accepted.values()
        )

    def accepted_counts(self, smsc: TimedSmsc, sender: Sender) -> dict[str, int]:
        """content -> how many times the SMSC acknowledged it, for every accepted message."""
        counts = dict.fromkeys(sender.accepted, 0)
        for pdu in smsc.accepted:
            text = (pdu.octets("short_message") or b"").decode()
            if text in counts:
                counts[text] += 1
        return counts

    def assert_sent_once_each(self, losses: int) -> None:
        """Every accepted message was acknowledged by its SMSC; A's at most `losses` windows
        more than once (answers in flight when a connection was lost), B's exactly once."""
        a = self.accepted_counts(self.bad, self.sender_a)
        assert min(a.values()) >= 1
        resent = sum(n - 1 for n in a.values())
        assert resent <= losses * WINDOW, f"{resent} resends for {losses} lost connection(s)"
        assert set(self.accepted_counts(self.good, self.sender_b).values()) == {1}


async def create_channel(
    gateway: Gateway, smsc: TimedSmsc, hook: FakeWebhook, name: str, **config: Any
) -> str:
    body: dict[str, Any] = {
        "type": "smpp",
        "config": smpp_config(smsc, **config),
        "mo_url": hook.url(f"/mo/{name}"),
        "status_url": hook.url(f"/status/{name}"),
    }
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        response = await client.post(f"{gateway.base_url}/channels/", json=body)
    assert response.status_code == 201, response.text
    channel_id: str = response.json()["result"]["id"]
    remember_channel(gateway.settings, channel_id)
    return channel_id


@asynccontextmanager
async def scene(settings: Settings, **a_config: Any) -> AsyncIterator[Scene]:
    """Channels A (on the SMSC that will misbehave) and B, both bound and sent RATE/s
    until `Scene.settle`."""
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as bad,
        open_timed_smsc() as good,
        running_gateway(settings) as gateway,
    ):
        a = await create_channel(gateway, bad, hook, "a", **a_config)
        b = await create_channel(gateway, good, hook, "b")
        with trio.fail_after(WAIT):
            await bad.wait_bound()
            await good.wait_bound()
        async with (
            open_sender(gateway, a, hook, "a") as sender_a,
            open_sender(gateway, b, hook, "b") as sender_b,
            trio.open_nursery() as nursery,
        ):
            s = Scene(gateway, hook, bad, good, a, b, sender_a, sender_b)
            nursery.start_soon(s.send_steadily)
            yield s
            s.stop.set()


async def measure_b_during(
    s: Scene, fault_and_recovery: Callable[[], Awaitable[None]], *, floor: float = KEPT_SHARE
) -> tuple[float, float]:
    """B's rate over BASELINE s, then while `fault_and_recovery()` runs; asserts B kept
    `floor` of it. Returns both rates."""
    start = trio.current_time()
    await trio.sleep(BASELINE)
    baseline = s.b_rate(start, trio.current_time())
    began = trio.current_time()
    await fault_and_recovery()
    # A short fault still gets a window long enough to count a few of B's messages.
    ended = max(trio.current_time(), began + BASELINE)
    await trio.sleep_until(ended)
    during = s.b_rate(began, ended)
    print(f"B: {baseline:.1f}/s before, {during:.1f}/s during A's fault")
    assert during >= floor * baseline, (baseline, during)
    return baseline, during


async def wait_a_sends_again(s: Scene) -> None:
    """A message the API accepts for A now is submitted (A recovered for outbound)."""
    count = len(s.bad.accepted)
    with trio.fail_after(WAIT):
        await s.bad.wait_until(lambda: len(s.bad.accepted) >= count + 3)


async def test_smsc_drops_the_connection_mid_pdu(redis_settings: Settings) -> None:
    drops = 3
    async with scene(redis_settings) as s:

        async def fault() -> None:
            for _ in range(drops):
                after = len(s.statuses())
                await s.bad.drop_mid_pdu()
                await s.wait_rebound(after)

        await s.survive(fault)
    s.assert_sent_once_each(drops)
    lost = [st for st in s.statuses() if st["type"] == "connection_lost"]
    assert all("closed by the SMSC" in st["message"] for st in lost), lost


async def test_smsc_sends_garbage(embedded_settings: Settings) -> None:
    """Each kind of GARBAGE in turn. Garbage that breaks the framing drops the connection
    (the reason in the status and the channel log) and A binds again; garbage that is
    framed is answered with an error and A stays bound; a PDU whose announced body never
    comes is given up on after the bind timeout."""
    losses: dict[str, dict[str, Any]] = {}
    async with scene(embedded_settings, smpp_bind_timeout=PARTIAL_PDU_PATIENCE) as s:

        def answers() -> list[Pdu]:
            return s.bad.pdus("generic_nack") + s.bad.pdus("deliver_sm_resp")

        async def fault() -> None:
            for name, data in GARBAGE.items():
                after, answered = len(s.statuses()), len(answers())
                await s.bad.send_raw(data)
                if name in FRAMED_GARBAGE:
                    with trio.fail_after(WAIT):
                        await s.bad.wait_until(lambda: len(answers()) > answered)  # noqa: B023
                    assert answers()[-1].status != 0, name
                else:
                    losses[name] = await s.wait_rebound(after)

        await s.survive(fault)
    assert set(losses) == set(GARBAGE) - FRAMED_GARBAGE
    assert f"and no more for {PARTIAL_PDU_PATIENCE:g} s" in losses.pop("truncated_body")["message"]
    log = s.channel_log(s.a)
    for name, lost in losses.items():
        assert "invalid command_length" in lost["message"], (name, lost)
    assert log.count("unreadable stream: invalid command_length") >= len(losses)
    lost_total = sum(st["type"] == "connection_lost" for st in s.statuses())
    assert lost_total == len(losses) + 1
    s.assert_sent_once_each(lost_total)


async def test_smsc_stops_answering_enquire_link(redis_settings: Settings) -> None:
    async with scene(redis_settings, smpp_enquire_link_interval=ENQUIRE_INTERVAL) as s:

        async def fault() -> None:
            after = len(s.statuses())
            s.bad.answer_enquire_link = False
            lost = await s.wait_status({"connection_lost"}, after)
            assert "no enquire_link_resp" in lost["message"], lost
            s.bad.answer_enquire_link = True
            await s.wait_status({"bound"}, s.statuses().index(lost) + 1)

        await s.survive(fault)
    losses = [st for st in s.statuses() if st["type"] == "connection_lost"]
    s.assert_sent_once_each(len(losses))


async def test_smsc_throttles_every_submit_for_a_while(settings: Settings) -> None:
    async with scene(settings, throttle_delay=0.5) as s:

        async def fault() -> None:
            after = len(s.statuses())
            s.bad.throttle_for(THROTTLE_PERIOD)
            throttled = await s.wait_status({"throttled"}, after)
            assert throttled["status"] == "degraded", throttled
            end = await s.wait_status({"throttled_end"}, s.statuses().index(throttled) + 1)
            assert end["status"] == "ok", end
            assert not s.bad.throttling

        await s.survive(fault)
    assert s.bad.throttled > 0
    # Nothing was lost or acknowledged twice: throttled PDUs are the only ones sent again.
    s.assert_sent_once_each(0)
    assert [st for st in s.statuses() if st["type"] == "connection_lost"] == []


async def test_smsc_floods_mo(settings: Settings) -> None:
    """FLOOD deliver_sm as fast as the channel takes them, with the connection cut once
    CUT_AFTER were answered: every one the channel acknowledged reaches the mo_url, and the
    SMSC sends again what was not acknowledged, until everything was."""
    contents = [f"flood {n}".encode() for n in range(FLOOD)]
    acked: list[bytes] = []
    async with scene(settings) as s:

        async def cut_mid_flood() -> None:
            with trio.fail_after(120):
                await s.bad.wait_until(lambda: len(s.bad.pdus("deliver_sm_resp")) >= CUT_AFTER)
            await s.bad.drop_connections()

        async def fault() -> None:
            todo = contents
            for round_ in range(1, 6):
                began = trio.current_time()
                async with trio.open_nursery() as nursery:
                    if round_ == 1:
                        nursery.start_soon(cut_mid_flood)
                    with trio.fail_after(120):
                        result = await s.bad.flood_deliver_sm(todo)
                took = trio.current_time() - began
                acked.extend(result.acked)
                print(
                    f"flood round {round_}: {len(todo)} deliver_sm in {took:.1f} s,"
                    f" {len(result.acked)} acknowledged, {len(result.not_acked)} not"
                )
                todo = result.not_acked
                if not todo:
                    break
                with trio.fail_after(WAIT):
                    await s.bad.wait_bound()
            assert not todo, f"{len(todo)} deliver_sm never acknowledged"

        began = trio.current_time()
        await s.survive(fault)
        settled = trio.current_time()
        wanted = {c.decode() for c in acked}

        async def delivered() -> bool:
            return wanted <= s.mo_contents()

        with trio.fail_after(120):
            await wait_for(delivered)
        print(
            f"flood: {settled - began:.1f} s to recover and settle outbound, then"
            f" {trio.current_time() - settled:.1f} s until every MO reached the mo_url"
        )
    # Acknowledged twice only if the cut lost an answer the channel had written.
    assert set(acked) == set(contents)
    # One connection was lost (the cut): outbound answers in flight then may go again.
    s.assert_sent_once_each(1)
