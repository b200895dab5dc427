"""What the forwarder and webhook tests share: a Forwarder on the test's backend and channel,
POSTing through the channel process's WebhookClient with fast retries, and the dead-letter
checks."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from channel_proc.deadletter import dead_letter_queue
from channel_proc.forwarder import Forwarder
from channel_proc.lifecycle import Shutdown
from channel_proc.webhook import WebhookClient
from ipc.deadletters import list_dead_letters
from ipc.payloads import SessionEvent, VumiMessage
from tests.channel_proc.support import WAIT, StatusInbox, drain_queue, wait_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from channel_proc.counters import Counters
    from channel_proc.forwarder import Routes
    from ipc.broker import Broker
    from ipc.deadletters import DeadLetter
    from ipc.names import Namespace
    from ipc.settings import Settings
    from ipc.state import StateStore

#: Each phase of a POST (connect, send, each read); short, as the receiver is local.
TEST_WEBHOOK_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Forwarders:
    """Runs Forwarders with these fixtures: `forwarders(routes, ...)` is an async context
    manager that starts one, yields its Shutdown and stops it gracefully after the block."""

    settings: Settings
    namespace: Namespace
    store: StateStore
    broker: Broker
    channel_id: str

    @asynccontextmanager
    async def __call__(
        self,
        routes: Routes,
        *,
        statuses: StatusInbox | None = None,
        counters: Counters | None = None,
        **overrides: Any,
    ) -> AsyncIterator[Shutdown]:
        """`overrides` replace settings fields (e.g. webhook_concurrency=1)."""
        settings = self.settings.model_copy(update=overrides)
        shutdown = Shutdown(grace=2.0)
        async with (
            WebhookClient(
                timeout=TEST_WEBHOOK_TIMEOUT, concurrency=settings.webhook_concurrency
            ) as http,
            trio.open_nursery() as nursery,
        ):
            forwarder = Forwarder(
                broker=self.broker,
                store=self.store,
                http=http,
                namespace=self.namespace,
                channel_id=self.channel_id,
                routes=routes,
                settings=settings,
                reporter=(statuses or StatusInbox()).reporter,
                shutdown=shutdown,
                retry_initial=0.01,
                retry_cap=0.05,
                counters=counters,
            )
            with trio.fail_after(WAIT):
                await nursery.start(forwarder.run)
            yield shutdown
            shutdown.request("test block ended")


def inbound_msg(content: str = "Hi there") -> VumiMessage:
    return VumiMessage(
        to_addr="0.0.0.0:9001",
        from_addr="127.0.0.1:53378",
        content=content,
        session_event=SessionEvent.RESUME,
        transport_type="telnet",
    )


async def wait_dead_letters(store: StateStore, owner_id: str, count: int) -> list[DeadLetter]:
    """Until `owner_id` has `count` dead letters; them, oldest first."""
    found: list[DeadLetter] = []

    async def enough() -> bool:
        nonlocal found
        found = await list_dead_letters(store, owner_id)
        return len(found) >= count

    with trio.fail_after(WAIT):
        await wait_for(enough)
    return found


async def assert_queue_copies(
    settings: Settings, broker: Broker, namespace: Namespace, channel_id: str, bodies: list[bytes]
) -> None:
    """On RabbitMQ each dead letter's body is also on `{cid}.dead` (in any order); embedded
    keeps no such copy."""
    dead = dead_letter_queue(namespace, channel_id)
    if settings.amqp is None:
        assert await broker.queue_length(dead) == 0
    else:
        assert sorted(await drain_queue(broker, dead, len(bodies))) == sorted(bodies)
