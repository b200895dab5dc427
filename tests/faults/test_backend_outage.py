"""Fault 3: RabbitMQ and Redis go away mid-run and come back.

The gateway runs on a Redis of the test's own and reaches RabbitMQ through a relay the test
controls (the shared services stay untouched). While one is gone the API answers 503 naming
it, promptly (never 500, never a hang), the channel reports the component down, and once
it is back everything resumes by itself: every message the API accepted is sent, each with
its event.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio

from ipc.client import open_ipc_client
from ipc.messages import GetStatus, Role, StatusReply
from ipc.names import Namespace, channel_socket
from ipc.state import open_state
from tests.e2e.gateway import WAIT, channel_pids, running_gateway, wait_for
from tests.fakes.fake_smsc import SubmitAnswer
from tests.fakes.webhook import open_fake_webhook
from tests.faults.harness import (
    REQUEST_TIMEOUT,
    create_smpp_channel,
    open_sender,
    open_timed_smsc,
    wait_all_events,
    wait_all_submitted,
    wait_smpp_bound,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook
    from tests.faults.harness import PrivateRedis, RelayProxy, Sender

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE: Final = 10.0
#: How long an API answer may take while a backend is refusing connections.
PROMPT: Final = 2.0


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="jbf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def probe(gateway: Gateway, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request, timed: (status, JSON body); fails the test past PROMPT seconds."""
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        began = trio.current_time()
        response = await client.request(method, f"{gateway.base_url}{path}", json=body)
        took = trio.current_time() - began
    assert took < PROMPT, f"{method} {path} took {took:.1f} s"
    return response.status_code, response.json()


async def components(gateway: Gateway, channel_id: str) -> dict[str, Any]:
    status, body = await probe(gateway, "GET", f"/channels/{channel_id}")
    assert status == 200, body
    found: dict[str, Any] = body["result"]["status"]["components"]
    return found


async def wait_component(gateway: Gateway, channel_id: str, name: str, level: str) -> None:
    async def reached() -> bool:
        found = (await components(gateway, channel_id)).get(name, {})
        return bool(found.get("status") == level)

    with trio.fail_after(WAIT):
        await wait_for(reached)


async def wait_stored_component(
    settings: Settings, channel_id: str, name: str, level: str
) -> dict[str, Any]:
    """Until the channel's `name` status in the store is at `level`; that status."""
    async with open_state(settings, Namespace(settings.namespace)) as store:

        async def reached() -> bool:
            found = (await store.get_statuses(channel_id)).get(name, {})
            return bool(found.get("status") == level)

        with trio.fail_after(WAIT):
            await wait_for(reached)
        return (await store.get_statuses(channel_id))[name]


async def channel_components(run_dir: Path, channel_id: str) -> dict[str, Any]:
    """What the channel process itself reports, over its control socket."""
    async with open_ipc_client(channel_socket(run_dir, channel_id), role=Role.CLI) as client:
        with trio.fail_after(10):
            reply = await client.request(GetStatus(id=0))
    assert isinstance(reply, StatusReply)
    return reply.components


async def send_through(
    gateway: Gateway, sender: Sender, outage: trio.Event, *, task_status: trio.TaskStatus[None]
) -> None:
    """Send at RATE until `outage` is set, then keep going until three sends in a row were
    accepted again (the outage is over for the API)."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.steady, RATE, stop)
        task_status.started()
        await outage.wait()

        async def recovered() -> bool:
            if not sender.failures:
                return False
            last_failure = sender.failures[-1].at
            return sum(at > last_failure for at in sender.accepted_at.values()) >= 3

        with trio.fail_after(60):
            await wait_for(recovered)
        stop.set()


@asynccontextmanager
async def steady_sending(
    gateway: Gateway, channel_id: str, hook: FakeWebhook, outage: trio.Event
) -> AsyncIterator[Sender]:
    """A sender on the channel at RATE (send_through, until the outage set and over), once
    its first 10 sends were accepted."""
    async with open_sender(gateway, channel_id, hook, "m") as sender, trio.open_nursery() as n:
        await n.start(send_through, gateway, sender, outage)
        with trio.fail_after(WAIT):
            await wait_for(partial(_accepted, sender, 10))
        yield sender


async def wait_refused(sender: Sender) -> None:
    """Until the steady sender has been refused at least once. An outage is held that long:
    a short one can fall between two of its sends, and send_through waits to see one."""

    async def refused() -> bool:
        return bool(sender.failures)

    with trio.fail_after(WAIT):
        await wait_for(refused)


def assert_only_503(sender: Sender, reason: str) -> None:
    assert sender.failures, "no send was refused during the outage"
    for failure in sender.failures:
        assert failure.status == 503, failure
        assert reason in failure.detail, failure


async def test_rabbitmq_restarted_mid_run(
    outage_settings: Settings, amqp_relay: RelayProxy, run_dir: Path
) -> None:
    """Away for longer than the channels' broker_ride_through (1 s here): the channel exits,
    reports the broker down, and is restarted until RabbitMQ is back."""
    args = ["--run-dir", str(run_dir), "--broker-ride-through", "1"]
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc,
        running_gateway(outage_settings, extra_args=args) as gateway,
    ):
        cid = await create_smpp_channel(gateway, smsc, hook)
        await wait_smpp_bound(gateway, cid)
        outage = trio.Event()
        async with steady_sending(gateway, cid, hook, outage) as sender:
            await amqp_relay.down()
            try:
                outage.set()
                status, body = await probe(gateway, "POST", f"/channels/{cid}/messages/", _msg())
                assert (status, body["description"]) == (503, "queue broker unavailable")
                assert body["result"]["errors"][0]["type"] == "BrokerUnavailableError"
                status, body = await probe(gateway, "GET", "/health")
                assert (status, body["description"]) == (503, "queue broker unavailable")
                # The channel lost its broker: it says so in the store (which still works).
                # Read from the store: GET /channels/{id} also counts the queues, so it
                # fails with 503 while the broker is gone.
                down = await wait_stored_component(outage_settings, cid, "broker", "down")
                assert down["type"] == "unavailable"
                assert down["details"] == {"backend": "rabbitmq"}
                await wait_refused(sender)
            finally:
                amqp_relay.up()
            await wait_component(gateway, cid, "broker", "ok")
            await wait_smpp_bound(gateway, cid)
        with trio.fail_after(60):
            await wait_all_submitted(smsc, sender)
            await wait_all_events(hook, sender)
        assert_only_503(sender, "queue broker unavailable")
        status, _ = await probe(gateway, "GET", "/health")
        assert status == 200
        process = (await components(gateway, cid))["process"]
        assert (process["status"], process["type"]) == ("ok", "running")


async def test_redis_restarted_mid_run(
    outage_settings: Settings, redis_server: PrivateRedis, run_dir: Path
) -> None:
    args = ["--run-dir", str(run_dir)]
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc,
        open_timed_smsc() as quiet_smsc,
        running_gateway(outage_settings, extra_args=args) as gateway,
    ):
        # Slow answers keep events coming while the store is gone: storing them fails.
        smsc.script_submits(*[SubmitAnswer(delay=0.3)] * 10_000)
        cid = await create_smpp_channel(gateway, smsc, hook)
        # A channel with no traffic: nothing it does needs the store, so it keeps running
        # and reports the store down itself.
        quiet = await create_smpp_channel(gateway, quiet_smsc, hook)
        await wait_smpp_bound(gateway, cid)
        await wait_smpp_bound(gateway, quiet)
        (busy_pid,) = channel_pids(cid)
        outage = trio.Event()
        async with steady_sending(gateway, cid, hook, outage) as sender:
            await redis_server.kill()
            try:
                outage.set()
                for method, path, body in (
                    ("POST", f"/channels/{cid}/messages/", _msg()),
                    ("GET", f"/channels/{cid}", None),
                    ("GET", "/channels/", None),
                    ("GET", "/health", None),
                ):
                    status, answer = await probe(gateway, method, path, body)
                    assert (status, answer["description"]) == (503, "state store unavailable")
                    assert answer["result"]["errors"][0]["type"] == "StoreUnavailableError"

                async def store_reported_down() -> bool:
                    found = await channel_components(run_dir, quiet)
                    return bool(found.get("store", {}).get("status") == "down")

                async def busy_channel_stopped() -> bool:
                    return channel_pids(cid) != [busy_pid]

                with trio.fail_after(WAIT):
                    await wait_for(store_reported_down)
                    # It could not store an event: it exits 69, to be retried.
                    await wait_for(busy_channel_stopped)
                await wait_refused(sender)
            finally:
                await redis_server.start()
            await wait_component(gateway, quiet, "store", "ok")
            recovered = (await components(gateway, quiet))["store"]
            assert recovered["type"] == "recovered"
            await wait_smpp_bound(gateway, cid)
        with trio.fail_after(60):
            await wait_all_submitted(smsc, sender)
            await wait_all_events(hook, sender)
        assert_only_503(sender, "state store unavailable")
        status, _ = await probe(gateway, "GET", "/health")
        assert status == 200


@pytest.mark.parametrize("backend", ["redis", "rabbitmq"])
async def test_a_short_outage_is_waited_out_by_a_busy_channel(
    outage_settings: Settings, redis_server: PrivateRedis, amqp_relay: RelayProxy, backend: str
) -> None:
    """Redis or RabbitMQ back within the channels' store / broker ride-through: a channel
    with sends and events under way keeps its process and its SMPP bind (no restart, no
    re-bind; its consumers are opened again in place after a RabbitMQ outage), and every
    accepted message is sent with its event; the API refuses sends (503) meanwhile."""
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc,
        running_gateway(outage_settings) as gateway,
    ):
        # Slow answers keep sends in the window and events coming while the backend is gone.
        smsc.script_submits(*[SubmitAnswer(delay=0.3)] * 10_000)
        cid = await create_smpp_channel(gateway, smsc, hook)
        await wait_smpp_bound(gateway, cid)
        (pid,) = channel_pids(cid)
        outage = trio.Event()
        async with steady_sending(gateway, cid, hook, outage) as sender:
            if backend == "redis":
                await redis_server.kill()
            else:
                await amqp_relay.down()
            try:
                outage.set()
                await wait_refused(sender)
                if backend == "rabbitmq":
                    # Riding it out, the channel says so (the store still works).
                    await wait_stored_component(outage_settings, cid, "broker", "down")
                # Long enough for the channel to meet the outage and retry.
                await trio.sleep(1.0)
            finally:
                if backend == "redis":
                    await redis_server.start()
                else:
                    amqp_relay.up()
        with trio.fail_after(60):
            await wait_all_submitted(smsc, sender)
            await wait_all_events(hook, sender)
        reason = "state store unavailable" if backend == "redis" else "queue broker unavailable"
        assert_only_503(sender, reason)
        if backend == "rabbitmq":
            await wait_component(gateway, cid, "broker", "ok")
        assert channel_pids(cid) == [pid]
        assert len([c for c in smsc.connections if c.bind is not None]) == 1
        process = (await components(gateway, cid))["process"]
        assert (process["status"], process["type"]) == ("ok", "running")


def _msg() -> dict[str, str]:
    return {"to": "27820000001", "from": "12345", "content": "probe"}


async def _accepted(sender: Sender, count: int) -> bool:
    return len(sender.accepted) >= count
