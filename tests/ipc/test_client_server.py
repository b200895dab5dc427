"""Client and server over real Unix sockets: handshake, replies by id, remote errors, and every
way a connection can end (peer killed, bad data, version mismatch, nothing listening)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from ipc.client import open_ipc_client
from ipc.connection import Connection
from ipc.errors import ConnectionClosedError, ProtocolError, RemoteError
from ipc.messages import (
    PROTOCOL_VERSION,
    Drain,
    GetStatus,
    Hello,
    Ok,
    Ping,
    RestartChannel,
    Role,
    StartChannel,
    StatusReply,
    StopChannel,
)
from ipc.server import serve_ipc

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ipc.messages import Reply, Request

REPO = Path(__file__).resolve().parents[2]


class RecordingHandler:
    """Answers by request type; records the handshake callbacks and what it was asked."""

    def __init__(self) -> None:
        self.connected_peers: list[Hello] = []
        self.disconnected_peers: list[Hello] = []
        self.disconnected_event = trio.Event()
        self.seen_ids: list[int] = []
        #: Drain blocks until released, so a request can be kept in flight.
        self.drain_started = trio.Event()
        self.drain_release = trio.Event()
        self.drain_cancelled = trio.Event()
        #: RestartChannel requests park here until `restarts_expected` have arrived.
        self.restarts_expected = 0
        self._restart_gates: dict[str, trio.Event] = {}
        self._restarts_arrived: list[str] = []

    async def handle(self, request: Request, peer: Hello) -> Reply:
        self.seen_ids.append(request.id)
        match request:
            case Ping():
                return Ok(id=request.id, detail=f"pong {peer.role}")
            case GetStatus():
                return StatusReply(id=request.id, channel_id="c1", components={"t": {"ok": True}})
            case StartChannel(channel_id="boom"):
                raise ValueError("bad config")
            case StartChannel(channel_id="unknown"):
                raise RemoteError("UnknownChannel", "no such channel", code=404)
            case StartChannel():
                # A reply built with the wrong id must still reach the right request.
                return Ok(id=request.id + 1000, detail="started")
            case RestartChannel():
                return await self._restart(request)
            case Drain():
                self.drain_started.set()
                try:
                    await self.drain_release.wait()
                except trio.Cancelled:
                    self.drain_cancelled.set()
                    raise
                return Ok(id=request.id, detail="drained")
            case _:
                raise NotImplementedError(request.type)

    async def _restart(self, request: RestartChannel) -> Reply:
        gate = self._restart_gates[request.channel_id] = trio.Event()
        self._restarts_arrived.append(request.channel_id)
        if len(self._restarts_arrived) == self.restarts_expected:
            # Answer in the reverse order of arrival, so replies cross requests on the wire.
            for channel_id in reversed(self._restarts_arrived):
                self._restart_gates[channel_id].set()
                await trio.testing.wait_all_tasks_blocked()
        await gate.wait()
        return Ok(id=request.id, detail=request.channel_id)

    async def connected(self, peer: Hello) -> None:
        self.connected_peers.append(peer)

    async def disconnected(self, peer: Hello) -> None:
        self.disconnected_peers.append(peer)
        self.disconnected_event.set()


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose socket paths fit AF_UNIX's ~108-byte limit."""
    if len(str(tmp_path / "supervisor.sock")) <= 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="jb"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: Path) -> Path:
    return sock_dir / "supervisor.sock"


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
async def server(
    nursery: trio.Nursery, sock_path: Path, handler: RecordingHandler
) -> trio.CancelScope:
    """A running server; cancel the returned scope to stop it."""
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await serve_ipc(
                sock_path, handler, role=Role.SUPERVISOR, channel_id="sup", task_status=task_status
            )

    await nursery.start(run)
    return scope


async def _raw_connect(path: Path) -> Connection:
    return Connection(await trio.open_unix_socket(str(path)))


def _hello(**overrides: object) -> Hello:
    fields: dict[str, object] = {"role": Role.CLI, "pid": os.getpid()} | overrides
    return Hello.model_validate(fields)


# --- requests and replies -----------------------------------------------------------------


async def test_request_reply(server: trio.CancelScope, sock_path: Path) -> None:
    async with open_ipc_client(sock_path, role=Role.API) as client:
        assert client.peer.role is Role.SUPERVISOR
        assert client.peer.channel_id == "sup"
        assert client.peer.pid == os.getpid()
        with trio.fail_after(5):
            reply = await client.request(Ping(id=0))
            status = await client.request(GetStatus(id=0))
    assert reply == Ok(id=reply.id, detail="pong api")
    assert isinstance(status, StatusReply)
    assert status.components == {"t": {"ok": True}}
    assert status.id != reply.id


async def test_request_ids_are_fresh(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    async with open_ipc_client(sock_path, role=Role.CLI) as client:
        with trio.fail_after(5):
            for _ in range(3):
                await client.request(Ping(id=7))
    assert len(set(handler.seen_ids)) == 3


async def test_reply_id_is_corrected_by_server(server: trio.CancelScope, sock_path: Path) -> None:
    async with open_ipc_client(sock_path, role=Role.CLI) as client:
        with trio.fail_after(5):
            reply = await client.request(StartChannel(id=0, channel_id="c1"))
    assert isinstance(reply, Ok)
    assert reply.detail == "started"


async def test_concurrent_requests_are_matched_by_id(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    n = 20
    handler.restarts_expected = n
    results: dict[str, Reply] = {}
    async with open_ipc_client(sock_path, role=Role.API) as client:

        async def restart(channel_id: str) -> None:
            results[channel_id] = await client.request(RestartChannel(id=0, channel_id=channel_id))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(restart, f"ch{i}")
    assert len(results) == n
    for channel_id, reply in results.items():
        assert isinstance(reply, Ok)
        assert reply.detail == channel_id


# --- remote errors ------------------------------------------------------------------------


async def test_handler_exception_becomes_remote_error(
    server: trio.CancelScope, sock_path: Path
) -> None:
    async with open_ipc_client(sock_path, role=Role.API) as client:
        with trio.fail_after(5), pytest.raises(RemoteError) as info:
            await client.request(StartChannel(id=0, channel_id="boom"))
        assert info.value.error_type == "ValueError"
        assert info.value.message == "bad config"
        assert info.value.code == 500
        # The connection survives a failed request.
        with trio.fail_after(5):
            assert isinstance(await client.request(Ping(id=0)), Ok)


async def test_remote_error_passes_through_with_code(
    server: trio.CancelScope, sock_path: Path
) -> None:
    async with open_ipc_client(sock_path, role=Role.API) as client:
        with trio.fail_after(5), pytest.raises(RemoteError) as info:
            await client.request(StartChannel(id=0, channel_id="unknown"))
    assert (info.value.error_type, info.value.message, info.value.code) == (
        "UnknownChannel",
        "no such channel",
        404,
    )


async def test_error_raised_in_client_block_is_not_wrapped_in_a_group(
    server: trio.CancelScope, sock_path: Path
) -> None:
    with trio.fail_after(5), pytest.raises(RemoteError):
        async with open_ipc_client(sock_path, role=Role.API) as client:
            await client.request(StartChannel(id=0, channel_id="unknown"))


# --- handshake ----------------------------------------------------------------------------


async def test_version_mismatch_closes(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    conn = await _raw_connect(sock_path)
    with trio.fail_after(5):
        await conn.send(_hello(protocol=PROTOCOL_VERSION + 1))
        theirs = await conn.receive()
        assert isinstance(theirs, Hello)
        assert theirs.protocol == PROTOCOL_VERSION
        with pytest.raises(ConnectionClosedError):
            await conn.receive()
    await conn.aclose()
    assert handler.connected_peers == []
    assert handler.disconnected_peers == []


async def test_first_frame_must_be_hello(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    conn = await _raw_connect(sock_path)
    with trio.fail_after(5):
        await conn.send(Ping(id=1))
        with pytest.raises(ConnectionClosedError):
            await conn.receive()
    await conn.aclose()
    assert handler.connected_peers == []


async def test_client_rejects_server_of_another_version(sock_path: Path) -> None:
    """A hand-rolled server that answers with a future protocol version."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(sock_path))
    sock.listen(1)
    listener = trio.SocketListener(sock)

    async def fake_server() -> None:
        conn = Connection(await listener.accept())
        await conn.receive()
        await conn.send(_hello(role=Role.SUPERVISOR, protocol=PROTOCOL_VERSION + 1))
        await conn.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_server)
            with pytest.raises(ProtocolError, match="protocol"):
                async with open_ipc_client(sock_path, role=Role.CLI):
                    pytest.fail("handshake should have failed")
    await listener.aclose()


async def test_nothing_listening(sock_dir: Path) -> None:
    with pytest.raises(ConnectionClosedError, match="nothing listens"):
        async with open_ipc_client(sock_dir / "absent.sock", role=Role.CLI):
            pytest.fail("connected to nothing")


async def test_stale_socket_file_with_nothing_listening(sock_path: Path) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(sock_path))
    sock.close()
    assert await trio.Path(sock_path).exists()
    with pytest.raises(ConnectionClosedError, match="nothing listens"):
        async with open_ipc_client(sock_path, role=Role.CLI):
            pytest.fail("connected to a dead socket")


# --- connection lifecycle -----------------------------------------------------------------


async def test_connected_and_disconnected_called_once_each(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    async with open_ipc_client(sock_path, role=Role.CHANNEL, channel_id="c9") as client:
        with trio.fail_after(5):
            await client.request(Ping(id=0))
        assert [p.channel_id for p in handler.connected_peers] == ["c9"]
        assert handler.disconnected_peers == []
    with trio.fail_after(5):
        await handler.disconnected_event.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert [p.channel_id for p in handler.connected_peers] == ["c9"]
    assert [p.channel_id for p in handler.disconnected_peers] == ["c9"]
    assert handler.disconnected_peers[0].role is Role.CHANNEL


async def test_peer_leaving_mid_request_cancels_the_handler_and_disconnects_once(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    conn = await _raw_connect(sock_path)
    with trio.fail_after(5):
        await conn.send(_hello())
        await conn.receive()
        await conn.send(Drain(id=1))
        await handler.drain_started.wait()
        await conn.aclose()
        await handler.drain_cancelled.wait()
        await handler.disconnected_event.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert len(handler.connected_peers) == 1
    assert len(handler.disconnected_peers) == 1


async def test_non_request_after_handshake_closes_connection(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    conn = await _raw_connect(sock_path)
    with trio.fail_after(5):
        await conn.send(_hello())
        await conn.receive()
        await conn.send(Ok(id=1))
        with pytest.raises(ConnectionClosedError):
            await conn.receive()
        await handler.disconnected_event.wait()
    await conn.aclose()
    assert len(handler.disconnected_peers) == 1


async def test_garbage_does_not_crash_the_server(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    stream = await trio.open_unix_socket(str(sock_path))
    await stream.send_all(b"\x00\x00\x00\x05hello")  # a frame that is not JSON
    with trio.fail_after(5):
        assert await stream.receive_some() == b""
    await stream.aclose()

    stream = await trio.open_unix_socket(str(sock_path))
    await stream.send_all(b"\xff\xff\xff\xff")  # a length over MAX_FRAME
    with trio.fail_after(5):
        assert await stream.receive_some() == b""
    await stream.aclose()

    async with open_ipc_client(sock_path, role=Role.CLI) as client:
        with trio.fail_after(5):
            assert isinstance(await client.request(Ping(id=0)), Ok)


async def test_server_stopping_mid_request_fails_waiting_and_later_requests(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    async with open_ipc_client(sock_path, role=Role.API) as client:

        async def stop_server() -> None:
            await handler.drain_started.wait()
            server.cancel()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_server)
                with pytest.raises(ConnectionClosedError):
                    await client.request(Drain(id=0))
            with pytest.raises(ConnectionClosedError):
                await client.request(Ping(id=0))


async def test_cancelled_request_leaves_the_connection_usable(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    async with open_ipc_client(sock_path, role=Role.API) as client:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def drain() -> None:
                    await client.request(Drain(id=0))
                    pytest.fail("request should have been cancelled")

                nursery.start_soon(drain)
                await handler.drain_started.wait()
                nursery.cancel_scope.cancel()
            # The late reply to the cancelled request is dropped; the next one matches.
            handler.drain_release.set()
            reply = await client.request(Ping(id=0))
    assert isinstance(reply, Ok)
    assert reply.detail == "pong api"


async def test_leaving_the_client_fails_requests_still_waiting(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    failures: list[BaseException] = []
    with trio.fail_after(5):
        async with (
            trio.open_nursery() as nursery,
            open_ipc_client(sock_path, role=Role.API) as client,
        ):

            async def drain() -> None:
                try:
                    await client.request(Drain(id=0))
                except ConnectionClosedError as exc:
                    failures.append(exc)

            nursery.start_soon(drain)
            await handler.drain_started.wait()
    assert len(failures) == 1


# --- the socket file ----------------------------------------------------------------------


async def test_socket_file_is_private_replaces_stale_and_is_removed(
    nursery: trio.Nursery, sock_path: Path, handler: RecordingHandler
) -> None:
    stale = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await stale.bind(str(sock_path))
    stale.close()

    scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        try:
            with scope:
                await serve_ipc(sock_path, handler, role=Role.SUPERVISOR, task_status=task_status)
        finally:
            stopped.set()

    await nursery.start(run)
    path = trio.Path(sock_path)
    assert stat.S_IMODE((await path.stat()).st_mode) == 0o600
    async with open_ipc_client(sock_path, role=Role.CLI) as client:
        with trio.fail_after(5):
            assert isinstance(await client.request(Ping(id=0)), Ok)
    scope.cancel()
    with trio.fail_after(5):
        await stopped.wait()
    assert not await path.exists()


async def test_refuses_to_replace_a_live_server(
    server: trio.CancelScope, sock_path: Path, handler: RecordingHandler
) -> None:
    with pytest.raises(OSError, match="another server"):
        await serve_ipc(sock_path, handler, role=Role.SUPERVISOR)


async def test_refuses_to_replace_a_regular_file(
    sock_path: Path, handler: RecordingHandler
) -> None:
    path = trio.Path(sock_path)
    await path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await serve_ipc(sock_path, handler, role=Role.SUPERVISOR)
    assert await path.read_text() == "not a socket"


# --- Connection ---------------------------------------------------------------------------


async def test_concurrent_sends_never_interleave() -> None:
    # Lockstep streams block mid-send until the reader catches up, so unserialised
    # senders would collide (trio raises BusyResourceError) or interleave frames.
    left, right = trio.testing.lockstep_stream_pair()
    sender, receiver = Connection(left), Connection(right)
    sent = [StatusReply(id=i, channel_id="x" * 5000, components={}) for i in range(10)]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for msg in sent:
                nursery.start_soon(sender.send, msg)
            received = [await receiver.receive() for _ in sent]
    assert sorted(received, key=lambda r: r.id if isinstance(r, StatusReply) else -1) == sent


async def test_send_cancelled_mid_frame_closes_the_connection() -> None:
    left, right = trio.testing.lockstep_stream_pair()
    sender, receiver = Connection(left), Connection(right)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send, Ping(id=1))
        await trio.testing.wait_all_tasks_blocked()  # blocked: nobody reads a lockstep stream
        nursery.cancel_scope.cancel()
    with pytest.raises(ConnectionClosedError):
        await sender.send(Ping(id=2))
    # Whatever part of the frame got through, the receiver then sees the connection end.
    got = []
    with trio.fail_after(5):
        while True:
            try:
                got.append(await receiver.receive())
            except (ConnectionClosedError, ProtocolError):
                break
    assert got in ([], [Ping(id=1)])


async def test_send_cancelled_before_writing_keeps_the_connection() -> None:
    left, right = trio.testing.memory_stream_pair()
    sender, receiver = Connection(left), Connection(right)
    with trio.CancelScope() as scope:
        scope.cancel()
        await sender.send(Ping(id=1))
    await sender.send(Ping(id=2))
    with trio.fail_after(5):
        assert await receiver.receive() == Ping(id=2)


# --- a server process killed with SIGKILL -------------------------------------------------

_SERVER_SCRIPT = textwrap.dedent(
    """
    import sys
    from functools import partial
    from pathlib import Path

    import trio

    from ipc.messages import Role
    from ipc.server import serve_ipc

    class Stuck:
        async def handle(self, request, peer):
            print("got", request.type, flush=True)
            await trio.sleep_forever()

        async def connected(self, peer):
            pass

        async def disconnected(self, peer):
            pass

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_ipc, Path(sys.argv[1]), Stuck(), role=Role.CHANNEL))
            print("ready", flush=True)

    trio.run(main)
    """
)


@pytest.mark.slow
async def test_server_killed_mid_request(sock_path: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _SERVER_SCRIPT, str(sock_path)],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    try:
        lines = _LineReader(proc.stdout)
        with trio.fail_after(20):
            assert await lines.next_line() == "ready"
            async with open_ipc_client(sock_path, role=Role.SUPERVISOR) as client:
                async with trio.open_nursery() as nursery:

                    async def kill_when_stuck() -> None:
                        assert await lines.next_line() == "got stop_channel"
                        proc.kill()

                    nursery.start_soon(kill_when_stuck)
                    with pytest.raises(ConnectionClosedError):
                        await client.request(StopChannel(id=0, channel_id="c1"))
                with pytest.raises(ConnectionClosedError):
                    await client.request(Ping(id=0))
    finally:
        proc.kill()
        with trio.move_on_after(5, shield=True):
            await proc.wait()
        await proc.stdout.aclose()


class _LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = b""

    async def next_line(self) -> str:
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise EOFError(self._buf)
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()
