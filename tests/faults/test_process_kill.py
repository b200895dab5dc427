"""Fault 2: kill -9 of an API worker, and of the supervisor itself, under traffic.

An API worker killed while requests are in flight: those requests may fail, the other
worker keeps answering, the supervisor starts a new worker, and every message the API
accepted is sent exactly once. The supervisor killed: its children notice (stdin EOF) and
stop by themselves, and the next start restores every channel and router and sends
everything queued, including MO messages held while the mo_url was down.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import trio

from tests.e2e.gateway import WAIT, channel_pids, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook
from tests.faults.harness import (
    api_worker_pids,
    create_smpp_channel,
    kill,
    mo_contents,
    open_sender,
    open_timed_smsc,
    submit_counts,
    wait_all_events,
    wait_all_submitted,
    wait_smpp_bound,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE: Final = 20.0


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A run dir we clean up ourselves: a supervisor killed with -9 cannot."""
    path = Path(tempfile.mkdtemp(prefix="jbf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def wait_api_workers(gateway: Gateway, count: int, *, not_in: set[int]) -> list[int]:
    async def replaced() -> bool:
        pids = api_worker_pids(gateway)
        return len(pids) == count and not set(pids) & not_in

    with trio.fail_after(WAIT):
        await wait_for(replaced)
    return api_worker_pids(gateway)


async def test_kill_9_api_worker_the_other_keeps_serving(settings: Settings, run_dir: Path) -> None:
    args = ["--api-workers", "2", "--run-dir", str(run_dir)]
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc,
        running_gateway(settings, extra_args=args) as gateway,
    ):
        cid = await create_smpp_channel(gateway, smsc, hook)
        await wait_smpp_bound(gateway, cid)
        first, second = api_worker_pids(gateway)
        async with open_sender(gateway, cid, hook, "m") as sender:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.steady, RATE, stop)
                with trio.fail_after(WAIT):
                    await wait_for(_accepted_at_least(sender.accepted, 10))
                killed_at = trio.current_time()
                kill(first)
                # Served by `second` alone until the replacement is up.
                accepted_before = len(sender.accepted)
                await wait_api_workers(gateway, 2, not_in={first})
                replaced_at = trio.current_time()
                served_alone = len(sender.accepted) - accepted_before
                with trio.fail_after(WAIT):
                    await wait_for(_accepted_at_least(sender.accepted, len(sender.accepted) + 20))
                stop.set()
            with trio.fail_after(60):
                await wait_all_submitted(smsc, sender)
                await wait_all_events(hook, sender)
        assert second in api_worker_pids(gateway)
        print(
            f"worker replaced in {replaced_at - killed_at:.2f} s; {served_alone} accepted "
            f"meanwhile; {len(sender.failures)} failed: {sender.failures}"
        )
        assert served_alone > 0
        # Only requests the killed worker held can fail, and only without an answer.
        assert all(f.status == 0 and f.at >= killed_at for f in sender.failures)
        assert len(sender.failures) <= 5
        assert set(submit_counts(smsc, sender).values()) == {1}


async def add_router(gateway: Gateway, channel_id: str, hook: FakeWebhook) -> str:
    response = await gateway.request(
        "POST", "/routers/", {"type": "from_address", "config": {"channel": channel_id}}
    )
    assert response.status_code == 201, response.json()
    router_id: str = response.json()["result"]["id"]
    config = {"regular_expression": "^12345$", "default": True}
    destination = {"config": config, "mo_url": hook.url("/mo")}
    response = await gateway.request("POST", f"/routers/{router_id}/destinations/", destination)
    assert response.status_code == 201, response.json()
    return router_id


def _accepted_at_least(accepted: dict[str, str], count: int) -> Callable[[], Awaitable[bool]]:
    async def enough() -> bool:
        return len(accepted) >= count

    return enough


async def test_kill_9_supervisor_then_restart_restores_everything(
    settings: Settings, run_dir: Path
) -> None:
    args = ["--run-dir", str(run_dir)]
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc_a,
        open_timed_smsc() as smsc_b,
        running_gateway(settings, extra_args=args) as gateway,
    ):
        a = await create_smpp_channel(gateway, smsc_a, hook)
        b = await create_smpp_channel(gateway, smsc_b, hook, routed=True)
        # B's MO messages go through a router, to its one (default) destination.
        rid = await add_router(gateway, b, hook)
        await wait_smpp_bound(gateway, a)
        await wait_smpp_bound(gateway, b)
        # MO messages taken while the mo_url is down wait in the queues.
        hook.fail_path("/mo")
        mos = [f"mo {n}" for n in range(5)]
        for content in mos:
            assert (await smsc_b.send_deliver_sm(short_message=content.encode())).ok
        async with open_sender(gateway, a, hook, "a") as sender:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.steady, RATE, stop)
                with trio.fail_after(WAIT):
                    await wait_for(_accepted_at_least(sender.accepted, 20))
                assert gateway.process is not None
                gateway.process.kill()
                await gateway.process.wait()
                gateway.process = None

                async def all_gone() -> bool:
                    return not channel_pids(a) and not channel_pids(b)

                with trio.fail_after(WAIT):
                    await wait_for(all_gone)
                stop.set()
            accepted = dict(sender.accepted)
            hook.come_up()
            await gateway.start()
            listed = (await gateway.request("GET", "/channels/")).json()["result"]
            assert sorted(listed) == sorted([a, b])
            routers = (await gateway.request("GET", "/routers/")).json()["result"]
            assert routers == [rid]
            with trio.fail_after(60):
                await wait_all_submitted(smsc_a, sender)
                await wait_all_events(hook, sender)

                async def mos_delivered() -> bool:
                    return set(mos) <= mo_contents(hook)

                await wait_for(mos_delivered)
            await wait_smpp_bound(gateway, b)
        assert accepted == sender.accepted
        print(f"{len(accepted)} accepted, {len(sender.failures)} failed at the kill")
        # The children stopped gracefully on their own: nothing was sent twice.
        assert set(submit_counts(smsc_a, sender).values()) == {1}
