"""The status actor through a Redis outage: it reports the `store` component down, keeps
the statuses it could not write, and writes them (and `store` recovered) once Redis is back.

A real redis-server of the test's own, killed with SIGKILL and started again.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from channel_proc.events import StatusMail, StatusReporter
from channel_proc.status import MAILBOX_SIZE, run_status_actor
from channel_proc.transports.base import StatusLevel
from ipc.settings import RedisSettings
from ipc.state_redis import RedisStateStore
from tests.e2e.gateway import WAIT, wait_for

if TYPE_CHECKING:
    from ipc.names import Namespace
    from tests.faults.harness import PrivateRedis

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHANNEL = "c1"


async def test_status_actor_reports_the_store_down_and_recovered(
    redis_server: PrivateRedis, namespace: Namespace
) -> None:
    settings = RedisSettings(host="127.0.0.1", port=redis_server.port)
    store = await RedisStateStore.connect(settings, namespace)
    send, recv = trio.open_memory_channel[StatusMail](MAILBOX_SIZE)
    reporter = StatusReporter(send)
    try:
        async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    run_status_actor,
                    recv,
                    channel_id=CHANNEL,
                    store=store,
                    http=http,
                    status_url=None,
                    store_check_interval=0.1,
                )
            )
            reporter.report("telnet", StatusLevel.OK, "listening", "Listening")

            async def stored(component: str, type_: str) -> bool:
                found = (await store.get_statuses(CHANNEL)).get(component)
                return found is not None and found["type"] == type_

            with trio.fail_after(WAIT):
                await wait_for(partial(stored, "telnet", "listening"))

            await redis_server.kill()

            async def reported_down() -> bool:
                found = (await reporter.components()).get("store")
                return found is not None and found["status"] == "down"

            with trio.fail_after(WAIT):
                await wait_for(reported_down)
            down = (await reporter.components())["store"]
            assert down["type"] == "unavailable"
            assert "Connection refused" in down["details"]["error"]
            # Reported while the store is gone: kept, and written once it is back.
            reporter.report("telnet", StatusLevel.DOWN, "bind_failed", "Cannot listen")

            await redis_server.start()
            with trio.fail_after(WAIT):
                await wait_for(partial(stored, "store", "recovered"))
                await wait_for(partial(stored, "telnet", "bind_failed"))
            recovered = (await store.get_statuses(CHANNEL))["store"]
            assert recovered["status"] == "ok"
            assert recovered["details"]["outage_seconds"] > 0
            assert (await reporter.components())["store"]["type"] == "recovered"
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
