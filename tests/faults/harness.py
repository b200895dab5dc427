"""What the fault tests break things with, and how they measure what survived.

- RelayProxy: a TCP relay between the gateway and RabbitMQ that a test takes down, brings
  back on the same port, or stalls (connections open, no bytes move); relayed_broker opens
  our AMQP broker through one.
- PrivateRedis: a redis-server of the test's own (append-only file, fsync always), killed
  with SIGKILL, paused with SIGSTOP and started again, without touching the shared Redis.
- TimedSmsc: the fake SMSC, noting when each PDU arrived.
- Sender: sends through the API with one pooled HTTP client, every request bounded, and
  remembers what was accepted (201) and what failed.
- Checks: every accepted message submitted (how often), every event and MO delivered.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import statistics
import subprocess
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import httpx
import trio

from ipc.broker_amqp import OPERATION_TIMEOUT, AmqpBroker
from ipc.settings import AmqpSettings
from tests.e2e.gateway import WAIT, child_pids, free_port, remember_channel, wait_for
from tests.fakes.fake_smsc import FakeSmsc, smpp_config

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from channel_proc.transports.smpp.pdu import Pdu
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook

#: Every HTTP request a fault test makes is bounded by this (a hang is a failure).
REQUEST_TIMEOUT: Final = 30.0


# --- RabbitMQ behind a relay ------------------------------------------------------------


class RelayProxy:
    """A TCP relay to (host, port) on 127.0.0.1:`port`, controlled by the test."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.port = 0
        self._up = trio.Event()
        self._up.set()
        self._serving: trio.CancelScope | None = None
        self._closed = trio.Event()
        self._flowing = trio.Event()
        self._flowing.set()
        self.connections = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; down() and up() close and reopen the listener."""
        started = False
        while True:
            await self._up.wait()
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            self._closed = trio.Event()
            try:
                with trio.CancelScope() as self._serving:
                    if not started:
                        started = True
                        task_status.started(self.port)
                    await trio.serve_listeners(self._relay, listeners)
            finally:
                for listener in listeners:
                    await listener.aclose()
                self._closed.set()

    async def down(self) -> None:
        """Cut every connection and refuse new ones (RabbitMQ is gone)."""
        self._up = trio.Event()
        if self._serving is not None:
            self._serving.cancel()
        await self._closed.wait()

    def up(self) -> None:
        """Accept connections again, on the same port."""
        self._up.set()

    def stall(self) -> None:
        """Keep every connection open but move no bytes (RabbitMQ hangs)."""
        self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    async def _relay(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            upstream = await trio.open_tcp_stream(*self._target)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
            nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                await self._flowing.wait()
                chunk = await source.receive_some(65536)
                if not chunk:
                    break
                await self._flowing.wait()
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@asynccontextmanager
async def relayed_broker(
    relay: RelayProxy, *, ride_through: float = 0.0, operation_timeout: float = OPERATION_TIMEOUT
) -> AsyncIterator[AmqpBroker]:
    """An AMQP broker connected through `relay` (brought back up and flowing before it
    closes)."""
    broker = await AmqpBroker.connect(
        AmqpSettings(hostname="127.0.0.1", port=relay.port),
        ride_through=ride_through,
        operation_timeout=operation_timeout,
    )
    try:
        yield broker
    finally:
        relay.up()
        relay.resume()
        await broker.aclose()


# --- a Redis of our own ---------------------------------------------------------------


class PrivateRedis:
    """redis-server on 127.0.0.1:`port`, persisting every write (as a production Redis
    with an append-only file would), so a restart loses nothing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: trio.Process | None = None

    async def start(self) -> None:
        assert self.process is None
        self.directory.mkdir(parents=True, exist_ok=True)
        # fmt: off
        argv = [
            "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "",
            "--appendonly", "yes", "--appendfsync", "always",
            "--logfile", str(self.directory / "redis.log"),
        ]
        # fmt: on
        self.process = await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL)
        with trio.fail_after(WAIT):
            await wait_for(self.answers)

    async def answers(self) -> bool:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError:
            return False
        async with stream:
            try:
                await stream.send_all(b"PING\r\n")
                return (await stream.receive_some(64)).startswith(b"+PONG")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False

    async def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does."""
        assert self.process is not None
        self.process.kill()
        await self.process.wait()
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@asynccontextmanager
async def private_redis(directory: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(directory)
    await server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.resume()
            with trio.CancelScope(shield=True):
                await server.kill()


# --- the SMSC, with times ---------------------------------------------------------------


class TimedSmsc(FakeSmsc):
    """The fake SMSC; `times[i]` is when `received[i]` arrived (trio clock)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.times: list[float] = []

    def _record(self, pdu: Pdu) -> None:
        self.times.append(trio.current_time())
        super()._record(pdu)

    def submitted(self) -> dict[str, list[float]]:
        """short_message text -> the times it was submitted."""
        found: dict[str, list[float]] = {}
        for pdu, at in zip(self.received, self.times, strict=True):
            if pdu.command == "submit_sm":
                text = (pdu.octets("short_message") or b"").decode()
                found.setdefault(text, []).append(at)
        return found


@asynccontextmanager
async def open_timed_smsc(**kwargs: Any) -> AsyncIterator[TimedSmsc]:
    smsc = TimedSmsc(**kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(smsc.serve)
        yield smsc
        nursery.cancel_scope.cancel()


async def create_smpp_channel(
    gateway: Gateway, smsc: FakeSmsc, hook: FakeWebhook, *, routed: bool = False, **config: Any
) -> str:
    """An smpp channel on `smsc`; its MO messages go to the hook's /mo, unless `routed`
    (no mo_url: a router's destinations will have them)."""
    body: dict[str, Any] = {"type": "smpp", "config": smpp_config(smsc, **config)}
    if not routed:
        body["mo_url"] = hook.url("/mo")
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        response = await client.post(f"{gateway.base_url}/channels/", json=body)
    body = response.json()
    assert response.status_code == 201, body
    channel_id: str = body["result"]["id"]
    remember_channel(gateway.settings, channel_id)
    return channel_id


async def wait_smpp_bound(gateway: Gateway, channel_id: str) -> None:
    async def bound() -> bool:
        try:
            body = (await gateway.request("GET", f"/channels/{channel_id}")).json()
        except httpx.TransportError:
            return False
        component = body.get("result", {}).get("status", {}).get("components", {}).get("smpp")
        return bool(component) and component["type"] == "bound"

    with trio.fail_after(WAIT):
        await wait_for(bound)


# --- sending ----------------------------------------------------------------------------


@dataclass(slots=True)
class Failure:
    at: float
    #: The HTTP status, or 0 when no answer came (connection error, timeout).
    status: int
    detail: str


@dataclass
class Sender:
    """Sends messages to one channel through the API and remembers the outcome of each."""

    client: httpx.AsyncClient
    base_url: str
    channel_id: str
    event_url: str
    prefix: str
    #: content -> message id, for every 201.
    accepted: dict[str, str] = field(default_factory=dict)
    accepted_at: dict[str, float] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    #: (when it was sent, seconds until the answer or the error) for every request.
    timings: list[tuple[float, float]] = field(default_factory=list)
    #: When each request still waiting for its answer was sent.
    pending: dict[int, float] = field(default_factory=dict)
    _numbers: itertools.count[int] = field(default_factory=itertools.count)
    _request_ids: itertools.count[int] = field(default_factory=itertools.count)

    def next_content(self) -> str:
        return f"{self.prefix} {next(self._numbers)}"

    async def send(self, content: str | None = None) -> int:
        """One send; returns the HTTP status (0: no answer)."""
        content = content or self.next_content()
        began = trio.current_time()
        key = next(self._request_ids)
        self.pending[key] = began
        try:
            return await self._send(content, began)
        finally:
            del self.pending[key]

    def settled_since(self, moment: float) -> bool:
        """Every request sent before `moment` has its answer, and three sent after it were
        accepted: the API is past whatever happened before `moment`."""
        if any(began < moment for began in self.pending.values()):
            return False
        return sum(at > moment for at in self.accepted_at.values()) >= 3

    async def _send(self, content: str, began: float) -> int:
        try:
            response = await self.client.post(
                f"{self.base_url}/channels/{self.channel_id}/messages/",
                json={
                    "to": "27820000001",
                    "from": "12345",
                    "content": content,
                    "event_url": self.event_url,
                },
                timeout=REQUEST_TIMEOUT,
            )
        except httpx.TransportError as exc:
            self.timings.append((began, trio.current_time() - began))
            self.failures.append(Failure(trio.current_time(), 0, repr(exc)))
            return 0
        self.timings.append((began, trio.current_time() - began))
        if response.status_code == 201:
            self.accepted[content] = response.json()["result"]["message_id"]
            self.accepted_at[content] = trio.current_time()
        else:
            self.failures.append(Failure(trio.current_time(), response.status_code, response.text))
        return response.status_code

    async def burst(self, count: int, *, concurrency: int = 4) -> None:
        """`count` sends, `concurrency` at a time."""
        limiter = trio.CapacityLimiter(concurrency)

        async def one() -> None:
            async with limiter:
                await self.send()

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)

    async def steady(self, rate: float, stop: trio.Event) -> None:
        """Send at `rate` per second (each on time, not after the previous answer) until `stop`."""
        period = 1.0 / rate
        async with trio.open_nursery() as nursery:
            next_at = trio.current_time()
            while not stop.is_set():
                nursery.start_soon(self.send)
                next_at += period
                with trio.move_on_at(next_at):
                    await stop.wait()


@asynccontextmanager
async def open_sender(
    gateway: Gateway, channel_id: str, hook: FakeWebhook, prefix: str
) -> AsyncIterator[Sender]:
    # Roomy: a request must never wait for a connection here, or its time would be ours.
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=16)
    async with httpx.AsyncClient(limits=limits) as client:
        yield Sender(client, gateway.base_url, channel_id, hook.url("/event"), prefix)


# --- checks ------------------------------------------------------------------------------


def submit_counts(smsc: TimedSmsc, sender: Sender) -> dict[str, int]:
    """content -> how many times the SMSC got it, for every message the API accepted."""
    submitted = smsc.submitted()
    return {content: len(submitted.get(content, [])) for content in sender.accepted}


async def wait_all_submitted(smsc: TimedSmsc, sender: Sender) -> None:
    """Until the SMSC got every message the API accepted (the caller bounds it)."""

    def done() -> bool:
        submitted = smsc.submitted()
        return all(content in submitted for content in sender.accepted)

    await smsc.wait_until(done)


def event_message_ids(hook: FakeWebhook, event_type: str = "submitted") -> set[str]:
    return {
        r.json()["message_id"]
        for r in hook.on_path("/event")
        if r.json().get("event_type") == event_type
    }


async def wait_all_events(hook: FakeWebhook, sender: Sender) -> None:
    """Until every accepted message has its `submitted` event at the event_url (the caller
    bounds it)."""
    wanted = set(sender.accepted.values())

    async def done() -> bool:
        return wanted <= event_message_ids(hook)

    await wait_for(done)


def mo_contents(hook: FakeWebhook) -> set[str]:
    return {r.json()["content"] for r in hook.on_path("/mo")}


@dataclass(frozen=True, slots=True)
class RateReport:
    """A steady sender's messages, as submitted at the SMSC within a time window."""

    target: float
    achieved: float
    latency_p50: float
    latency_max: float

    def __str__(self) -> str:
        return (
            f"{self.achieved:.1f}/s of {self.target:.1f}/s, accept->submit p50 "
            f"{self.latency_p50 * 1000:.0f} ms, max {self.latency_max * 1000:.0f} ms"
        )


def rate_report(
    smsc: TimedSmsc, sender: Sender, rate: float, start: float, end: float
) -> RateReport:
    """How the steady sender fared between `start` and `end` (by acceptance time)."""
    submitted = smsc.submitted()
    latencies = []
    for content, accepted_at in sender.accepted_at.items():
        if start <= accepted_at <= end and content in submitted:
            latencies.append(submitted[content][0] - accepted_at)
    achieved = len(latencies) / (end - start)
    return RateReport(
        target=rate,
        achieved=achieved,
        latency_p50=statistics.median(latencies) if latencies else math.inf,
        latency_max=max(latencies, default=math.inf),
    )


# --- processes ---------------------------------------------------------------------------


def api_worker_pids(gateway: Gateway) -> list[int]:
    assert gateway.process is not None
    return child_pids(gateway.process.pid, b"\0api\0")


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
