"""The channel process's IPC handler: Ping, GetStatus with queue lengths, Drain."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from channel_proc.control import ChannelControl
from channel_proc.lifecycle import Shutdown
from channel_proc.status import run_status_actor
from channel_proc.transports.base import StatusLevel
from ipc.broker import MAX_PRIORITY
from ipc.messages import (
    Drain,
    ErrorReply,
    GetStatus,
    Hello,
    ListChildren,
    Ok,
    Ping,
    Role,
    StatusReply,
)
from tests.channel_proc.support import StatusInbox

if TYPE_CHECKING:
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.state import StateStore

PEER = Hello(role=Role.SUPERVISOR, pid=1)


async def test_control_answers_ping_status_and_drain(
    store: StateStore, broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    inbox = StatusInbox()
    shutdown = Shutdown(grace=1.0)
    control = ChannelControl(
        channel_id=channel_id,
        broker=broker,
        namespace=namespace,
        statuses=inbox.reporter,
        shutdown=shutdown,
    )
    outbound = namespace.outbound_queue(channel_id)
    await broker.declare_queue(outbound, max_priority=MAX_PRIORITY)
    for queue in namespace.channel_queues(channel_id):
        await broker.declare_queue(queue, max_priority=MAX_PRIORITY if queue == outbound else 0)
    await broker.publish(outbound, b"{}", priority=1)
    await broker.publish(outbound, b"{}", priority=1)
    await broker.publish(namespace.event_queue(channel_id), b"{}")
    async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                run_status_actor,
                inbox.recv,
                channel_id=channel_id,
                store=store,
                http=http,
                status_url=None,
            )
        )
        inbox.reporter.report("telnet", StatusLevel.OK, "listening", "Listening")
        assert await control.handle(Ping(id=1), PEER) == Ok(id=1, detail="pong")
        reply = await control.handle(GetStatus(id=2), PEER)
        assert isinstance(reply, StatusReply)
        assert reply.id == 2
        assert reply.channel_id == channel_id
        assert reply.components["telnet"]["type"] == "listening"
        assert (reply.queued_outbound, reply.queued_inbound, reply.queued_events) == (2, 0, 1)
        assert shutdown.reason == ""
        assert await control.handle(Drain(id=3), PEER) == Ok(id=3, detail="draining")
        assert shutdown.reason.startswith("drain requested by supervisor")
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
async def test_control_refuses_supervisor_requests(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    control = ChannelControl(
        channel_id=channel_id,
        broker=broker,
        namespace=namespace,
        statuses=StatusInbox().reporter,
        shutdown=Shutdown(grace=1.0),
    )
    reply = await control.handle(ListChildren(id=7), PEER)
    assert isinstance(reply, ErrorReply)
    assert (reply.id, reply.code, reply.error_type) == (7, 400, "UnsupportedRequest")
