"""SMPP load: the real gateway with one smpp channel against a fast SMSC simulator.

    python -m bench.smpp_load --backend embedded|redis --messages 2000 --concurrency 50 \\
        --window 10 --mo 2000 [--api-workers 1] [--no-kannel] [--out results.json]

Starts `python -m supervisor` (tests/e2e/gateway.py), bench/smsc_sim.py and an h11 sink for
the event_url and mo_url, all on loopback. MT phase: N messages POSTed by C senders on
keep-alive connections; measured: HTTP accept rate and latency, end-to-end rate (the Nth
submit_sm at the SMSC), delivery-report rate (the Nth delivery_succeeded at the event_url).
MO phase: the SMSC sends M deliver_sm (up to 100 unanswered); rate of the Mth POST at the
mo_url. CPU seconds (utime + stime) of the supervisor and all its descendants per message,
peak RSS of their sum, and losses/duplicates. When Kannel is installed (bearerbox and
smsbox on PATH or in /usr/sbin), the same workload runs against it (sendsms with
dlr-url, get-url for MO) and the ratios are printed. Each phase is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
import urllib.parse
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import h11
import trio

from bench.broker import git_commit, machine
from bench.cli import add_service_args, check_ranges, run_main
from bench.machine import cpu_ticks, loop_ms, stolen_percent
from bench.smsc_sim import SmscSimulator
from bench.ussd_roundtrip import settings_for
from ipc.broker import MAX_PRIORITY, open_broker
from ipc.codec import encode_payload
from ipc.names import Namespace
from ipc.payloads import VumiMessage
from tests.e2e.gateway import free_port, remember_channel, running_gateway, wait_for

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
RSS_SAMPLE_INTERVAL: Final = 0.2
#: PSS makes the kernel walk each process's page tables (2.6 ms for four processes here,
#: against 0.1 ms for RSS): read this often, and whenever RSS reaches a new peak.
PSS_SAMPLE_INTERVAL: Final = 1.0
#: The measured tree is found by reading every /proc/N/stat on the machine (~130 processes
#: here, more with other work running): re-found this often, not at every RSS sample, so the
#: load tools' own CPU stays small next to the gateway's.
TREE_REFRESH_INTERVAL: Final = 2.0
READY_TIMEOUT: Final = 60.0
#: The targets of issue 4 (Kannel 1.4.5 on a 2-core machine like this one).
TARGET_ACCEPT_P99_MS: Final = 50.0
KANNEL_DLR_MASK: Final = 1 | 8  # delivered + SMSC accepted: the two events Junebug posts


# --- processes: CPU and memory ----------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after its closing one.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(roots: list[int]) -> list[int]:
    """The roots and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def role(pid: int) -> str:
    """A short name for a measured process: its command line's telling part."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    if "-m" in argv and argv.index("-m") + 1 < len(argv):
        return argv[argv.index("-m") + 1]
    return Path(argv[0]).name


def cpu_by_role(pids: list[int]) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            name = role(pid)
            seconds[name] = seconds.get(name, 0.0) + cpu_seconds([pid])
    return seconds


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
        except OSError:
            continue
    return total


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size: each shared page (the interpreter, libraries) counted once
    across the processes that map it, where RSS counts it in every one of them."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def service_pids(names: tuple[str, ...]) -> list[int]:
    """Backend services (redis-server, RabbitMQ's beam.smp) by command name."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm in names:
                pids.append(int(entry.name))
    return pids


@dataclass
class Watch:
    """The processes measured: a tree under `roots`, re-read as children come and go."""

    roots: list[int]
    services: list[int] = field(default_factory=list)
    peak_rss: int = 0
    peak_pss: int = 0

    def pids(self) -> list[int]:
        return process_tree(self.roots)

    def cpu(self) -> tuple[float, float]:
        return cpu_seconds(self.pids()), cpu_seconds(self.services)

    def roles(self) -> dict[str, float]:
        return cpu_by_role(self.pids() + self.services)

    async def sample_rss(self) -> None:
        pids: list[int] = []
        refresh_at = pss_at = 0.0
        while True:
            now = trio.current_time()
            if now >= refresh_at:
                pids = self.pids()
                refresh_at = now + TREE_REFRESH_INTERVAL
            rss = rss_bytes(pids)
            if rss > self.peak_rss or now >= pss_at:
                self.peak_pss = max(self.peak_pss, pss_bytes(pids))
                pss_at = now + PSS_SAMPLE_INTERVAL
            self.peak_rss = max(self.peak_rss, rss)
            await trio.sleep(RSS_SAMPLE_INTERVAL)


# --- the HTTP sink (event_url, mo_url, Kannel's dlr-url and get-url) --------------------------


@dataclass
class Sink:
    """Counts callbacks by kind; times are time.perf_counter() of the latest of each kind."""

    counts: Counter[str] = field(default_factory=Counter)
    last: dict[str, float] = field(default_factory=dict)
    #: Message ids (Junebug) or our ids (Kannel) per kind, to find losses and duplicates.
    ids: dict[str, Counter[str]] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)
    port: int = 0

    def reset(self) -> None:
        self.counts.clear()
        self.last.clear()
        self.ids.clear()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def record(self, kind: str, ident: str) -> None:
        self.counts[kind] += 1
        self.last[kind] = time.perf_counter()
        self.ids.setdefault(kind, Counter())[ident] += 1
        self.changed.set()
        self.changed = trio.Event()

    def take(self, method: bytes, target: bytes, body: bytes) -> None:
        path, _, query = target.decode().partition("?")
        if path == "/event":
            event = json.loads(body)
            self.record(event["event_type"], event["message_id"])
        elif path == "/mo":
            self.record("mo", json.loads(body)["content"])
        elif path == "/kdlr":
            params = urllib.parse.parse_qs(query)
            kind = {"1": "delivery_succeeded", "8": "submitted"}.get(params["type"][0], "other")
            self.record(kind, params["id"][0])
        elif path == "/kmo":
            self.record("mo", urllib.parse.parse_qs(query)["text"][0])

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        async with stream:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    return
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    self.take(request.method, request.target, bytes(body))
                    reply = conn.send(
                        h11.Response(status_code=200, headers=[("content-length", "0")])
                    )
                    reply += conn.send(h11.EndOfMessage()) or b""
                    try:
                        await stream.send_all(reply or b"")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return


# --- the senders --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    body: bytes
    expect: int


class Sender:
    """One keep-alive HTTP/1.1 connection (reopened when the server closes it)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._stream: trio.SocketStream | None = None
        self._conn = h11.Connection(h11.CLIENT)

    async def _open(self) -> trio.SocketStream:
        if self._stream is None:
            self._stream = await trio.open_tcp_stream("127.0.0.1", self._port)
            self._conn = h11.Connection(h11.CLIENT)
        return self._stream

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def call(self, req: Request) -> None:
        stream = await self._open()
        conn = self._conn
        headers = [("host", f"127.0.0.1:{self._port}"), ("content-length", str(len(req.body)))]
        if req.body:
            headers.append(("content-type", "application/json"))
        data = conn.send(h11.Request(method=req.method, target=req.target, headers=headers)) or b""
        if req.body:
            data += conn.send(h11.Data(data=req.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise RuntimeError("the server closed the connection before answering")
        if status != req.expect:
            raise RuntimeError(f"{req.method} {req.target[:80]} answered {status}")
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            await self.aclose()
        else:
            conn.start_next_cycle()


async def send_all(
    port: int, requests: list[Request], concurrency: int, latencies: list[float]
) -> None:
    """Every request, by `concurrency` senders each on its own connection."""
    todo: Iterator[Request] = iter(requests)

    async def worker() -> None:
        sender = Sender(port)
        try:
            for req in todo:
                started = time.perf_counter()
                await sender.call(req)
                latencies.append(time.perf_counter() - started)
        finally:
            await sender.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)


# --- the workload, for either gateway -----------------------------------------------------------


@dataclass
class Figures:
    messages: int = 0
    accept_rate: float = 0.0
    accept_p50_ms: float = 0.0
    accept_p99_ms: float = 0.0
    e2e_rate: float = 0.0
    submitted_events: int = 0
    dlr_rate: float = 0.0
    dlr_events: int = 0
    mo: int = 0
    mo_rate: float = 0.0
    mo_delivered: int = 0
    #: deliver_sm answered by the gateway (durably queued) per second: the SMPP side alone.
    mo_ack_rate: float = 0.0
    #: CPU of this benchmark process (simulator, sink, senders) per MT: the load tools' share.
    bench_cpu_ms_per_mt: float = 0.0
    cpu_ms_per_mt: float = 0.0
    cpu_ms_per_mo: float = 0.0
    service_cpu_ms_per_mt: float = 0.0
    service_cpu_ms_per_mo: float = 0.0
    peak_rss_mb: float = 0.0
    peak_pss_mb: float = 0.0
    lost_submits: int = 0
    duplicate_submits: int = 0
    lost_dlrs: int = 0
    lost_mo: int = 0
    #: --direct: messages published straight to the outbound queue (no API), and the rate
    #: the channel drained them to the SMSC (first to last submit_sm).
    direct: int = 0
    direct_rate: float = 0.0
    #: CPU ms per MT message (MT phase) by process kind, services included.
    cpu_ms_per_mt_by_process: dict[str, float] = field(default_factory=dict)
    #: The machine's CPU the hypervisor took in the MT and MO phases (bench.machine); None
    #: where the kernel does not say.
    stolen_percent_mt: float | None = None
    stolen_percent_mo: float | None = None
    #: bench.machine's loop just before this side ran: the two sides of a ratio run one
    #: after the other, and the machine's speed can change between them.
    loop_ms_before: float = 0.0


def percentile(values: list[float], pct: int) -> float:
    if len(values) < 2:
        return values[0] * 1000 if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1] * 1000


async def bounded(seconds: float, what: str, wait: Callable[[], Awaitable[None]]) -> None:
    try:
        with trio.fail_after(seconds):
            await wait()
    except trio.TooSlowError:
        print(f"  ! timed out after {seconds:g} s waiting for {what}")


@dataclass
class Workload:
    args: argparse.Namespace
    sim: SmscSimulator
    sink: Sink
    port: int
    make_request: Callable[[int], Request]
    mo_kind: str = "mo"

    def contents(self, start: int, count: int) -> list[bytes]:
        return [f"bench {n}".encode() for n in range(start, start + count)]

    async def warm_up(self) -> None:
        count = self.args.warmup
        if not count:
            return
        requests = [self.make_request(n) for n in range(-count, 0)]
        await send_all(self.port, requests, self.args.concurrency, [])
        await bounded(
            self.args.timeout,
            "the warm-up's delivery reports",
            lambda: wait_count(self.sink, "delivery_succeeded", count),
        )
        self.sim.stats.reset()
        self.sink.reset()

    async def run(self, watch: Watch) -> Figures:
        args, sim, sink = self.args, self.sim, self.sink
        figures = Figures(messages=args.messages, mo=args.mo)
        latencies: list[float] = []
        requests = [self.make_request(n) for n in range(args.messages)]
        # The load tools' own full collections would stall every request they time (14-30 ms
        # each, seen with gc.callbacks): what exists now is out of the collector's sight.
        gc.freeze()
        cpu0, svc0 = watch.cpu()
        roles0 = watch.roles()
        ticks0 = cpu_ticks()
        own0 = sum(os.times()[:2])
        started = time.perf_counter()
        await send_all(self.port, requests, args.concurrency, latencies)
        accepted = time.perf_counter()
        await bounded(
            args.timeout,
            "every submit_sm",
            lambda: sim.wait_until(lambda: sim.stats.submits >= args.messages),
        )
        await bounded(
            args.timeout,
            "every delivery report",
            lambda: wait_count(sink, "delivery_succeeded", args.messages),
        )
        await bounded(
            args.timeout,
            "every submitted event",
            lambda: wait_count(sink, "submitted", args.messages),
        )
        cpu1, svc1 = watch.cpu()
        figures.stolen_percent_mt = stolen_percent(ticks0, cpu_ticks())
        figures.bench_cpu_ms_per_mt = (sum(os.times()[:2]) - own0) * 1000 / args.messages
        roles = watch.roles()
        figures.cpu_ms_per_mt_by_process = {
            name: round((seconds - roles0.get(name, 0.0)) * 1000 / args.messages, 3)
            for name, seconds in roles.items()
        }
        figures.accept_rate = args.messages / (accepted - started)
        figures.accept_p50_ms = percentile(latencies, 50)
        figures.accept_p99_ms = percentile(latencies, 99)
        stats = sim.stats
        if stats.submits:
            figures.e2e_rate = min(stats.submits, args.messages) / (stats.last_submit - started)
        figures.dlr_events = sink.counts["delivery_succeeded"]
        figures.submitted_events = sink.counts["submitted"]
        if figures.dlr_events:
            figures.dlr_rate = figures.dlr_events / (sink.last["delivery_succeeded"] - started)
        figures.cpu_ms_per_mt = (cpu1 - cpu0) * 1000 / args.messages
        figures.service_cpu_ms_per_mt = (svc1 - svc0) * 1000 / args.messages
        expected = set(self.contents(0, args.messages))
        figures.lost_submits = len(expected - set(stats.contents))
        figures.duplicate_submits = sum(n - 1 for n in stats.contents.values() if n > 1)
        figures.lost_dlrs = max(0, args.messages - len(sink.ids.get("delivery_succeeded", {})))
        if args.mo:
            cpu0, svc0 = watch.cpu()
            ticks0 = cpu_ticks()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sim.flood_mo, args.mo)
                await bounded(
                    args.timeout, "every MO message", lambda: wait_count(sink, "mo", args.mo)
                )
                nursery.cancel_scope.cancel()
            cpu1, svc1 = watch.cpu()
            figures.stolen_percent_mo = stolen_percent(ticks0, cpu_ticks())
            figures.mo_delivered = sink.counts["mo"]
            if stats.mo_acked:
                figures.mo_ack_rate = stats.mo_acked / (stats.last_mo_ack - stats.first_mo)
            if figures.mo_delivered:
                figures.mo_rate = figures.mo_delivered / (sink.last["mo"] - stats.first_mo)
            figures.cpu_ms_per_mo = (cpu1 - cpu0) * 1000 / args.mo
            figures.service_cpu_ms_per_mo = (svc1 - svc0) * 1000 / args.mo
            figures.lost_mo = args.mo - len(sink.ids.get("mo", {}))
        figures.peak_rss_mb = watch.peak_rss / 2**20
        figures.peak_pss_mb = watch.peak_pss / 2**20
        return figures


async def wait_count(sink: Sink, kind: str, count: int) -> None:
    while sink.counts[kind] < count:
        await sink.changed.wait()


def to_number(n: int) -> str:
    return f"2782{n % 10_000_000:07d}"


# --- Junebug ------------------------------------------------------------------------------------


async def run_junebug(args: argparse.Namespace, sim: SmscSimulator, sink: Sink) -> Figures:
    with tempfile.TemporaryDirectory(prefix="jb-smpp-bench-") as tmp:
        settings = settings_for(args.backend, Path(tmp), args)
        extra = ["--api-workers", str(args.api_workers)]
        async with running_gateway(settings, extra_args=extra) as gateway:
            assert gateway.process is not None
            channel_id = await create_channel(gateway, sim, sink, args.window)
            names = ("redis-server", "beam.smp") if args.backend == "redis" else ()
            watch = Watch([gateway.process.pid], service_pids(names))
            workload = Workload(
                args, sim, sink, gateway.port, junebug_request(channel_id, sink.url("/event"))
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.sample_rss)
                await workload.warm_up()
                figures = await workload.run(watch)
                if args.direct:
                    figures.direct = args.direct
                    figures.direct_rate = await drain_direct(args, settings, channel_id, sim)
                nursery.cancel_scope.cancel()
    return figures


async def drain_direct(
    args: argparse.Namespace, settings: Settings, channel_id: str, sim: SmscSimulator
) -> float:
    """Publish --direct messages to the channel's outbound queue (as the API does, without
    its HTTP and store work); the rate the channel sent them on (first to last submit_sm)."""
    sim.stats.reset()
    queue = Namespace(settings.namespace).outbound_queue(channel_id)
    bodies = [
        encode_payload(VumiMessage(to_addr=to_number(n), from_addr="12345", content=f"direct {n}"))
        for n in range(args.direct)
    ]
    async with open_broker(settings) as broker:
        await broker.declare_queue(queue, max_priority=MAX_PRIORITY)
        todo = iter(bodies)

        async def publisher() -> None:
            for body in todo:
                await broker.publish(queue, body, priority=1)

        async with trio.open_nursery() as nursery:
            for _ in range(args.concurrency):
                nursery.start_soon(publisher)
    await bounded(
        args.timeout,
        "every direct submit_sm",
        lambda: sim.wait_until(lambda: sim.stats.submits >= args.direct),
    )
    stats = sim.stats
    if stats.submits < 2:
        return 0.0
    return (stats.submits - 1) / (stats.last_submit - stats.first_submit)


def junebug_request(channel_id: str, event_url: str) -> Callable[[int], Request]:
    target = f"/channels/{channel_id}/messages/"

    def make(n: int) -> Request:
        body = {
            "to": to_number(n),
            "from": "12345",
            "content": f"bench {n}",
            "event_url": event_url,
        }
        return Request("POST", target, json.dumps(body).encode(), 201)

    return make


async def create_channel(gateway: Gateway, sim: SmscSimulator, sink: Sink, window: int) -> str:
    response = await gateway.request(
        "POST",
        "/channels/",
        {
            "type": "smpp",
            "label": "bench",
            "mo_url": sink.url("/mo"),
            "config": {
                "twisted_endpoint": f"tcp:127.0.0.1:{sim.port}",
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


# --- Kannel -------------------------------------------------------------------------------------


def kannel_binaries() -> tuple[str, str] | None:
    found = [
        shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
        for name in ("bearerbox", "smsbox")
    ]
    if found[0] is None or found[1] is None:
        return None
    return found[0], found[1]


def kannel_config(tmp: Path, sim_port: int, sink: Sink, window: int) -> tuple[str, int]:
    """The kannel.conf text and the sendsms port."""
    admin, box, sendsms = free_port(), free_port(), free_port()
    get_url = sink.url("/kmo") + "?text=%a"
    conf = f"""
group = core
admin-port = {admin}
admin-password = bench
admin-interface = 127.0.0.1
smsbox-port = {box}
smsbox-interface = 127.0.0.1
log-file = "{tmp}/bearerbox.log"
log-level = 1
access-log = "{tmp}/access.log"
store-type = file
store-location = "{tmp}/kannel.store"
dlr-storage = internal

group = smsc
smsc = smpp
smsc-id = sim
host = 127.0.0.1
port = {sim_port}
transceiver-mode = true
smsc-username = bench
smsc-password = pw
system-type = "bench"
max-pending-submits = {window}
msg-id-type = 0x00
enquire-link-interval = 55
reconnect-delay = 1

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {box}
sendsms-port = {sendsms}
sendsms-interface = 127.0.0.1
log-file = "{tmp}/smsbox.log"
log-level = 1
access-log = "{tmp}/smsbox-access.log"

group = sendsms-user
username = bench
password = bench
max-messages = 1

group = sms-service
keyword = default
catch-all = true
max-messages = 0
get-url = "{get_url}"
"""
    return conf, sendsms


def kannel_request(port_sink: Sink) -> Callable[[int], Request]:
    def make(n: int) -> Request:
        dlr_url = port_sink.url("/kdlr") + f"?type=%d&id={n}"
        query = urllib.parse.urlencode(
            {
                "username": "bench",
                "password": "bench",
                "from": "12345",
                "to": to_number(n),
                "text": f"bench {n}",
                "dlr-mask": str(KANNEL_DLR_MASK),
                "dlr-url": dlr_url,
            }
        )
        return Request("GET", f"/cgi-bin/sendsms?{query}", b"", 202)

    return make


async def run_kannel(
    args: argparse.Namespace, sim: SmscSimulator, sink: Sink, binaries: tuple[str, str]
) -> Figures:
    bearerbox, smsbox = binaries
    with tempfile.TemporaryDirectory(prefix="kannel-bench-") as tmp_name:
        tmp = Path(tmp_name)
        conf, sendsms = kannel_config(tmp, sim.port, sink, args.window)
        path = tmp / "kannel.conf"
        path.write_text(conf)
        out = (tmp / "kannel.out").open("wb")
        binds = sim.stats.binds
        async with trio.open_nursery() as nursery:
            bearer = await nursery.start(_process, [bearerbox, str(path)], out)
            await bounded(
                READY_TIMEOUT,
                "Kannel's bind",
                lambda: sim.wait_until(lambda: sim.stats.binds > binds),
            )
            box = await nursery.start(_process, [smsbox, str(path)], out)
            await _wait_listening(sendsms)
            watch = Watch([bearer.pid, box.pid])
            workload = Workload(args, sim, sink, sendsms, kannel_request(sink))
            nursery.start_soon(watch.sample_rss)
            await workload.warm_up()
            figures = await workload.run(watch)
            nursery.cancel_scope.cancel()
        out.close()
    return figures


async def _process(
    command: list[str], out: Any, *, task_status: trio.TaskStatus[trio.Process]
) -> None:
    process = await trio.lowlevel.open_process(command, stdout=out, stderr=out)
    try:
        task_status.started(process)
        await process.wait()
    finally:
        with trio.move_on_after(5, shield=True):
            process.terminate()
            await process.wait()
        if process.returncode is None:
            process.kill()


async def _wait_listening(port: int) -> None:
    async def listening() -> bool:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return False
        await stream.aclose()
        return True

    with trio.fail_after(READY_TIMEOUT):
        await wait_for(listening)


# --- report -------------------------------------------------------------------------------------


ROWS: Final = (
    ("HTTP accept rate (msg/s)", "accept_rate", "{:.0f}"),
    ("accept latency p50 (ms)", "accept_p50_ms", "{:.1f}"),
    ("accept latency p99 (ms)", "accept_p99_ms", "{:.1f}"),
    ("end-to-end MT rate (submit_sm/s)", "e2e_rate", "{:.0f}"),
    ("delivery reports at event_url /s", "dlr_rate", "{:.0f}"),
    ("MO rate (SMSC -> mo_url, msg/s)", "mo_rate", "{:.0f}"),
    ("  MO queued (deliver_sm_resp/s)", "mo_ack_rate", "{:.0f}"),
    ("queue -> SMSC drain, --direct (msg/s)", "direct_rate", "{:.0f}"),
    ("CPU per MT + its DLR (ms)", "cpu_ms_per_mt", "{:.2f}"),
    ("  + Redis/RabbitMQ CPU per MT (ms)", "service_cpu_ms_per_mt", "{:.2f}"),
    ("CPU per MO (ms)", "cpu_ms_per_mo", "{:.2f}"),
    ("  + Redis/RabbitMQ CPU per MO (ms)", "service_cpu_ms_per_mo", "{:.2f}"),
    ("peak RSS, all processes (MB)", "peak_rss_mb", "{:.0f}"),
    ("  peak PSS (shared pages once) (MB)", "peak_pss_mb", "{:.0f}"),
    ("load tools' CPU per MT (ms)", "bench_cpu_ms_per_mt", "{:.2f}"),
    ("CPU stolen by the hypervisor, MT (%)", "stolen_percent_mt", "{:.1f}"),
    ("CPU stolen by the hypervisor, MO (%)", "stolen_percent_mo", "{:.1f}"),
    ("machine speed: loop before (ms)", "loop_ms_before", "{:.0f}"),
    ("lost / duplicate submit_sm", None, ""),
    ("lost delivery reports / MO", None, ""),
)
#: Higher is better for these; the ratio is Junebug / Kannel either way.
RATIO_KEYS: Final = (
    "accept_rate",
    "e2e_rate",
    "dlr_rate",
    "mo_rate",
    "cpu_ms_per_mt",
    "cpu_ms_per_mo",
    "peak_rss_mb",
    "peak_pss_mb",
)


def table(junebug: Figures, kannel: Figures | None) -> str:
    lines = [f"{'':38}{'junebug':>12}{'kannel':>12}{'ratio':>8}"]
    for label, key, fmt in ROWS:
        if key is None:
            if label.startswith("lost / dup"):
                cells = [f"{f.lost_submits}/{f.duplicate_submits}" for f in (junebug, kannel) if f]
            else:
                cells = [f"{f.lost_dlrs}/{f.lost_mo}" for f in (junebug, kannel) if f]
            lines.append(f"{label:38}" + "".join(f"{c:>12}" for c in cells))
            continue
        ours = getattr(junebug, key)
        row = f"{label:38}{_cell(fmt, ours):>12}"
        if kannel is not None:
            theirs = getattr(kannel, key)
            row += f"{_cell(fmt, theirs):>12}"
            if key in RATIO_KEYS and theirs:
                row += f"{ours / theirs:>8.2f}"
        lines.append(row)
    return "\n".join(lines)


def _cell(fmt: str, value: float | None) -> str:
    return "-" if value is None else fmt.format(value)


def ratios(junebug: Figures, kannel: Figures) -> dict[str, float | None]:
    return {
        key: (getattr(junebug, key) / getattr(kannel, key) if getattr(kannel, key) else None)
        for key in RATIO_KEYS
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sim = SmscSimulator(mo_window=args.mo_window)
    sink = Sink()
    binaries = None if args.no_kannel else kannel_binaries()
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve)
        await nursery.start(sink.serve)
        print(
            f"smpp_load[{args.backend}]: {args.messages} MT at concurrency {args.concurrency}, "
            f"window {args.window}, {args.mo} MO, {args.api_workers} API worker(s)"
        )
        speed = loop_ms()
        junebug = Figures() if args.kannel_only else await run_junebug(args, sim, sink)
        junebug.loop_ms_before = speed
        kannel = None
        if binaries is not None:
            sim.stats.reset()
            sink.reset()
            speed = loop_ms()
            kannel = await run_kannel(args, sim, sink, binaries)
            kannel.loop_ms_before = speed
        elif not args.no_kannel:
            print("  (Kannel is not installed: apt-get install kannel to compare)")
        nursery.cancel_scope.cancel()
    print(table(junebug, kannel))
    for name, figures in (("junebug", junebug), ("kannel", kannel)):
        if figures is not None:
            parts = ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(figures.cpu_ms_per_mt_by_process.items())
            )
            print(f"CPU ms per MT by process ({name}): {parts}")
    speed_after = loop_ms()
    print(f"the machine's speed (bench.machine's loop) at the end: {speed_after:.0f} ms")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        f"targets: e2e and MO rates >= Kannel's at the same window; accept p99 < "
        f"{TARGET_ACCEPT_P99_MS:.0f} ms at 50 senders; nothing lost"
    )
    return {
        "benchmark": "smpp_load",
        "backend": args.backend,
        "messages": args.messages,
        "concurrency": args.concurrency,
        "window": args.window,
        "mo": args.mo,
        "api_workers": args.api_workers,
        "warmup": args.warmup,
        "junebug": asdict(junebug),
        "kannel": asdict(kannel) if kannel is not None else None,
        "ratios_junebug_over_kannel": ratios(junebug, kannel) if kannel is not None else None,
        "git_commit": git_commit(),
        "machine": machine(),
        # Other work on the machine skews every figure: the 1-minute load at the end.
        "load_average_1m": os.getloadavg()[0],
        "loop_ms_after": speed_after,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.smpp_load", description=__doc__)
    parser.add_argument("--backend", choices=["embedded", "redis"], default="embedded")
    parser.add_argument("--messages", type=int, default=2000, help="MT messages measured")
    parser.add_argument("--concurrency", type=int, default=50, help="HTTP senders")
    parser.add_argument("--window", type=int, default=10, help="submit_sm in flight")
    parser.add_argument("--mo", type=int, default=2000, help="MO messages (0: no MO phase)")
    parser.add_argument("--mo-window", type=int, default=100, help="deliver_sm unanswered")
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=100, help="MT messages before measuring")
    parser.add_argument(
        "--direct",
        type=int,
        default=0,
        help="then publish this many straight to the outbound queue: the channel's own rate",
    )
    parser.add_argument("--no-kannel", action="store_true", help="skip the Kannel comparison")
    parser.add_argument("--kannel-only", action="store_true", help="measure Kannel alone")
    add_service_args(parser, timeout=180.0)
    args = parser.parse_args(argv)
    check_ranges(
        parser,
        args,
        {
            "--messages": (10, 100_000),
            "--concurrency": (1, 500),
            "--window": (1, 1000),
            "--mo": (0, 100_000),
            "--api-workers": (1, 16),
        },
    )
    return args


def main(argv: list[str] | None = None) -> None:
    run_main(main_async, parse_args(argv))


if __name__ == "__main__":
    main()
