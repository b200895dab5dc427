"""Helpers for channel_proc tests: polling, running actors in-process, reading queues."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import trio

from channel_proc.events import StatusMail, StatusReported, StatusReporter
from channel_proc.forwarder import Forwarder, Routes
from channel_proc.lifecycle import Shutdown
from channel_proc.status import MAILBOX_SIZE

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.settings import Settings
    from ipc.state import StateStore

WAIT = 10.0
POLL_INTERVAL = 0.02


async def wait_for(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll `condition` until it holds (the caller bounds it with trio.fail_after)."""
    # Polling: the state lives in another process or a store, with no event to wait on.
    while not await condition():  # noqa: ASYNC110
        await trio.sleep(POLL_INTERVAL)


async def wait_for_length(broker: Broker, queue: str, length: int) -> None:
    async def reached() -> bool:
        return await broker.queue_length(queue) == length

    with trio.fail_after(WAIT):
        await wait_for(reached)


async def drain_queue(broker: Broker, queue: str, count: int) -> list[bytes]:
    """Consume and ack `count` messages from `queue`."""
    bodies = []
    async with broker.consume(queue, prefetch=count) as consumer:
        with trio.fail_after(WAIT):
            for _ in range(count):
                delivery = await consumer.receive()
                bodies.append(delivery.body)
                await consumer.ack(delivery)
    return bodies


class StatusInbox:
    """The status actor's mailbox, read by the test instead."""

    def __init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel[StatusMail](MAILBOX_SIZE)
        self.reporter = StatusReporter(self.send)

    def reports(self) -> list[StatusReported]:
        found: list[StatusReported] = []
        while True:
            try:
                mail = self.recv.receive_nowait()
            except trio.WouldBlock:
                return found
            if isinstance(mail, StatusReported):
                found.append(mail)


@asynccontextmanager
async def running_forwarder(
    *,
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    channel_id: str,
    routes: Routes,
    statuses: StatusInbox | None = None,
    **overrides: Any,
) -> AsyncIterator[Shutdown]:
    """Run a Forwarder with fast retries for the block, then stop it gracefully."""
    shutdown = Shutdown(grace=2.0)
    inbox = statuses or StatusInbox()
    async with httpx.AsyncClient(timeout=2.0) as http, trio.open_nursery() as nursery:
        forwarder = Forwarder(
            broker=broker,
            store=store,
            http=http,
            namespace=namespace,
            channel_id=channel_id,
            routes=routes,
            settings=settings.model_copy(update=overrides),
            reporter=inbox.reporter,
            shutdown=shutdown,
            retry_initial=0.01,
            retry_cap=0.05,
        )
        with trio.fail_after(WAIT):
            await nursery.start(forwarder.run)
        yield shutdown
        shutdown.request("test block ended")
