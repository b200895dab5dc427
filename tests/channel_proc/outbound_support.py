"""The outbound actor run in-process for a test, on the store and broker fixtures: a base for
fake providers, publishing to the outbound queue, and the actor running for a block."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import trio
from pydantic import BaseModel

from channel_proc.backoff import Backoff
from channel_proc.lifecycle import Shutdown
from channel_proc.outbound import OutboundActor
from channel_proc.transports.base import Transport
from ipc.broker import MAX_PRIORITY
from ipc.codec import encode_payload
from tests.channel_proc.support import WAIT
from tests.channel_proc.transports.harness import MemoryLink

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.payloads import VumiMessage


class FakeConfig(BaseModel):
    name: str = "fake"


class FakeProvider(Transport[FakeConfig]):
    """Base of the provider doubles: a link that is up as soon as it runs and carries no
    inbound; each double writes its own send()."""

    kind: ClassVar[str] = "fake"
    config_type = FakeConfig

    def __init__(self) -> None:
        super().__init__(FakeConfig(), MemoryLink())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


async def publish_outbound(
    broker: Broker, namespace: Namespace, channel_id: str, msg: VumiMessage, priority: int = 1
) -> None:
    queue = namespace.outbound_queue(channel_id)
    await broker.declare_queue(queue, max_priority=MAX_PRIORITY)
    await broker.publish(queue, encode_payload(msg), priority=priority)


@dataclass(frozen=True, slots=True)
class RunningOutbound:
    actor: OutboundActor
    shutdown: Shutdown


@asynccontextmanager
async def running_outbound(
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    transport: Transport[Any],
    **options: Any,
) -> AsyncIterator[RunningOutbound]:
    """Run an OutboundActor with fast retries for the block; `options` are its other keyword
    arguments (store, control, rate_limit...). Afterwards a stop is requested and in-flight
    sends get the grace. An error of the actor's ends the block and leaves it, in a group."""
    shutdown = Shutdown(grace=2.0)
    actor = OutboundActor(
        broker=broker,
        namespace=namespace,
        channel_id=channel_id,
        transport=transport,
        shutdown=shutdown,
        retry=Backoff(initial=0.01, cap=0.02),
        **options,
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(actor.run)
        yield RunningOutbound(actor, shutdown)
        shutdown.request("test block ended")
