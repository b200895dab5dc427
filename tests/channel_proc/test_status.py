"""The status actor writes the latest status per component, posts to status_url, answers queries."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from channel_proc.events import StatusMail, StatusReporter
from channel_proc.status import run_status_actor
from channel_proc.transports.base import StatusLevel
from tests.channel_proc.support import WAIT, StatusInbox, wait_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.state import StateStore
    from tests.fakes.webhook import FakeWebhook

from contextlib import asynccontextmanager


@asynccontextmanager
async def running_status_actor(
    store: StateStore, channel_id: str, status_url: str | None
) -> AsyncIterator[StatusReporter]:
    inbox = StatusInbox()
    async with httpx.AsyncClient(timeout=2.0) as http, trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                run_status_actor,
                inbox.recv,
                channel_id=channel_id,
                store=store,
                http=http,
                status_url=status_url,
            )
        )
        yield inbox.reporter
        nursery.cancel_scope.cancel()


async def test_status_written_to_store_latest_wins(store: StateStore, channel_id: str) -> None:
    async with running_status_actor(store, channel_id, None) as reporter:
        reporter.report("telnet", StatusLevel.DOWN, "bind_failed", "Cannot listen", {"port": 1})
        reporter.report("telnet", StatusLevel.OK, "listening", "Listening on x", {"port": 2})
        reporter.report("mo_url", StatusLevel.DEGRADED, "delivery_failing", "failing")

        async def written() -> bool:
            statuses = await store.get_statuses(channel_id)
            return statuses.get("telnet", {}).get("type") == "listening" and "mo_url" in statuses

        with trio.fail_after(WAIT):
            await wait_for(written)
    statuses = await store.get_statuses(channel_id)
    assert statuses["telnet"] == {
        "component": "telnet",
        "channel_id": channel_id,
        "status": "ok",
        "type": "listening",
        "message": "Listening on x",
        "details": {"port": 2},
    }
    assert statuses["mo_url"]["status"] == "degraded"


async def test_status_query_returns_components(store: StateStore, channel_id: str) -> None:
    async with running_status_actor(store, channel_id, None) as reporter:
        assert await reporter.components() == {}
        reporter.report("telnet", StatusLevel.OK, "listening", "Listening")
        components = await reporter.components()
    assert list(components) == ["telnet"]
    assert components["telnet"]["type"] == "listening"


@pytest.mark.slow
async def test_status_posted_to_status_url_with_retries(
    store: StateStore, channel_id: str, webhook: FakeWebhook
) -> None:
    webhook.fail_next(1, status=500)
    async with running_status_actor(store, channel_id, webhook.url("/status")) as reporter:
        reporter.report("telnet", StatusLevel.OK, "listening", "Listening", {"port": 9001})
        reporter.report("telnet", StatusLevel.OK, "client_connected", "Client", {})
        with trio.fail_after(WAIT):
            delivered = await webhook.wait_for_requests(2, delivered_only=True)
    assert [r.json()["type"] for r in delivered] == ["listening", "client_connected"]
    assert delivered[0].json() == {
        "component": "telnet",
        "channel_id": channel_id,
        "status": "ok",
        "type": "listening",
        "message": "Listening",
        "details": {"port": 9001},
    }
    assert [r.status for r in webhook.requests] == [500, 200, 200]


async def test_status_reporter_never_blocks_when_actor_is_gone() -> None:
    send, recv = trio.open_memory_channel[StatusMail](1)
    reporter = StatusReporter(send)
    reporter.report("a", StatusLevel.OK, "x", "first")
    reporter.report("a", StatusLevel.OK, "x", "dropped: mailbox full")
    await recv.aclose()
    reporter.report("a", StatusLevel.OK, "x", "dropped: actor gone")
