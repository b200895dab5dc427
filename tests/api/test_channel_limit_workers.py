"""max_channels across API workers, on both backends: the real gateway with `--api-workers 2`
and a small --max-channels, many concurrent creates on both workers racing for the last place,
while the store holds writes back so that each counts before any saves. Only a lock in the
store (the create lease) keeps two workers from both taking that place."""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from tests.api.test_limits import limit_reached, read_response
from tests.e2e.gateway import free_port, remember_channel, running_gateway
from tests.faults.harness import private_redis

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LIMIT = 2
#: Creates racing on each worker per round.
PER_WORKER = 6
ROUNDS = 2
#: Seconds the store holds writes back: time for every create to count (or to wait for the
#: lease), well under the store's own timeouts (5 s).
HOLD = 1.5


def _connections(port: int) -> dict[int, int]:
    """Socket inode of the gateway's end of each TCP connection to `port`, by client port."""
    found: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == port and fields[9] != "0":
                found[remote_port] = int(fields[9])
    return found


def _socket_owners() -> dict[int, int]:
    """pid of the process holding each socket inode (the kernel's map of fds, from /proc)."""
    owners: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue  # gone, or a fd closed while listing
        for target in targets:
            if target.startswith("socket:["):
                owners[int(target[8:-1])] = int(entry.name)
    return owners


async def _owner(gateway: Gateway, stream: trio.SocketStream) -> int:
    """The pid of the API worker that accepted `stream`."""
    client_port = stream.socket.getsockname()[1]
    with trio.fail_after(10):
        while True:
            inode = _connections(gateway.port).get(client_port)
            pid = _socket_owners().get(inode) if inode is not None else None
            # Not accepted yet: the connection waits in the listening socket's queue.
            if pid is not None:
                return pid
            await trio.sleep(0.01)


def create_request() -> bytes:
    body = json.dumps({"type": "telnet", "config": {"twisted_endpoint": f"tcp:{free_port()}"}})
    head = (
        "POST /channels/ HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return (head + body).encode()


@dataclass(frozen=True, slots=True)
class HeldCreate:
    """A create sent but for its body's last byte: its handler waits in the worker for it."""

    stream: trio.SocketStream
    last: bytes


async def held_creates(gateway: Gateway) -> list[HeldCreate]:
    """PER_WORKER held creates on each of the two workers.

    The kernel hands a burst of connections to whichever worker accepts first (often all to
    one), so they are opened one at a time and each is kept only while its worker needs more.
    Each is sent at once, before Hypercorn closes it as idle (keep_alive_timeout, 5 s).
    """
    by_worker: dict[int, list[HeldCreate]] = {}
    with trio.fail_after(60):
        while len(by_worker) < 2 or any(len(h) < PER_WORKER for h in by_worker.values()):
            stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
            held = by_worker.setdefault(await _owner(gateway, stream), [])
            if len(held) < PER_WORKER:
                request = create_request()
                await stream.send_all(request[:-1])
                held.append(HeldCreate(stream, request[-1:]))
            else:
                await stream.aclose()
            await trio.sleep(0.02)
    assert len(by_worker) == 2, by_worker
    return [create for creates in by_worker.values() for create in creates]


@asynccontextmanager
async def writes_held(settings: Settings) -> AsyncIterator[None]:
    """Hold back every write to the store for the block, while reads go on, as a slow store
    would: each create counts the channels and then waits to save, the interleaving in which
    a lock per worker lets a create in each worker through."""
    if settings.redis is None:
        # The embedded store's file (ipc.state.open_state): the workers' writes wait for a
        # write transaction of ours (busy timeout), WAL lets their reads through.
        path = settings.data_dir / "state.sqlite3"
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            await trio.to_thread.run_sync(conn.execute, "BEGIN IMMEDIATE")
            try:
                yield
            finally:
                conn.execute("ROLLBACK")
        finally:
            conn.close()
    else:
        # Every client's writes wait, reads are served; the pause also ends by itself.
        await redis_command(settings, f"CLIENT PAUSE {int(HOLD * 1000) + 2000} WRITE")
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                await redis_command(settings, "CLIENT UNPAUSE")


async def redis_command(settings: Settings, command: str) -> None:
    """One inline command, as redis-cli would send it (tests do not import the client)."""
    assert settings.redis is not None
    async with await trio.open_tcp_stream(settings.redis.host, settings.redis.port) as stream:
        await stream.send_all(f"{command}\r\n".encode())
        answer = await stream.receive_some(256)
    assert answer == b"+OK\r\n", answer


async def race(settings: Settings, creates: list[HeldCreate]) -> list[tuple[int, bytes]]:
    """Complete every held create at once, with the store's writes held back for HOLD
    seconds; (status, body) of each answer."""
    # Time for each worker to read the last heads and wait for their bodies.
    await trio.sleep(0.3)
    answers: list[tuple[int, bytes]] = []

    async def finish(create: HeldCreate) -> None:
        async with create.stream:
            await create.stream.send_all(create.last)
            answer = await read_response(create.stream)
            assert answer is not None
            answers.append(answer)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, writes_held(settings):
            for create in creates:
                nursery.start_soon(finish, create)
            await trio.sleep(HOLD)
    return answers


async def create_channel(gateway: Gateway) -> str:
    body = {"type": "telnet", "config": {"twisted_endpoint": f"tcp:{free_port()}"}}
    response = await gateway.request("POST", "/channels/", body)
    assert response.status_code == 201, response.text
    channel_id: str = response.json()["result"]["id"]
    return channel_id


@pytest.fixture
async def own_settings(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    """`settings`, with a Redis of the test's own where they use Redis: its writes are
    paused, which would hold back every other user of a shared one."""
    if settings.redis is None:
        yield settings
        return
    async with private_redis(tmp_path / "redis") as server:
        redis = settings.redis.model_copy(update={"port": server.port})
        yield settings.model_copy(update={"redis": redis})


async def test_max_channels_holds_across_api_workers(own_settings: Settings) -> None:
    settings = own_settings
    args = ["--api-workers", "2", "--max-channels", str(LIMIT)]
    async with running_gateway(settings, extra_args=args) as gateway:
        for _ in range(ROUNDS):
            channels = [await create_channel(gateway) for _ in range(LIMIT - 1)]
            answers = await race(settings, await held_creates(gateway))
            channels += [
                json.loads(body)["result"]["id"] for status, body in answers if status == 201
            ]
            for channel_id in channels:
                remember_channel(settings, channel_id)
            stored = (await gateway.request("GET", "/channels/")).json()["result"]
            assert sorted(stored) == sorted(channels)
            assert len(channels) == LIMIT, answers
            refused = [(status, json.loads(body)) for status, body in answers if status != 201]
            assert refused == [(409, limit_reached(LIMIT))] * (2 * PER_WORKER - 1), refused
            for channel_id in channels:
                deleted = await gateway.request("DELETE", f"/channels/{channel_id}")
                assert deleted.status_code == 200
