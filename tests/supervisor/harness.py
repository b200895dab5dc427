"""run_supervisor in this process, driven over its real control socket (for tests)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ipc.client import open_ipc_client
from ipc.messages import ChildrenReply, ChildState, ListChildren, Role
from ipc.names import Namespace, supervisor_socket
from ipc.state import open_state
from supervisor.run import Running, run_supervisor
from supervisor.spec import RestartPolicy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.client import IpcClient
    from ipc.settings import Settings
    from supervisor.spec import Commands

POLICY = RestartPolicy(intensity=2, period=30.0, delay_base=0.05, delay_cap=0.2, start_timeout=10)


@dataclass
class Gateway:
    running: Running
    client: IpcClient
    settings: Settings
    result: list[int] = field(default_factory=list)

    async def children(self) -> dict[str, tuple[ChildState, int | None]]:
        reply = await self.client.request(ListChildren(id=0))
        assert isinstance(reply, ChildrenReply)
        return {c.channel_id: (c.state, c.pid) for c in reply.children}

    async def restarts(self, cid: str) -> int:
        reply = await self.client.request(ListChildren(id=0))
        assert isinstance(reply, ChildrenReply)
        return next(c.restarts for c in reply.children if c.channel_id == cid)


async def seed(settings: Settings, *cids: str, properties: dict[str, Any] | None = None) -> None:
    """Store channels as the API would (default properties: a "fake" channel)."""
    async with open_state(settings, Namespace(settings.namespace)) as store:
        for cid in cids:
            await store.save_channel(cid, properties or {"type": "fake", "config": {}})


@asynccontextmanager
async def gateway(
    settings: Settings, commands: Commands, policy: RestartPolicy = POLICY
) -> AsyncIterator[Gateway]:
    """Boot the supervisor; yield once booted; stop it (as SIGTERM would) after the block."""
    stop = trio.Event()
    result: list[int] = []

    async def run(task_status: trio.TaskStatus[Running]) -> None:
        code = await run_supervisor(
            settings,
            commands=commands,
            policy=policy,
            stop=stop,
            handle_signals=False,
            task_status=task_status,
        )
        result.append(code)

    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            running: Running = await nursery.start(run)
        path = supervisor_socket(running.run_dir)
        async with open_ipc_client(path, role=Role.CLI) as client:
            yield Gateway(running, client, settings, result)
        stop.set()
