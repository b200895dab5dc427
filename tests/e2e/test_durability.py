"""Nothing accepted is lost: kill -9 of a channel process, and a full gateway restart."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import pytest
import trio

from ipc.broker import open_broker
from ipc.names import Namespace
from tests.e2e.gateway import (
    WAIT,
    channel_pids,
    child_pids,
    free_port,
    running_gateway,
    wait_for,
)
from tests.e2e.test_getting_started import connect_telnet, create_telnet_channel
from tests.supervisor.scripted import pid_alive

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook

from tests.fakes.webhook import open_fake_webhook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: The forwarder's prefetch: that many inbound messages may be held unacked by the process.
FORWARDER_PREFETCH = 16
#: Seconds the waiting count must stay put before all input counts as queued.
STABLE_FOR = 1.0


async def wait_until_queued(settings: Settings, channel_id: str, total: int) -> None:
    """Wait until `total` inbound messages are durably queued (waiting or held unacked).

    The broker counts only waiting messages. While the forwarder catches up it holds fewer
    than its prefetch, so the count can reach `total - FORWARDER_PREFETCH` with lines still
    unread by the transport; a kill then loses lines the gateway never accepted (CI saw it on
    a loaded machine). A count that has also stayed put for a second means the transport has
    queued everything and the forwarder has taken all it will.
    """
    queue = Namespace(settings.namespace).inbound_queue(channel_id)
    async with open_broker(settings) as broker:
        last = (-1, trio.current_time())  # (length, when first seen)

        async def queued() -> bool:
            nonlocal last
            length = await broker.queue_length(queue)
            if length != last[0]:
                last = (length, trio.current_time())
            steady = trio.current_time() - last[1] >= STABLE_FOR
            return length >= total - FORWARDER_PREFETCH and steady

        with trio.fail_after(WAIT):
            await wait_for(queued)


async def kill_channel_process(gateway: Gateway, channel_id: str) -> int:
    (pid,) = channel_pids(channel_id)
    os.kill(pid, signal.SIGKILL)

    async def restarted() -> bool:
        pids = channel_pids(channel_id)
        return bool(pids) and pids != [pid]

    with trio.fail_after(WAIT):
        await wait_for(restarted)
    return pid


def delivered_contents(hook: FakeWebhook) -> dict[str, str | None]:
    """message_id -> content of every inbound message the mo_url accepted (duplicates merged)."""
    return {r.json()["message_id"]: r.json()["content"] for r in hook.on_path("/mo")}


async def test_kill_9_channel_process_loses_no_inbound(settings: Settings) -> None:
    telnet_port = free_port()
    lines = [f"line {n}" for n in range(40)]
    async with open_fake_webhook() as hook, running_gateway(settings) as gateway:
        channel = await create_telnet_channel(gateway, hook, telnet_port)
        cid = channel["id"]
        hook.go_down()
        user = await connect_telnet(gateway, cid, telnet_port)
        for line in lines:
            await user.type(line)
        await wait_until_queued(settings, cid, total=len(lines) + 1)

        await kill_channel_process(gateway, cid)
        hook.come_up()

        async def all_delivered() -> bool:
            contents = set(delivered_contents(hook).values())
            return contents >= {None, *lines}

        with trio.fail_after(60):
            with trio.fail_after(WAIT):
                await wait_for(all_delivered)
        # Redelivery is at-least-once: the same message id may come twice, never a new copy.
        assert sorted(c for c in delivered_contents(hook).values() if c) == sorted(lines)
        await user.stream.aclose()


async def test_kill_9_channel_process_during_send_burst(settings: Settings) -> None:
    """Every accepted outbound message ends with an event, however the kill falls."""
    telnet_port = free_port()
    async with open_fake_webhook() as hook, running_gateway(settings) as gateway:
        channel = await create_telnet_channel(gateway, hook, telnet_port)
        cid = channel["id"]
        user = await connect_telnet(gateway, cid, telnet_port)
        accepted: list[str] = []

        async def send(n: int) -> None:
            response = await gateway.request(
                "POST",
                f"/channels/{cid}/messages/",
                {"to": user.address, "content": f"msg {n}", "event_url": hook.url("/event")},
            )
            assert response.status_code == 201, response.json()
            accepted.append(response.json()["result"]["message_id"])

        async with trio.open_nursery() as nursery:
            for n in range(60):
                if n == 20:
                    nursery.start_soon(kill_channel_process, gateway, cid)
                await send(n)

        async def every_message_has_an_event() -> bool:
            events = {r.json()["message_id"] for r in hook.on_path("/event")}
            return events >= set(accepted)

        with trio.fail_after(90):
            with trio.fail_after(WAIT):
                await wait_for(every_message_has_an_event)
        events = hook.on_path("/event")
        assert {e.json()["message_id"] for e in events} == set(accepted)
        assert {e.json()["event_type"] for e in events} <= {"submitted", "rejected"}
        await user.stream.aclose()


async def test_gateway_restart_restores_channels_and_queues(settings: Settings) -> None:
    telnet_port = free_port()
    async with open_fake_webhook() as hook, running_gateway(settings) as gateway:
        channel = await create_telnet_channel(gateway, hook, telnet_port)
        cid = channel["id"]
        hook.go_down()
        user = await connect_telnet(gateway, cid, telnet_port)
        lines = [f"before restart {n}" for n in range(FORWARDER_PREFETCH + 4)]
        for line in lines:
            await user.type(line)
        await wait_until_queued(settings, cid, total=len(lines) + 1)
        await user.stream.aclose()
        assert await gateway.stop() == 0
        assert channel_pids(cid) == []

        hook.come_up()
        await gateway.start()
        listed = (await gateway.request("GET", "/channels/")).json()["result"]
        assert listed == [cid]

        async def delivered() -> bool:
            return set(delivered_contents(hook).values()) >= set(lines)

        with trio.fail_after(60):
            with trio.fail_after(WAIT):
                await wait_for(delivered)
        user = await connect_telnet(gateway, cid, telnet_port)
        await user.stream.aclose()


async def test_supervisor_kill_9_leaves_no_orphans(embedded_settings: Settings) -> None:
    telnet_port = free_port()
    args = ["--api-workers", "2"]
    async with (
        open_fake_webhook() as hook,
        running_gateway(embedded_settings, extra_args=args) as gw,
    ):
        channel = await create_telnet_channel(gw, hook, telnet_port)
        cid = channel["id"]
        assert channel_pids(cid)
        assert gw.process is not None
        # Its API workers as well as the channel: a worker left serving the old listening
        # socket would answer the restarted gateway's health check in its place.
        supervisor = gw.process.pid

        def running_children() -> list[int]:
            return [pid for pid in child_pids(supervisor) if pid_alive(pid)]

        async def all_started() -> bool:  # the second worker starts once the first serves
            return len(running_children()) == 3  # two API workers and the channel

        with trio.fail_after(WAIT):
            await wait_for(all_started)
        children = running_children()
        assert set(channel_pids(cid)) < set(children)
        gw.process.kill()
        await gw.process.wait()
        gw.process = None

        async def gone() -> bool:
            return not any(pid_alive(pid) for pid in children)

        with trio.fail_after(WAIT):
            await wait_for(gone)
        await gw.start()
        user = await connect_telnet(gw, cid, telnet_port)
        await user.stream.aclose()
