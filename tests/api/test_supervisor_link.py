"""SupervisorLink against a real IPC server: requests, catalog caching, reconnection."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from api.supervisor_link import SupervisorLink, SupervisorUnreachableError
from ipc.errors import RemoteError
from ipc.messages import GetCatalog, Ping, Role
from ipc.server import serve_ipc
from tests.api.harness import CATALOG, FakeSupervisor

if TYPE_CHECKING:
    from pathlib import Path


async def _serve(
    fake: FakeSupervisor,
    path: Path,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_ipc(path, fake, role=Role.SUPERVISOR, task_status=task_status)


async def test_lifecycle_requests_and_catalog_cached_per_connection(socket_dir: Path) -> None:
    fake = FakeSupervisor()
    path = socket_dir / "sup.sock"
    link = SupervisorLink(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve, fake, path)
        await nursery.start(link.run)
        assert link.connected
        await link.start_channel("c1")
        await link.restart_channel("c1")
        await link.stop_channel("c1")
        assert await link.catalog() == CATALOG
        assert await link.catalog() == CATALOG
        nursery.cancel_scope.cancel()
    assert fake.lifecycle() == [
        ("start_channel", "c1"),
        ("restart_channel", "c1"),
        ("stop_channel", "c1"),
    ]
    assert sum(isinstance(request, GetCatalog) for request in fake.requests) == 1


async def test_remote_errors_keep_code_and_type(socket_dir: Path) -> None:
    fake = FakeSupervisor()
    fake.fail_next("start_channel", RemoteError("ChannelConfigError", "no host", code=400))
    path = socket_dir / "sup.sock"
    link = SupervisorLink(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve, fake, path)
        await nursery.start(link.run)
        with pytest.raises(RemoteError) as caught:
            await link.start_channel("c1")
        nursery.cancel_scope.cancel()
    assert (caught.value.code, caught.value.error_type, caught.value.message) == (
        400,
        "ChannelConfigError",
        "no host",
    )


async def test_standalone_link_fails_at_once() -> None:
    link = SupervisorLink(None)
    with pytest.raises(SupervisorUnreachableError):
        await link.start_channel("c1")


async def test_reconnects_when_the_supervisor_comes_back(socket_dir: Path) -> None:
    first, second = FakeSupervisor(), FakeSupervisor()
    path = socket_dir / "sup.sock"
    link = SupervisorLink(path, ping_interval=0.05, retry_delay=0.01)
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as first_server:
            await first_server.start(_serve, first, path)
            await nursery.start(link.run)
            assert await link.catalog() == CATALOG
            first_server.cancel_scope.cancel()
        await nursery.start(_serve, second, path)
        with trio.fail_after(5):
            await second.hello.wait()
            await link.start_channel("c2")
        nursery.cancel_scope.cancel()
    assert second.lifecycle() == [("start_channel", "c2")]
    assert [peer.role for peer in second.peers] == [Role.API]


async def test_pings_keep_the_connection_checked(socket_dir: Path) -> None:
    fake = FakeSupervisor()
    path = socket_dir / "sup.sock"
    link = SupervisorLink(path, ping_interval=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve, fake, path)
        await nursery.start(link.run)
        with trio.fail_after(5):
            await fake.pinged.wait()
        nursery.cancel_scope.cancel()
    assert any(isinstance(request, Ping) for request in fake.requests)
