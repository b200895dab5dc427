"""The real channel process: `python -m channel_proc run` spawned with real sockets and queues."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from channel_proc.transports import TRANSPORTS
from ipc.broker import MAX_PRIORITY
from ipc.client import open_ipc_client
from ipc.codec import encode_payload
from ipc.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, EXIT_UNAVAILABLE
from ipc.messages import Drain, ErrorReply, GetStatus, Ok, Role, StatusReply
from ipc.names import channel_socket, supervisor_socket
from ipc.payloads import VumiMessage
from ipc.server import serve_ipc
from ipc.settings import RedisSettings, Settings
from tests.channel_proc.support import WAIT, wait_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from ipc.broker import Broker
    from ipc.messages import Hello, Reply, Request
    from ipc.names import Namespace
    from ipc.state import StateStore
    from tests.fakes.webhook import FakeWebhook

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SECRET_TOKEN = "mo-token-Zq8x1"
SECRET_PASSWORD = "telnet-pw-Yk3v"
START_TIMEOUT = 20.0
LOCAL_TELNET = "tcp:port=0:interface=127.0.0.1"


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Unix socket paths must stay short, so not under pytest's long tmp_path.
    path = Path(tempfile.mkdtemp(prefix="jbrun-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def proc_settings(settings: Settings, run_dir: Path) -> Settings:
    return settings.model_copy(update={"run_dir": run_dir, "shutdown_grace": 3.0})


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["JUNEBUG_SETTINGS"] = settings.to_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def argv(channel_id: str) -> list[str]:
    return [sys.executable, "-m", "channel_proc", "run", "--channel-id", channel_id]


@dataclass
class Child:
    process: trio.Process
    stderr: bytearray = field(default_factory=bytearray)

    async def wait_exit(self) -> int:
        with trio.fail_after(START_TIMEOUT):
            return await self.process.wait()


@asynccontextmanager
async def spawn_channel(
    settings: Settings, channel_id: str, **extra_env: str
) -> AsyncIterator[Child]:
    process = await trio.lowlevel.open_process(
        argv(channel_id),
        env=child_env(settings, **extra_env),
        cwd=str(REPO),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child = Child(process)

    async def collect_stderr() -> None:
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some(65536):
            child.stderr += chunk

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect_stderr)
            try:
                yield child
            finally:
                if process.returncode is None:
                    process.kill()
                with trio.move_on_after(5, shield=True):
                    await process.wait()
    finally:
        with trio.move_on_after(2, shield=True):
            for stream in (process.stdin, process.stderr):
                if stream is not None:
                    await stream.aclose()


class FakeSupervisor:
    """Records the Hellos of children that announce readiness."""

    def __init__(self) -> None:
        self.peers: list[Hello] = []
        self.ready = trio.Event()

    async def handle(self, request: Request, peer: Hello) -> Reply:
        return ErrorReply(id=request.id, code=400, error_type="Unsupported", message="fake")

    async def connected(self, peer: Hello) -> None:
        self.peers.append(peer)
        self.ready.set()

    async def disconnected(self, peer: Hello) -> None:
        """Nothing to record."""


@asynccontextmanager
async def fake_supervisor(run_dir: Path) -> AsyncIterator[FakeSupervisor]:
    supervisor = FakeSupervisor()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_ipc(
                supervisor_socket(run_dir),
                supervisor,
                role=Role.SUPERVISOR,
                task_status=task_status,
            )
        )
        yield supervisor
        nursery.cancel_scope.cancel()


async def listening_port(store: StateStore, channel_id: str) -> int:
    port = 0

    async def listening() -> bool:
        nonlocal port
        telnet = (await store.get_statuses(channel_id)).get("telnet")
        if telnet is None or telnet["type"] != "listening":
            return False
        port = telnet["details"]["port"]
        return True

    with trio.fail_after(START_TIMEOUT):
        await wait_for(listening)
    return port


async def status_type(store: StateStore, channel_id: str, component: str) -> str | None:
    status = (await store.get_statuses(channel_id)).get(component)
    return None if status is None else str(status["type"])


def telnet_channel(**extra: Any) -> dict[str, Any]:
    return {
        "type": "telnet",
        "label": "test",
        "config": {"twisted_endpoint": LOCAL_TELNET},
        **extra,
    }


async def test_process_end_to_end(
    proc_settings: Settings,
    run_dir: Path,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    config = {"twisted_endpoint": LOCAL_TELNET, "password": SECRET_PASSWORD}
    await store.save_channel(
        channel_id,
        telnet_channel(
            config=config,
            mo_url=webhook.url("/mo"),
            mo_url_auth_token=SECRET_TOKEN,
            status_url=webhook.url("/status"),
        ),
    )
    async with (
        fake_supervisor(run_dir) as supervisor,
        spawn_channel(proc_settings, channel_id) as child,
    ):
        with trio.fail_after(START_TIMEOUT):
            await supervisor.ready.wait()
        (hello,) = supervisor.peers
        assert (hello.role, hello.channel_id, hello.pid) == (
            Role.CHANNEL,
            channel_id,
            child.process.pid,
        )
        port = await listening_port(store, channel_id)

        with trio.fail_after(WAIT):
            client = await trio.open_tcp_stream("127.0.0.1", port)
        async with client:
            address = "{}:{}".format(*client.socket.getsockname()[:2])
            with trio.fail_after(WAIT):
                (new,) = await webhook.wait_for_requests(1, path="/mo", delivered_only=True)
            assert new.headers["authorization"] == f"Token {SECRET_TOKEN}"
            body = new.json()
            assert (body["from"], body["to"], body["content"]) == (
                address,
                f"127.0.0.1:{port}",
                None,
            )
            assert body["channel_data"] == {"session_event": "new"}
            assert body["channel_id"] == channel_id

            await client.send_all(b"Hi there\r\n")
            with trio.fail_after(WAIT):
                resumed = (await webhook.wait_for_requests(2, path="/mo", delivered_only=True))[1]
            assert resumed.json()["content"] == "Hi there"
            assert resumed.json()["channel_data"] == {"session_event": "resume"}

            reply = VumiMessage(to_addr=address, content="hello", in_reply_to=body["message_id"])
            record = {"message_id": reply.message_id, "event_url": webhook.url("/ev")}
            await store.put_outbound(channel_id, reply.message_id, record, 600)
            queue = namespace.outbound_queue(channel_id)
            await broker.declare_queue(queue, max_priority=MAX_PRIORITY)
            await broker.publish(queue, encode_payload(reply), priority=1)
            with trio.fail_after(WAIT):
                assert await client.receive_some(100) == b"hello\r\n"
                (event,) = await webhook.wait_for_requests(1, path="/ev", delivered_only=True)
            assert event.json()["event_type"] == "submitted"
            assert event.json()["message_id"] == reply.message_id

        with trio.fail_after(WAIT):
            closed = (await webhook.wait_for_requests(3, path="/mo", delivered_only=True))[2]
        assert closed.json()["channel_data"] == {"session_event": "close"}
        assert closed.json()["from"] == address

        async with open_ipc_client(channel_socket(run_dir, channel_id), role=Role.CLI) as ipc:
            with trio.fail_after(WAIT):
                status = await ipc.request(GetStatus(id=0))
                assert isinstance(status, StatusReply)
                assert status.components["telnet"]["component"] == "telnet"
                assert status.queued_outbound == 0
                assert isinstance(await ipc.request(Drain(id=0)), Ok)
        assert await child.wait_exit() == EXIT_OK

    status_posts = [r.json()["type"] for r in webhook.on_path("/status")]
    assert "listening" in status_posts
    assert "client_connected" in status_posts

    log_file = Path(proc_settings.logging_path) / channel_id
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert all(e["logger"] == channel_id for e in entries)
    assert any("listening on 127.0.0.1" in e["message"] for e in entries)
    everything = log_file.read_text() + child.stderr.decode(errors="replace")
    assert SECRET_TOKEN not in everything
    assert SECRET_PASSWORD not in everything


async def test_process_kill_9_loses_nothing(
    proc_settings: Settings,
    store: StateStore,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    await store.save_channel(channel_id, telnet_channel(mo_url=webhook.url("/mo")))
    webhook.go_down()
    lines = [f"line {n}" for n in range(3)]
    async with spawn_channel(proc_settings, channel_id) as child:
        port = await listening_port(store, channel_id)
        async with await trio.open_tcp_stream("127.0.0.1", port) as client:
            await client.send_all("".join(f"{line}\r\n" for line in lines).encode())
            with trio.fail_after(WAIT):
                await webhook.wait_for_requests(2, path="/mo")

        async def all_queued() -> bool:
            # The transport reports the disconnect after the close message is queued.
            return await status_type(store, channel_id, "telnet") == "client_disconnected"

        with trio.fail_after(WAIT):
            await wait_for(all_queued)
        child.process.send_signal(signal.SIGKILL)
        assert await child.wait_exit() == -signal.SIGKILL
    assert webhook.delivered == []

    webhook.come_up()
    async with spawn_channel(proc_settings, channel_id) as child:
        with trio.fail_after(START_TIMEOUT):
            await webhook.wait_for_requests(5, path="/mo", delivered_only=True)
        assert child.process.stdin is not None
        await child.process.stdin.aclose()
        assert await child.wait_exit() == EXIT_OK
    delivered = {
        (r.json()["channel_data"]["session_event"], r.json()["content"]) for r in webhook.delivered
    }
    assert delivered == {("new", None), *(("resume", line) for line in lines), ("close", None)}


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
async def test_process_sigterm_stops_gracefully(
    proc_settings: Settings, store: StateStore, channel_id: str
) -> None:
    await store.save_channel(channel_id, telnet_channel())
    async with spawn_channel(proc_settings, channel_id) as child:
        await listening_port(store, channel_id)
        child.process.send_signal(signal.SIGTERM)
        assert await child.wait_exit() == EXIT_OK


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
async def test_process_missing_channel_exits_78_without_status(
    proc_settings: Settings, store: StateStore, channel_id: str
) -> None:
    async with spawn_channel(proc_settings, channel_id) as child:
        assert await child.wait_exit() == EXIT_CONFIG
    assert b"does not exist" in child.stderr
    assert await store.get_statuses(channel_id) == {}


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        (telnet_channel(config={"twisted_endpoint": "udp:9"}), "twisted_endpoint"),
        ({"type": "carrier-pigeon", "config": {}}, "unknown channel type 'carrier-pigeon'"),
        ({"config": {}}, "type: Field required"),
    ],
    ids=["bad endpoint", "unknown type", "no type"],
)
async def test_process_config_error_exits_78_with_status(
    proc_settings: Settings,
    store: StateStore,
    channel_id: str,
    properties: dict[str, Any],
    expected: str,
) -> None:
    await store.save_channel(channel_id, properties)
    async with spawn_channel(proc_settings, channel_id) as child:
        assert await child.wait_exit() == EXIT_CONFIG
    status = (await store.get_statuses(channel_id))["channel"]
    assert (status["status"], status["type"], status["channel_id"]) == (
        "down",
        "config_error",
        channel_id,
    )
    assert expected in status["message"]
    assert expected.encode() in child.stderr


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
async def test_process_clears_config_error_once_config_is_fixed(
    proc_settings: Settings, store: StateStore, channel_id: str
) -> None:
    await store.save_channel(channel_id, telnet_channel(config={}))
    async with spawn_channel(proc_settings, channel_id) as child:
        assert await child.wait_exit() == EXIT_CONFIG
    assert await status_type(store, channel_id, "channel") == "config_error"
    await store.save_channel(channel_id, telnet_channel())
    async with spawn_channel(proc_settings, channel_id) as child:
        await listening_port(store, channel_id)

        async def cleared() -> bool:
            return await status_type(store, channel_id, "channel") == "config_ok"

        with trio.fail_after(WAIT):
            await wait_for(cleared)
        assert child.process.stdin is not None
        await child.process.stdin.aclose()
        assert await child.wait_exit() == EXIT_OK


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
async def test_process_store_unreachable_exits_69(proc_settings: Settings, channel_id: str) -> None:
    unreachable = proc_settings.model_copy(
        update={"redis": RedisSettings(host="127.0.0.1", port=1)}
    )
    async with spawn_channel(unreachable, channel_id) as child:
        assert await child.wait_exit() == EXIT_UNAVAILABLE


async def test_describe_prints_config_schemas(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    result = await trio.run_process(
        [sys.executable, "-m", "channel_proc", "describe"],
        env=child_env(settings),
        cwd=str(REPO),
        capture_stdout=True,
        capture_stderr=True,
    )
    schemas = json.loads(result.stdout)
    assert set(schemas) == set(TRANSPORTS)
    assert "twisted_endpoint" in schemas["telnet"]["properties"]


async def test_describe_fails_78_when_a_custom_type_does_not_load(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, channels={"smpp": "vumi.transports.smpp.SmppTransport"})
    result = await trio.run_process(
        [sys.executable, "-m", "channel_proc", "describe"],
        env=child_env(settings),
        cwd=str(REPO),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == b""
    assert b"vumi.transports.smpp" in result.stderr


CUSTOM = "tests.channel_proc.custom_transports"


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
async def test_process_unexpected_exception_exits_70_with_traceback_logged(
    proc_settings: Settings, store: StateStore, channel_id: str
) -> None:
    custom = proc_settings.model_copy(
        update={"channels": {"crashing": f"{CUSTOM}:CrashingTransport"}}
    )
    secret = "crash-secret-Qw9"
    await store.save_channel(channel_id, {"type": "crashing", "config": {"secret_key": secret}})
    async with spawn_channel(custom, channel_id) as child:
        assert await child.wait_exit() == EXIT_SOFTWARE
    log_file = Path(proc_settings.logging_path) / channel_id
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    crash = next(e for e in entries if e["message"].startswith("crashed"))
    assert crash["message"] == "crashed: RuntimeError: provider library exploded (key ***)"
    assert crash["level"] == 40
    assert crash["exception"]["class"] == "RuntimeError"
    assert crash["exception"]["instance"] == "RuntimeError('provider library exploded (key ***)')"
    assert any("provider library exploded" in line for line in crash["exception"]["stack"])
    assert b"provider library exploded" in child.stderr
    assert secret not in log_file.read_text()
    assert secret.encode() not in child.stderr


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
async def test_process_config_error_from_transport_run_exits_78_with_status(
    proc_settings: Settings, store: StateStore, channel_id: str
) -> None:
    custom = proc_settings.model_copy(
        update={"channels": {"misconfigured": f"{CUSTOM}.MisconfiguredTransport"}}
    )
    await store.save_channel(channel_id, {"type": "misconfigured", "config": {}})
    async with spawn_channel(custom, channel_id) as child:
        assert await child.wait_exit() == EXIT_CONFIG
    status = (await store.get_statuses(channel_id))["channel"]
    assert (status["type"], status["message"]) == (
        "config_error",
        "the provider says this account does not exist",
    )


def sentry_payloads(webhook: FakeWebhook, project: str) -> list[bytes]:
    """The bodies Sentry posted to the fake webhook, uncompressed."""
    bodies = []
    for request in webhook.on_path(f"/api/{project}/envelope/"):
        encoding = request.headers.get("content-encoding", "")
        assert encoding in {"", "gzip"}, f"cannot read {encoding} bodies"
        bodies.append(gzip.decompress(request.body) if encoding == "gzip" else request.body)
    return bodies


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
async def test_process_crash_reaches_sentry_redacted_and_disable_logging_quiets_stderr(
    proc_settings: Settings, store: StateStore, channel_id: str, webhook: FakeWebhook
) -> None:
    custom = proc_settings.model_copy(
        update={
            "channels": {"crashing": f"{CUSTOM}:CrashingTransport"},
            "sentry_dsn": f"http://public-key@127.0.0.1:{webhook.port}/42",
        }
    )
    secret = "sentry-secret-Rt5"
    await store.save_channel(channel_id, {"type": "crashing", "config": {"secret_key": secret}})
    async with spawn_channel(custom, channel_id, JUNEBUG_DISABLE_LOGGING="1") as child:
        assert await child.wait_exit() == EXIT_SOFTWARE
    # Sentry flushes at exit, so its POST has arrived once the process is gone.
    payload = b"".join(sentry_payloads(webhook, "42"))
    assert b"provider library exploded (key ***)" in payload
    assert b"RuntimeError" in payload
    assert channel_id.encode() in payload
    assert secret.encode() not in payload
    assert child.stderr == b""
    log_file = Path(proc_settings.logging_path) / channel_id
    assert "crashed: RuntimeError" in log_file.read_text()
