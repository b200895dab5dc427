"""Isolation (fault scenario 7): one channel flooded while another sends at a steady rate.

    python -m bench.isolation --backend embedded|redis --flood 50000 --steady-rate 50 \\
        --seconds 30 [--flood-via api|queue] [--out results.json]

The real gateway (tests/e2e/gateway.py) runs two smpp channels, A and B, each bound to its
own SMSC simulator (bench/smsc_sim.py), each in its own OS process: A's simulator answers
hundreds of submit_sm a second, and on this loop it would slow B's sender and the clock
that measures B. Phase A: B alone is sent `--steady-rate` messages
per second, open loop (each POST on its schedule, whatever the previous one is doing), for
`--seconds`. Then A is paused and `--flood` messages are queued on it (concurrent POSTs, or
`--flood-via queue`: published straight to its outbound queue, as the API would). Phase B:
A is resumed, so it drains its backlog flat out (the harsher choice: A's process, the
broker and the store are busy the whole window; `--a-mode held` keeps A paused with its
deep queue instead), while B repeats phase A's load. Measured for B in each phase:
submit_sm seen by B's SMSC per second within the window, latency from the POST to
submit_sm (p50, p99; it includes the API's accept), and CPU seconds of B's channel process
per message; for A: its drain rate, how much backlog was left at the end of the window,
and every flooded message seen at its SMSC (lost and duplicated counted) after the drain.
Over the whole run, on the embedded backend: the largest the state file's and a queue file's
write-ahead logs got, and what the machine wrote to the data directory's disk. Before the
gateway starts, `--sync-probe` seconds of timing that disk's syncs alone (SyncFigures): B's p99
is no steadier than they are. Before and after the run, the speed of a fixed Python loop, and
in each window the CPU the hypervisor took (bench.machine), and what A's simulator used.

Phase C: once A has drained, its events are forwarded and the gateway is quiet again, B
alone again. Consecutive alone windows differ by themselves (control runs with
`--flood 1 --a-mode held` gave up to 1.14x on p50), so B under the flood is compared with
the mean of its alone windows before and after. `--a-mode burn` is the control for the
CPU: A stays paused and a plain busy loop at a draining channel's priority runs in B's
second window, so what B loses then is what any such neighbour costs it on this machine.

`--pin-flooded` confines A's channel process and A's simulator to the last CPU from before
B's first window, everything else still running on any: under the flood B then always has
the other CPUs free of A, so what it still loses comes mostly from what the channels share
besides a core (the store and queue files, the disk, the supervisor, the API worker).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import trio

from bench.broker import git_commit, machine
from bench.cli import add_service_args, check_ranges, run_main
from bench.machine import cpu_ticks, loop_ms, stolen_percent
from bench.recovery import settings_for
from bench.sched_chain import busy_loop
from bench.smpp_load import Request, cpu_seconds, process_tree, send_all, service_pids
from bench.smsc_sim import POLL_INTERVAL, SimulatorProcess
from ipc.broker import MAX_PRIORITY, open_broker
from ipc.codec import encode_payload
from ipc.names import Namespace
from ipc.payloads import VumiMessage
from tests.e2e.gateway import channel_pids, remember_channel, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway

READY_TIMEOUT: Final = 60.0
A_MODES: Final = {
    "drain": "draining",
    "held": "held, paused",
    "burn": "held, paused, a busy loop at its priority instead",
}
#: How far B's figures under the flood may be from B alone (the scenario's bound).
TOLERANCE: Final = 0.10
#: Gateway CPU seconds per second under which it counts as quiet again (B alone uses ~0.3).
QUIET_CPU: Final = 0.5


@dataclass
class SteadyFigures:
    """B's figures in one phase."""

    sent: int = 0
    refused: int = 0
    #: submit_sm of B's messages seen by its SMSC within the window, per second.
    throughput: float = 0.0
    #: The slowest second of the window (submit_sm seen in it).
    throughput_min_1s: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    accept_p50_ms: float = 0.0
    accept_p99_ms: float = 0.0
    never_submitted: int = 0
    cpu_ms_per_msg_b: float = 0.0
    cpu_s_gateway: float = 0.0
    cpu_s_services: float = 0.0
    #: Cache flushes the data directory's disk completed per second in the window (each
    #: fdatasync asks for one, whoever's), and their mean time: B's durable accepts wait
    #: for one each, so more of them or slower ones is the shared disk at work.
    device_flushes_per_s: float = 0.0
    device_flush_ms: float = 0.0
    #: CPU seconds of A's simulator in the window: a far end that a real deployment would
    #: not have on the gateway's cores.
    cpu_s_sim_a: float = 0.0
    #: The machine's CPU taken by the hypervisor in the window (bench.machine); None where
    #: the kernel does not say.
    stolen_percent: float | None = None


@dataclass
class FloodFigures:
    messages: int = 0
    via: str = "api"
    queue_rate: float = 0.0
    drain_rate: float = 0.0
    sent_in_window: int = 0
    backlog_at_window_end: int = 0
    lost: int = 0
    duplicates: int = 0
    cpu_ms_per_msg_a: float = 0.0
    drained: bool = False
    #: A's event backlog worked off and the gateway quiet before B's last window.
    settled: bool = False


@dataclass
class DiskFigures:
    """The embedded store's files over the whole run (zero on Redis/RabbitMQ)."""

    #: The largest the state file's and any queue file's write-ahead log got (sampled).
    peak_state_log_mb: float = 0.0
    peak_queue_log_mb: float = 0.0
    #: Written to the data directory's block device by the whole machine (None: no block
    #: device, e.g. tmpfs, or not Linux).
    written_mb: float | None = None


def block_device(path: Path) -> str | None:
    """The block device holding `path`, as /proc/diskstats names it."""
    dev = path.stat().st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    return sys_dev.resolve().name if sys_dev.exists() else None


def disk_counters(device: str) -> list[int] | None:
    """`device`'s line of /proc/diskstats: its counters since boot, from "reads completed"
    on (Documentation/admin-guide/iostats.rst numbers them from 1)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/diskstats").read_text().splitlines():
            fields = line.split()
            if fields[2] == device:
                return [int(field) for field in fields[3:]]
    return None


def sectors_written(device: str) -> int | None:
    """Sectors (512 bytes) written to `device` since boot (field 7)."""
    counters = disk_counters(device)
    return counters[6] if counters else None


def flushes(device: str | None) -> tuple[int, int] | None:
    """Flush requests completed and milliseconds spent on them (fields 16 and 17, since
    Linux 5.5); None without a device or those fields."""
    counters = disk_counters(device) if device else None
    if counters is None or len(counters) < 17:
        return None
    return counters[15], counters[16]


@dataclass
class DiskWatch:
    """Samples the data directory's log sizes every second while it runs (the logs grew
    without bound under a flood before the checkpoints rewound them: worth watching)."""

    data_dir: Path
    #: Its block device (None: none, e.g. tmpfs).
    device: str | None
    figures: DiskFigures = field(default_factory=DiskFigures)

    async def run(self) -> None:
        device = self.device
        start = sectors_written(device) if device else None
        try:
            while True:
                self._sample()
                await trio.sleep(1.0)
        finally:
            end = sectors_written(device) if device else None
            if start is not None and end is not None:
                self.figures.written_mb = (end - start) * 512 / 1e6

    def _sample(self) -> None:
        def size_mb(path: Path) -> float:
            try:
                return path.stat().st_size / 1e6
            except OSError:  # gone between listing and stat (a deleted queue)
                return 0.0

        figures = self.figures
        state = size_mb(self.data_dir / "state.sqlite3-wal")
        queues = max(map(size_mb, (self.data_dir / "queues").glob("*-wal")), default=0.0)
        figures.peak_state_log_mb = max(figures.peak_state_log_mb, state)
        figures.peak_queue_log_mb = max(figures.peak_queue_log_mb, queues)


@dataclass
class SyncFigures:
    """The data directory's disk on its own, before the gateway starts: a 4 KB write and its
    fdatasync every SYNC_PROBE_INTERVAL (about the rate B's accepts sync at), timed. B's p99
    cannot be steadier than the disk's own: on a shared virtual disk single syncs were seen
    to take up to 545 ms with nothing else running, and over 20 ms a dozen times a minute."""

    syncs: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    #: Syncs slower than SLOW_SYNC (twice B's p99 alone on a quiet disk).
    slow: int = 0


#: Seconds between two of the sync probe's writes.
SYNC_PROBE_INTERVAL: Final = 0.02
SLOW_SYNC: Final = 0.020


def probe_syncs(directory: Path, seconds: float) -> SyncFigures:
    """Blocking: run it in a thread. Writes over the same 256 blocks of a scratch file, so
    the file's size, and with it its metadata, stays the same after the first round."""
    path = directory / "sync-probe"
    durations: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 4096
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            os.pwrite(fd, block, len(durations) % 256 * len(block))
            os.fdatasync(fd)
            durations.append(time.monotonic() - started)
            time.sleep(SYNC_PROBE_INTERVAL)
    finally:
        os.close(fd)
        path.unlink()
    if not durations:
        return SyncFigures()
    return SyncFigures(
        syncs=len(durations),
        p50_ms=percentile_ms(durations, 50),
        p99_ms=percentile_ms(durations, 99),
        max_ms=max(durations) * 1000,
        slow=sum(1 for d in durations if d > SLOW_SYNC),
    )


def percentile_ms(values: list[float], pct: int) -> float:
    if len(values) < 2:
        return values[0] * 1000 if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1] * 1000


@dataclass
class SteadySender:
    """B's open-loop sender: POST i starts at start + i / rate."""

    client: httpx.AsyncClient
    target: str
    prefix: str
    sent_at: dict[bytes, float] = field(default_factory=dict)
    accepted_after: dict[bytes, float] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    _n: int = 0

    async def _send(self, text: bytes) -> None:
        began = time.perf_counter()
        self.sent_at[text] = began
        body = {"to": "27820000001", "from": "12345", "content": text.decode()}
        try:
            response = await self.client.post(self.target, json=body)
        except httpx.TransportError as exc:
            self.refused.append(repr(exc))
            return
        if response.status_code == 201:
            self.accepted_after[text] = time.perf_counter() - began
        else:
            self.refused.append(f"{response.status_code} {response.text[:200]}")

    async def run(self, rate: float, seconds: float) -> tuple[float, float, list[bytes]]:
        """Send for `seconds`; (window start, window end, the texts sent)."""
        texts: list[bytes] = []
        async with trio.open_nursery() as nursery:
            start = time.perf_counter()
            count = round(rate * seconds)
            for i in range(count):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await trio.sleep(delay)
                text = f"{self.prefix} {self._n}".encode()
                self._n += 1
                texts.append(text)
                nursery.start_soon(self._send, text)
            end = start + seconds
        return start, end, texts


async def create_smpp_channel(gateway: Gateway, smsc_port: int, window: int, mo_url: str) -> str:
    response = await gateway.request(
        "POST",
        "/channels/",
        {
            "type": "smpp",
            # A channel needs somewhere for MO messages to go before it may send (none come).
            "mo_url": mo_url,
            "config": {
                "twisted_endpoint": f"tcp:127.0.0.1:{smsc_port}",
                "system_id": "bench",
                "password": "pw",
                "window": window,
            },
        },
    )
    if response.status_code != 201:
        raise RuntimeError(f"channel not created: {response.text}")
    channel_id: str = response.json()["result"]["id"]
    remember_channel(gateway.settings, channel_id)

    async def bound() -> bool:
        body = (await gateway.request("GET", f"/channels/{channel_id}")).json()
        component = body["result"]["status"]["components"].get("smpp")
        return bool(component) and component["type"] == "bound"

    with trio.fail_after(READY_TIMEOUT):
        await wait_for(bound)
    return channel_id


@dataclass
class Rig:
    args: argparse.Namespace
    gateway: Gateway
    settings: Settings
    sim_a: SimulatorProcess
    sim_b: SimulatorProcess
    channel_a: str
    channel_b: str
    sender_b: SteadySender
    services: list[int]
    #: The data directory's block device (None: tmpfs, Redis/RabbitMQ's own disks).
    device: str | None = None

    def cpu(self) -> tuple[float, float, float, float]:
        """CPU seconds: B's process, A's process, the whole gateway, Redis/RabbitMQ."""
        assert self.gateway.process is not None
        tree = process_tree([self.gateway.process.pid])
        return (
            cpu_seconds(channel_pids(self.channel_b)),
            cpu_seconds(channel_pids(self.channel_a)),
            cpu_seconds(tree),
            cpu_seconds(self.services),
        )

    async def steady_phase(self) -> SteadyFigures:
        args, sim = self.args, self.sim_b
        b0, _, gw0, svc0 = self.cpu()
        sim_a0, ticks0 = cpu_seconds([self.sim_a.pid]), cpu_ticks()
        flushed0 = flushes(self.device)
        start, end, texts = await self.sender_b.run(args.steady_rate, args.seconds)
        flushed1 = flushes(self.device)
        sim_a1, ticks1 = cpu_seconds([self.sim_a.pid]), cpu_ticks()

        accepted = [t for t in texts if t in self.sender_b.accepted_after]
        submitted_at: dict[bytes, float] = {}
        with trio.move_on_after(args.timeout):
            while not all(t in submitted_at for t in accepted):
                await trio.sleep(POLL_INTERVAL)
                submitted_at = await sim.submitted_at()
        b1, _, gw1, svc1 = self.cpu()
        seen = [submitted_at[t] for t in accepted if t in submitted_at]
        in_window = [at for at in seen if start <= at < end]
        per_second = [0] * max(1, int(args.seconds))
        for at in in_window:
            per_second[min(int(at - start), len(per_second) - 1)] += 1
        latencies = [
            submitted_at[t] - self.sender_b.sent_at[t] for t in accepted if t in submitted_at
        ]
        accepts = [self.sender_b.accepted_after[t] for t in accepted]
        flush_count = flush_ms = 0
        if flushed0 is not None and flushed1 is not None:
            flush_count, flush_ms = flushed1[0] - flushed0[0], flushed1[1] - flushed0[1]
        return SteadyFigures(
            sent=len(texts),
            refused=len(texts) - len(accepted),
            throughput=len(in_window) / (end - start),
            throughput_min_1s=float(min(per_second)),
            latency_p50_ms=percentile_ms(latencies, 50),
            latency_p99_ms=percentile_ms(latencies, 99),
            accept_p50_ms=percentile_ms(accepts, 50),
            accept_p99_ms=percentile_ms(accepts, 99),
            never_submitted=len(accepted) - len(seen),
            cpu_ms_per_msg_b=(b1 - b0) * 1000 / max(1, len(texts)),
            cpu_s_gateway=gw1 - gw0,
            cpu_s_services=svc1 - svc0,
            device_flushes_per_s=flush_count / (end - start),
            device_flush_ms=flush_ms / flush_count if flush_count else 0.0,
            cpu_s_sim_a=sim_a1 - sim_a0,
            stolen_percent=stolen_percent(ticks0, ticks1),
        )

    async def settle(self) -> bool:
        """Wait until A has worked off everything its flood caused (its outbound queue, and
        the events of its sends, which it may still be forwarding after the last submit) and
        the gateway is quiet; False if that takes longer than --timeout."""
        ns = Namespace(self.settings.namespace)
        queues = (ns.outbound_queue(self.channel_a), ns.event_queue(self.channel_a))
        async with open_broker(self.settings) as broker:
            with trio.move_on_after(self.args.timeout):
                _, _, busy, _ = self.cpu()
                while True:
                    await trio.sleep(1.0)
                    _, _, now, _ = self.cpu()
                    lengths = [await broker.queue_length(q) for q in queues]
                    if not any(lengths) and now - busy < QUIET_CPU:
                        return True
                    busy = now
        return False

    async def control(self, action: str) -> None:
        response = await self.gateway.request("POST", f"/channels/{self.channel_a}/{action}")
        if response.status_code != 200:
            raise RuntimeError(f"{action} refused: {response.text}")

    async def queue_flood(self, flood: FloodFigures) -> None:
        """A paused; `--flood` messages queued on it."""
        args = self.args
        texts = [f"a {n}" for n in range(args.flood)]
        began = time.perf_counter()
        if args.flood_via == "api":
            target = f"/channels/{self.channel_a}/messages/"
            requests = [
                Request(
                    "POST",
                    target,
                    json.dumps({"to": "27820000002", "from": "12345", "content": t}).encode(),
                    201,
                )
                for t in texts
            ]
            await send_all(self.gateway.port, requests, args.flood_concurrency, [])
        else:
            await self._publish(texts)
        flood.queue_rate = args.flood / (time.perf_counter() - began)

    async def _publish(self, texts: list[str]) -> None:
        queue = Namespace(self.settings.namespace).outbound_queue(self.channel_a)
        async with open_broker(self.settings) as broker:
            await broker.declare_queue(queue, max_priority=MAX_PRIORITY)
            todo = iter(texts)

            async def publisher() -> None:
                for text in todo:
                    body = VumiMessage(to_addr="27820000002", from_addr="12345", content=text)
                    await broker.publish(queue, encode_payload(body), priority=1)

            async with trio.open_nursery() as nursery:
                for _ in range(self.args.flood_concurrency):
                    nursery.start_soon(publisher)

    async def flood_phase(self) -> tuple[SteadyFigures, FloodFigures]:
        args, sim_a = self.args, self.sim_a
        flood = FloodFigures(messages=args.flood, via=args.flood_via)
        await self.control("pause")
        await self.queue_flood(flood)
        before = (await sim_a.stats()).submits
        _, a0, _, _ = self.cpu()
        if args.a_mode == "drain":
            await self.control("resume")
            with trio.fail_after(READY_TIMEOUT):
                await sim_a.wait_until(lambda stats: stats.submits > before)
        resumed = time.perf_counter()
        if args.a_mode == "burn":
            with burning():
                steady = await self.steady_phase()
        else:
            steady = await self.steady_phase()
        in_window = (await sim_a.stats()).submits - before
        flood.sent_in_window = in_window
        flood.backlog_at_window_end = max(0, args.flood - in_window)
        if args.a_mode != "drain":
            # Only now is the backlog let go, to count what reaches A's SMSC.
            await self.control("resume")
            resumed = time.perf_counter()
        with trio.move_on_after(args.timeout):
            await sim_a.wait_until(lambda stats: stats.submits - before >= args.flood)
        _, a1, _, _ = self.cpu()
        stats = await sim_a.stats()
        done = stats.submits - before
        flood.drained = done >= args.flood
        flood.drain_rate = done / (stats.last_submit - resumed) if done else 0.0
        flood.cpu_ms_per_msg_a = (a1 - a0) * 1000 / max(1, done)
        contents = await sim_a.contents()
        flood.lost = sum(1 for n in range(args.flood) if f"a {n}".encode() not in contents)
        flood.duplicates = sum(c - 1 for c in contents.values() if c > 1)
        return steady, flood


@contextlib.contextmanager
def burning() -> Iterator[None]:
    """`--a-mode burn`'s stand-in for A, for the length of the block: a busy loop at the
    priority a channel with a backlog takes, touching neither the store nor the disk."""
    burner = busy_loop("backlog")
    try:
        yield
    finally:
        burner.kill()
        burner.wait()


def pin(pids: list[int], cpus: set[int]) -> None:
    """Every thread of `pids` to `cpus` (the affinity call moves one thread at a time;
    threads started later inherit it)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for thread in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(thread.name), cpus)


def pin_flooded(channel_a: str, sim_a: SimulatorProcess) -> str:
    """See the module docstring; returns what went where."""
    last = (os.cpu_count() or 1) - 1
    pin([*channel_pids(channel_a), sim_a.pid], {last})
    return f"A's channel process and simulator on CPU {last} only, the rest on any"


def within(alone: float, loaded: float, *, higher_is_better: bool) -> bool:
    if higher_is_better:
        return loaded >= alone * (1 - TOLERANCE)
    return loaded <= alone * (1 + TOLERANCE)


def bracket(before: SteadyFigures, after: SteadyFigures) -> SteadyFigures:
    """B alone, as the mean of the windows before and after the flood (cancels drift)."""
    mean = {
        key: (getattr(before, key) + getattr(after, key)) / 2
        for key, value in asdict(before).items()
        if isinstance(value, float) and isinstance(getattr(after, key), float)
    }
    return replace(before, **mean)


def verdicts(alone: SteadyFigures, loaded: SteadyFigures) -> dict[str, bool]:
    return {
        "throughput": within(alone.throughput, loaded.throughput, higher_is_better=True),
        "latency_p50": within(alone.latency_p50_ms, loaded.latency_p50_ms, higher_is_better=False),
        "latency_p99": within(alone.latency_p99_ms, loaded.latency_p99_ms, higher_is_better=False),
    }


ROWS: Final = (
    ("B submit_sm/s in the window", "throughput", "{:.1f}"),
    ("B slowest second (submit_sm)", "throughput_min_1s", "{:.0f}"),
    ("B POST -> submit_sm p50 (ms)", "latency_p50_ms", "{:.1f}"),
    ("B POST -> submit_sm p99 (ms)", "latency_p99_ms", "{:.1f}"),
    ("B POST -> 201 p50 (ms)", "accept_p50_ms", "{:.1f}"),
    ("B POST -> 201 p99 (ms)", "accept_p99_ms", "{:.1f}"),
    ("B process CPU per message (ms)", "cpu_ms_per_msg_b", "{:.2f}"),
    ("gateway CPU in the window (s)", "cpu_s_gateway", "{:.1f}"),
    ("Redis/RabbitMQ CPU in the window (s)", "cpu_s_services", "{:.1f}"),
    ("disk flushes per second in the window", "device_flushes_per_s", "{:.0f}"),
    ("disk flush mean time (ms)", "device_flush_ms", "{:.2f}"),
    ("A's simulator CPU in the window (s)", "cpu_s_sim_a", "{:.1f}"),
    ("CPU stolen by the hypervisor (%)", "stolen_percent", "{:.1f}"),
    ("B refused / never submitted", None, ""),
)
#: Rows that describe the machine's conditions in a window rather than B: no ratio.
CONDITIONS: Final = frozenset({"cpu_s_sim_a", "stolen_percent"})


def table(
    before: SteadyFigures, loaded: SteadyFigures, after: SteadyFigures, flood: FloodFigures
) -> str:
    """B's windows side by side; the ratio is the flooded window over the mean of the two
    alone windows."""
    alone = bracket(before, after)
    lines = [f"{'':38}{'B alone':>10}{'A flooded':>11}{'B again':>10}{'ratio':>8}"]
    for label, key, fmt in ROWS:
        if key is None:
            cells = [f"{f.refused}/{f.never_submitted}" for f in (before, loaded, after)]
            lines.append(f"{label:38}{cells[0]:>10}{cells[1]:>11}{cells[2]:>10}")
            continue
        a, b, c = (
            "-" if v is None else fmt.format(v)
            for v in (getattr(f, key) for f in (before, loaded, after))
        )
        mean, flooded = getattr(alone, key), getattr(loaded, key)
        measured = key not in CONDITIONS and mean and flooded is not None
        ratio = f"{flooded / mean:>8.2f}" if measured else ""
        lines.append(f"{label:38}{a:>10}{b:>11}{c:>10}{ratio}")
    lines.append(
        f"A: {flood.messages} queued via {flood.via} at {flood.queue_rate:.0f}/s; drained at "
        f"{flood.drain_rate:.0f}/s ({flood.cpu_ms_per_msg_a:.2f} ms CPU each); "
        f"{flood.sent_in_window} sent in the window, {flood.backlog_at_window_end} still queued "
        f"at its end; lost {flood.lost}, duplicated {flood.duplicates}"
        + ("" if flood.settled else "; NOT settled (events still queued) before B's last window")
    )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sim_a, sim_b = SimulatorProcess(), SimulatorProcess(timed=True)
    with tempfile.TemporaryDirectory(prefix="jb-isolation-") as tmp:
        settings = settings_for(args.backend, Path(tmp), args)
        speed_before = loop_ms()
        syncs = SyncFigures()
        if args.sync_probe:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            syncs = await trio.to_thread.run_sync(probe_syncs, settings.data_dir, args.sync_probe)
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=64)
        async with (
            trio.open_nursery() as nursery,
            httpx.AsyncClient(limits=limits, timeout=args.timeout) as client,
        ):
            await nursery.start(sim_a.serve)
            await nursery.start(sim_b.serve)
            async with open_fake_webhook() as hook, running_gateway(settings) as gateway:
                channel_a = await create_smpp_channel(
                    gateway, sim_a.port, args.window, hook.url("/mo")
                )
                channel_b = await create_smpp_channel(
                    gateway, sim_b.port, args.window, hook.url("/mo")
                )
                target = f"{gateway.base_url}/channels/{channel_b}/messages/"
                names = ("redis-server", "beam.smp") if args.backend == "redis" else ()
                data_dir = settings.data_dir
                device = block_device(data_dir) if data_dir.exists() else None
                rig = Rig(
                    args,
                    gateway,
                    settings,
                    sim_a,
                    sim_b,
                    channel_a,
                    channel_b,
                    SteadySender(client, target, "b"),
                    service_pids(names),
                    device,
                )
                print(
                    f"isolation[{args.backend}]: B at {args.steady_rate:g}/s for "
                    f"{args.seconds:g} s, alone, then with {args.flood} queued on A "
                    f"({A_MODES[args.a_mode]}), "
                    "then alone again"
                )
                pinned = None
                if args.pin_flooded:
                    pinned = pin_flooded(channel_a, sim_a)
                    print(f"pinned: {pinned}")
                disk = DiskWatch(data_dir, device)
                async with trio.open_nursery() as watching:
                    watching.start_soon(disk.run)
                    await SteadySender(client, target, "warm").run(args.steady_rate, args.warmup)
                    before = await rig.steady_phase()
                    loaded, flood = await rig.flood_phase()
                    flood.settled = await rig.settle()
                    after = await rig.steady_phase()
                    watching.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    verdict = verdicts(bracket(before, after), loaded)
    print(table(before, loaded, after, flood))
    print(
        "within 10% of B alone (the mean of its windows before and after): "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in verdict.items())
    )
    written = disk.figures.written_mb
    print(
        f"logs: state file's up to {disk.figures.peak_state_log_mb:.0f} MB, a queue file's up "
        f"to {disk.figures.peak_queue_log_mb:.0f} MB; "
        + (
            "no block device under the data directory"
            if written is None
            else f"{written:.0f} MB written to its disk in the run (whole machine)"
        )
    )
    if syncs.syncs:
        print(
            f"the disk alone, before the run: {syncs.syncs} syncs of 4 KB, p50 "
            f"{syncs.p50_ms:.1f} ms, p99 {syncs.p99_ms:.1f} ms, max {syncs.max_ms:.0f} ms, "
            f"{syncs.slow} over {SLOW_SYNC * 1000:.0f} ms"
        )
    speed_after = loop_ms()
    print(
        f"the machine's speed (bench.machine's loop, lower is faster): {speed_before:.0f} ms "
        f"before the run, {speed_after:.0f} ms after"
    )
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
    return {
        "benchmark": "isolation",
        "backend": args.backend,
        "flood": args.flood,
        "flood_via": args.flood_via,
        "a_mode": args.a_mode,
        "pinned": pinned,
        "steady_rate": args.steady_rate,
        "seconds": args.seconds,
        "window": args.window,
        "b_alone": asdict(before),
        "b_while_a_flooded": asdict(loaded),
        "b_alone_again": asdict(after),
        "a_flood": asdict(flood),
        "disk": asdict(disk.figures),
        "disk_syncs_alone": asdict(syncs),
        "loop_ms_before": speed_before,
        "loop_ms_after": speed_after,
        "within_10_percent": verdict,
        "git_commit": git_commit(),
        "machine": machine(),
        "load_average_1m": load,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.isolation", description=__doc__)
    parser.add_argument("--backend", choices=["embedded", "redis"], default="embedded")
    parser.add_argument("--flood", type=int, default=50_000, help="messages queued on A")
    parser.add_argument("--flood-via", choices=["api", "queue"], default="api")
    parser.add_argument("--flood-concurrency", type=int, default=50, help="A's senders")
    parser.add_argument(
        "--a-mode",
        choices=sorted(A_MODES),
        default="drain",
        help="during B's second window A drains its backlog flat out (default), or stays "
        "paused with the backlog queued (held), or stays paused while a plain busy loop at "
        "a draining channel's CPU priority runs instead (burn: what any such neighbour costs "
        "B on this machine, without the shared store and disk)",
    )
    parser.add_argument("--steady-rate", type=float, default=50.0, help="B's messages/s")
    parser.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="seconds B is sent its steady rate, unmeasured, before its first window (with "
        "1 s, its p99 was 2-8x the last window's in four runs)",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="each phase's window")
    parser.add_argument("--window", type=int, default=10, help="submit_sm in flight")
    parser.add_argument(
        "--pin-flooded",
        action="store_true",
        help="confine A's channel process and simulator to the last CPU",
    )
    parser.add_argument(
        "--sync-probe",
        type=float,
        default=15.0,
        help="seconds spent timing the data directory's disk syncs before the run (0: none)",
    )
    add_service_args(parser, timeout=600.0)
    args = parser.parse_args(argv)
    if args.pin_flooded and (os.cpu_count() or 1) < 2:
        parser.error("--pin-flooded needs at least 2 CPUs")
    check_ranges(
        parser,
        args,
        {
            "--flood": (1, 1_000_000),
            "--flood-concurrency": (1, 500),
            "--steady-rate": (0.1, 1000),
            "--seconds": (1, 3600),
            "--window": (1, 1000),
            "--sync-probe": (0, 600),
            "--warmup": (0, 600),
        },
    )
    return args


def main(argv: list[str] | None = None) -> None:
    run_main(main_async, parse_args(argv))


if __name__ == "__main__":
    main()
