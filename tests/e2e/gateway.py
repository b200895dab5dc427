"""Runs the real junebug-supervisor (`python -m supervisor`) for end-to-end tests.

Everything is real: the supervisor process, its API worker(s) and channel
processes, the store and broker, HTTP over TCP. Only the webhook receiver
(tests/fakes/webhook.py) and the telnet user (a TCP client) are fakes.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from ipc.broker import open_broker
from ipc.names import Namespace
from ipc.state_redis import RedisStateStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from ipc.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: Default deadline for a condition in another process to hold.
WAIT = 30


async def wait_for(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll `condition` until it holds (the caller bounds it with trio.fail_after)."""
    # Polling: the state lives in other processes, with no event to wait on.
    while not await condition():  # noqa: ASYNC110
        await trio.sleep(0.05)


def cli_args(settings: Settings, port: int) -> list[str]:
    """The junebug-supervisor flags that reproduce `settings` (as a user would type them)."""
    args = [
        "-i", "127.0.0.1",
        "-p", str(port),
        "--data-dir", str(settings.data_dir),
        "--logging-path", settings.logging_path,
        "--namespace", settings.namespace,
        "--shutdown-grace", "3",
    ]  # fmt: skip
    if settings.redis is not None:
        args += ["--redis-host", settings.redis.host, "--redis-port", str(settings.redis.port)]
    if settings.amqp is not None:
        args += ["--amqp-host", settings.amqp.hostname, "--amqp-port", str(settings.amqp.port)]
    return args


@dataclass
class Gateway:
    """One running junebug-supervisor and an HTTP client for its API."""

    settings: Settings
    port: int
    extra_args: list[str] = field(default_factory=list)
    process: trio.Process | None = None
    log_path: Path | None = None
    #: Client connections a test opened to the channels; closed when the gateway context exits,
    #: so a failed test leaves no socket for a later test's garbage collection to report.
    clients: list[trio.SocketStream] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        assert self.process is None
        self.log_path = Path(self.settings.logging_path).parent / "supervisor.out"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "supervisor",
                *cli_args(self.settings, self.port),
                *self.extra_args,
            ],
            stdout=out,
            stderr=out,
            env=env,
        )
        out.close()

        async def healthy() -> bool:
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"supervisor exited early:\n{self.output()}")
            try:
                async with httpx.AsyncClient() as client:
                    response = await client.get(f"{self.base_url}/health", timeout=2)
            except httpx.TransportError:
                return False
            return response.status_code == 200

        with trio.fail_after(60):
            await wait_for(healthy)

    async def stop(self) -> int:
        """SIGTERM and wait: the supervisor drains and exits by itself."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            code = await self.process.wait()
        self.process = None
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    async def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as client:
            if body is None:
                return await client.request(method, path)
            return await client.request(method, path, json=body)


def channel_pids(channel_id: str) -> list[int]:
    """Pids of the channel's process, read from /proc (what an operator's `pgrep -f` finds)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"channel_proc" in cmdline and channel_id.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def child_pids(parent: int, marker: bytes = b"") -> list[int]:
    """Pids of `parent`'s children (its API workers and channel processes) whose command
    line contains `marker`, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and marker in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


@asynccontextmanager
async def running_gateway(
    settings: Settings, *, extra_args: list[str] | None = None
) -> AsyncIterator[Gateway]:
    gateway = Gateway(settings, free_port(), extra_args or [])
    await gateway.start()
    try:
        yield gateway
    finally:
        with trio.CancelScope(shield=True):
            for client in gateway.clients:
                await client.aclose()
        if gateway.process is not None:
            code = await gateway.stop()
            assert code == 0, gateway.output()
        await _clean_backends(settings)


async def _clean_backends(settings: Settings) -> None:
    namespace = Namespace(settings.namespace)
    if settings.redis is not None:
        store = await RedisStateStore.connect(settings.redis, namespace)
        try:
            await store.purge_namespace()
        finally:
            await store.aclose()
    if settings.amqp is not None:
        # Queues are named after the namespace; the tests record the channels they made.
        async with open_broker(settings) as broker:
            for channel_id in CREATED.pop(settings.namespace, []):
                for queue in namespace.channel_queues(channel_id):
                    await broker.delete_queue(queue)
                await broker.delete_queue(namespace.queue(f"{channel_id}.dead"))


#: namespace -> channel ids created, so teardown can delete their RabbitMQ queues.
CREATED: dict[str, list[str]] = {}


def remember_channel(settings: Settings, channel_id: str) -> None:
    CREATED.setdefault(settings.namespace, []).append(channel_id)
