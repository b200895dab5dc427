"""The outbound actor run in-process for a test, on the store and broker fixtures: a base for
fake providers, publishing to the outbound queue, the actor running for a block, and a gated
provider whose sends wait for the test to settle them."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import trio
import trio.testing
from pydantic import BaseModel

from channel_proc.backoff import Backoff
from channel_proc.lifecycle import Shutdown
from channel_proc.outbound import OutboundActor
from channel_proc.transports.base import SendReceipt, Transport
from ipc.broker import MAX_PRIORITY
from ipc.codec import decode_vumi_event, encode_payload
from ipc.payloads import VumiMessage
from tests.channel_proc.support import WAIT, drain_queue, wait_for
from tests.channel_proc.transports.harness import MemoryLink

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from channel_proc.transports.errors import SendError
    from ipc.broker import Broker
    from ipc.names import Namespace


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


@dataclass(eq=False)
class GatedCall:
    """One send call, blocked until the test settles it."""

    content: str
    outcome: SendError | None = None
    settled: trio.Event = field(default_factory=trio.Event)

    def settle(self, error: SendError | None = None) -> None:
        self.outcome = error
        self.settled.set()


class GatedTransport(FakeProvider):
    """A provider double with a window: every call waits for the test to settle it."""

    kind: ClassVar[str] = "gated"

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window
        self.calls: list[GatedCall] = []
        self.busy = 0
        self.most_busy = 0

    @property
    def max_in_flight(self) -> int:
        return self.window

    async def send(self, msg: VumiMessage) -> SendReceipt:
        # Recorded before the first checkpoint: the order of the calls themselves.
        call = GatedCall(msg.content or "")
        self.calls.append(call)
        self.busy += 1
        self.most_busy = max(self.most_busy, self.busy)
        try:
            await call.settled.wait()
        finally:
            self.busy -= 1
        if call.outcome is not None:
            raise call.outcome
        return SendReceipt(provider_message_id=f"p-{call.content}")

    def contents(self) -> list[str]:
        return [call.content for call in self.calls]

    async def wait_calls(self, count: int) -> list[GatedCall]:
        """Until `count` calls were made and the actor is idle (no further call is coming)."""

        async def made() -> bool:
            return len(self.calls) >= count

        with trio.fail_after(WAIT):
            await wait_for(made)
        await trio.testing.wait_all_tasks_blocked()
        return self.calls


async def publish_contents(
    broker: Broker, namespace: Namespace, channel_id: str, contents: list[str]
) -> dict[str, str]:
    """Publish one message per content; content -> message id."""
    ids = {}
    for content in contents:
        msg = VumiMessage(to_addr="+27820000001", content=content)
        await publish_outbound(broker, namespace, channel_id, msg)
        ids[content] = msg.message_id
    return ids


async def read_events(
    broker: Broker, namespace: Namespace, channel_id: str, count: int
) -> list[Any]:
    return [
        decode_vumi_event(body)
        for body in await drain_queue(broker, namespace.event_queue(channel_id), count)
    ]
