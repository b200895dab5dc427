"""Queue control under load (issue 7): does the rate limit hold its rate, and does a real-time
message overtake a bulk backlog?

    python -m bench.queue_control --backend embedded|redis [--rates 50,200] [--duration 10] \\
        [--bulk 10000] [--window 10] [--out results.json]

The real gateway (`python -m supervisor`, tests/e2e/gateway.py) with smpp channels against
the fast SMSC simulator (bench/smsc_sim.py, no delivery receipts), all on loopback.

(a) Rate: one channel per target with `rate_limit_count` N per `rate_limit_window` 1 s and
    a backlog that never runs dry; measured over `--duration` whole windows from the first
    submit_sm the SMSC sees: submits per second, error against N (pass within 5%), and the
    most submits in any sliding 1 s window (the limit itself).
(b) Priority: `--bulk` bulk messages (priority 1) are queued, then one real-time message
    (priority 5) is POSTed through the API; measured: how many bulk messages the SMSC saw
    between that POST (or, when paused, the resume) and the real-time submit_sm, and its
    latency. Two set-ups: "paused" (the backlog is queued while the channel is paused, the
    real-time message too, then the channel resumes) and "rate_limited" (the backlog drains
    at `--bulk-rate` per second while the real-time message is sent).

Bulk backlogs are published straight to the channel's queue (as the API would, without its
HTTP cost); everything the channel does is real. CPU is that of the gateway's process tree.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from bisect import bisect_left
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from bench.broker import git_commit, machine
from bench.cli import add_service_args, check_ranges, run_main
from bench.smpp_load import cpu_seconds, process_tree
from bench.smsc_sim import SUBMIT_SM, SmscSimulator, parse_submit
from bench.ussd_roundtrip import settings_for
from ipc.broker import MAX_PRIORITY, open_broker
from ipc.codec import encode_payload
from ipc.names import Namespace
from ipc.payloads import VumiMessage
from tests.e2e.gateway import channel_pids, remember_channel, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook

#: The issue's bar: the limiter holds its rate within this fraction.
RATE_TOLERANCE: Final = 0.05
READY_TIMEOUT: Final = 60.0
REAL_TIME: Final = b"real-time"
BULK_PRIORITY: Final = 1
REAL_TIME_PRIORITY: Final = 5
PUBLISHERS: Final = 20


class RecordingSimulator(SmscSimulator):
    """The simulator, also keeping (time, short_message) of every submit_sm in order."""

    def __init__(self) -> None:
        super().__init__(receipts=False)
        self.submits: list[tuple[float, bytes]] = []

    def _handle(self, conn: Any, command: int, status: int, seq: int, body: bytes) -> bool:
        if command == SUBMIT_SM:
            self.submits.append((time.perf_counter(), parse_submit(body)[1]))
        return super()._handle(conn, command, status, seq, body)

    def since(self, start: float) -> list[tuple[float, bytes]]:
        return self.submits[bisect_left(self.submits, (start, b"")) :]


@dataclass
class RateResult:
    target_per_s: int
    window_s: int
    measured_per_s: float
    error_pct: float
    max_in_any_window: int
    messages_measured: int
    cpu_ms_per_message: float
    passed: bool


@dataclass
class PriorityResult:
    setup: str
    bulk_queued: int
    bulk_before_real_time: int
    real_time_latency_ms: float


async def create_channel(
    gateway: Gateway,
    sim: RecordingSimulator,
    hook: FakeWebhook,
    window: int,
    rate: int | None,
) -> str:
    body: dict[str, Any] = {
        "type": "smpp",
        "label": "bench queue control",
        "mo_url": hook.url("/mo"),
        "config": {
            "twisted_endpoint": f"tcp:127.0.0.1:{sim.port}",
            "system_id": "bench",
            "password": "pw",
            "window": window,
        },
    }
    if rate is not None:
        body.update(rate_limit_count=rate, rate_limit_window=1)
    response = await gateway.request("POST", "/channels/", body)
    if response.status_code != 201:
        raise RuntimeError(f"channel not created: {response.text}")
    channel_id: str = response.json()["result"]["id"]
    remember_channel(gateway.settings, channel_id)

    async def bound() -> bool:
        result = (await gateway.request("GET", f"/channels/{channel_id}")).json()["result"]
        component = result["status"]["components"].get("smpp")
        return bool(component) and component["type"] == "bound"

    with trio.fail_after(READY_TIMEOUT):
        await wait_for(bound)
    return channel_id


async def publish_bulk(settings: Settings, channel_id: str, count: int, tag: str) -> None:
    """Queue `count` bulk messages as the API would, PUBLISHERS at a time."""
    queue = Namespace(settings.namespace).outbound_queue(channel_id)
    bodies = iter(
        [
            encode_payload(VumiMessage(to_addr=f"2782{n:07d}", from_addr="12345", content=tag))
            for n in range(count)
        ]
    )
    async with open_broker(settings) as broker:
        await broker.declare_queue(queue, max_priority=MAX_PRIORITY)

        async def publisher() -> None:
            for body in bodies:
                await broker.publish(queue, body, priority=BULK_PRIORITY)

        async with trio.open_nursery() as nursery:
            for _ in range(PUBLISHERS):
                nursery.start_soon(publisher)


async def purge(gateway: Gateway, channel_id: str) -> None:
    """Delete the channel with its queues: what is left of its backlog must not load the
    next measurement."""
    response = await gateway.request("DELETE", f"/channels/{channel_id}")
    if response.status_code != 200:
        raise RuntimeError(f"delete failed: {response.text}")


async def measure_rate(
    args: argparse.Namespace,
    gateway: Gateway,
    sim: RecordingSimulator,
    hook: FakeWebhook,
    rate: int,
) -> RateResult:
    assert gateway.process is not None
    channel_id = await create_channel(gateway, sim, hook, args.window, rate)
    tag = f"rate {rate}".encode()
    # Enough that the queue never runs dry in the measured windows (plus slack at the ends).
    await publish_bulk(gateway.settings, channel_id, rate * (args.duration + 3), tag.decode())

    def mine() -> list[float]:
        return [t for t, text in sim.submits if text == tag]

    with trio.fail_after(READY_TIMEOUT):
        await wait_for(lambda: _answer(bool(mine())))
    first = mine()[0]
    senders = channel_pids(channel_id)
    cpu_before = cpu_by_pid(process_tree([gateway.process.pid]))
    await trio.sleep(max(0.0, first + args.duration + 0.5 - time.perf_counter()))
    cpu_after = cpu_by_pid(process_tree([gateway.process.pid]))
    # Processes that exited meanwhile are not counted; new ones count whole.
    cpu_used = sum(seconds - cpu_before.get(pid, 0.0) for pid, seconds in cpu_after.items())
    if channel_pids(channel_id) != senders:
        print(f"warning: the channel process of the {rate}/s run restarted while measured")
    times = mine()
    measured = [t for t in times if t < first + args.duration]
    per_second = len(measured) / args.duration
    error = (per_second - rate) / rate
    # The most submits within any 1 s: the limit as the SMSC sees it.
    busiest = max(bisect_left(times, t + 1.0) - i for i, t in enumerate(times))
    await purge(gateway, channel_id)
    return RateResult(
        target_per_s=rate,
        window_s=1,
        measured_per_s=round(per_second, 2),
        error_pct=round(100 * error, 2),
        max_in_any_window=busiest,
        messages_measured=len(measured),
        cpu_ms_per_message=round(1000 * cpu_used / max(1, len(measured)), 2),
        passed=abs(error) <= RATE_TOLERANCE,
    )


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds([pid]) for pid in pids}


async def _answer(value: bool) -> bool:
    """`value` as wait_for's awaitable condition (the simulator runs in this process)."""
    await trio.lowlevel.checkpoint()
    return value


async def send_real_time(gateway: Gateway, channel_id: str) -> None:
    response = await gateway.request(
        "POST",
        f"/channels/{channel_id}/messages/",
        {"to": "+27829999999", "content": REAL_TIME.decode(), "priority": REAL_TIME_PRIORITY},
    )
    if response.status_code != 201:
        raise RuntimeError(f"real-time send refused: {response.text}")


async def wait_real_time(sim: RecordingSimulator, since: float) -> float:
    def seen() -> float | None:
        return next((t for t, text in sim.since(since) if text == REAL_TIME), None)

    with trio.fail_after(READY_TIMEOUT):
        await wait_for(lambda: _answer(seen() is not None))
    found = seen()
    assert found is not None
    return found


async def measure_paused(
    args: argparse.Namespace, gateway: Gateway, sim: RecordingSimulator, hook: FakeWebhook
) -> PriorityResult:
    channel_id = await create_channel(gateway, sim, hook, args.window, None)
    paused = await gateway.request("POST", f"/channels/{channel_id}/pause")
    if paused.status_code != 200:
        raise RuntimeError(f"pause failed: {paused.text}")
    # Pausing applies within ~0.5 s (the channel re-reads its control state).
    await trio.sleep(1.0)
    await publish_bulk(gateway.settings, channel_id, args.bulk, "bulk paused")
    await send_real_time(gateway, channel_id)
    resumed_at = time.perf_counter()
    resumed = await gateway.request("POST", f"/channels/{channel_id}/resume")
    if resumed.status_code != 200:
        raise RuntimeError(f"resume failed: {resumed.text}")
    seen_at = await wait_real_time(sim, resumed_at)
    before = [text for t, text in sim.since(resumed_at) if t < seen_at]
    await purge(gateway, channel_id)
    return PriorityResult(
        setup="paused",
        bulk_queued=args.bulk,
        bulk_before_real_time=len(before),
        real_time_latency_ms=round(1000 * (seen_at - resumed_at), 1),
    )


async def measure_rate_limited(
    args: argparse.Namespace, gateway: Gateway, sim: RecordingSimulator, hook: FakeWebhook
) -> PriorityResult:
    channel_id = await create_channel(gateway, sim, hook, args.window, args.bulk_rate)
    await publish_bulk(gateway.settings, channel_id, args.bulk, "bulk limited")
    # Let the backlog drain at the limit for a while: the real-time message joins a busy queue.
    await trio.sleep(2.0)
    sent_at = time.perf_counter()
    await send_real_time(gateway, channel_id)
    seen_at = await wait_real_time(sim, sent_at)
    before = [text for t, text in sim.since(sent_at) if t < seen_at]
    await purge(gateway, channel_id)
    return PriorityResult(
        setup=f"rate_limited ({args.bulk_rate}/s)",
        bulk_queued=args.bulk,
        bulk_before_real_time=len(before),
        real_time_latency_ms=round(1000 * (seen_at - sent_at), 1),
    )


def table(rates: list[RateResult], priorities: list[PriorityResult]) -> str:
    lines = [
        "rate limit        target/s  measured/s  error %  max in 1 s  CPU ms/msg  pass",
    ]
    lines += [
        f"  {r.target_per_s:>4} per {r.window_s} s    {r.target_per_s:>7}  {r.measured_per_s:>10}"
        f"  {r.error_pct:>7}  {r.max_in_any_window:>10}  {r.cpu_ms_per_message:>10}  "
        f"{'yes' if r.passed else 'NO'}"
        for r in rates
    ]
    lines.append("real-time behind bulk      bulk queued  bulk sent before it  latency ms")
    lines += [
        f"  {p.setup:<24} {p.bulk_queued:>11}  {p.bulk_before_real_time:>19}"
        f"  {p.real_time_latency_ms:>10}"
        for p in priorities
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sim = RecordingSimulator()
    with tempfile.TemporaryDirectory(prefix="jb-bench-") as tmp:
        settings = settings_for(args.backend, Path(tmp), args)
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.serve)
            async with open_fake_webhook() as hook, running_gateway(settings) as gateway:
                rates = [await measure_rate(args, gateway, sim, hook, rate) for rate in args.rates]
                priorities = [
                    await measure_paused(args, gateway, sim, hook),
                    await measure_rate_limited(args, gateway, sim, hook),
                ]
            nursery.cancel_scope.cancel()
    print(f"queue_control[{args.backend}] window {args.window}, {args.duration} s per rate")
    print(table(rates, priorities))
    return {
        "benchmark": "queue_control",
        "backend": args.backend,
        "window": args.window,
        "duration_s": args.duration,
        "rate_tolerance": RATE_TOLERANCE,
        "rates": [asdict(r) for r in rates],
        "priority": [asdict(p) for p in priorities],
        "passed": all(r.passed for r in rates),
        "git_commit": git_commit(),
        "machine": machine(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_control", description=__doc__)
    parser.add_argument("--backend", choices=["embedded", "redis"], required=True)
    parser.add_argument("--rates", default="50,200", help="targets per second, comma-separated")
    parser.add_argument("--duration", type=int, default=10, help="measured 1 s windows per rate")
    parser.add_argument("--bulk", type=int, default=10_000, help="bulk backlog size")
    parser.add_argument("--bulk-rate", type=int, default=50, help="the rate_limited set-up's")
    parser.add_argument("--window", type=int, default=10, help="smpp submit_sm window")
    add_service_args(parser, timeout=None)
    args = parser.parse_args(argv)
    try:
        args.rates = [int(part) for part in args.rates.split(",") if part.strip()]
    except ValueError:
        parser.error("--rates must be integers separated by commas")
    if not args.rates or not all(1 <= rate <= 5000 for rate in args.rates):
        parser.error("--rates must be between 1 and 5000 per second")
    check_ranges(
        parser,
        args,
        {
            "--duration": (2, 600),
            "--bulk": (1, 100_000),
            "--bulk-rate": (1, 5000),
            "--window": (1, 100),
        },
    )
    return args


def main(argv: list[str] | None = None) -> None:
    run_main(main_async, parse_args(argv))


if __name__ == "__main__":
    main()
