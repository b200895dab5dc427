"""The outbound actor on both backends: real telnet transport and TCP client, or a flaky fake."""

from __future__ import annotations

from collections import deque
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
import trio
from pydantic import BaseModel

from channel_proc.backoff import Backoff
from channel_proc.deadletter import dead_letter_queue
from channel_proc.lifecycle import Shutdown
from channel_proc.outbound import OutboundActor
from channel_proc.transports.base import SendReceipt, Transport
from channel_proc.transports.errors import ConnectionFailed, ProviderRejected, SendError
from channel_proc.transports.telnet import TelnetConfig, TelnetTransport
from ipc.broker import MAX_PRIORITY
from ipc.codec import decode_vumi_event, encode_payload
from ipc.payloads import EventType, VumiMessage
from tests.channel_proc.support import WAIT, drain_queue, wait_for, wait_for_length
from tests.channel_proc.transports.harness import MemoryLink

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.broker import Broker
    from ipc.names import Namespace


class FlakyConfig(BaseModel):
    name: str = "flaky"


class FlakyTransport(Transport[FlakyConfig]):
    """A provider double: raises the scripted SendErrors first, then accepts."""

    kind: ClassVar[str] = "flaky"
    config_type = FlakyConfig

    def __init__(self, errors: list[SendError]) -> None:
        super().__init__(FlakyConfig(), MemoryLink())
        self.errors = deque(errors)
        self.attempts: list[str] = []
        self.accepted: list[str] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def send(self, msg: VumiMessage) -> SendReceipt:
        self.attempts.append(msg.message_id)
        if self.errors:
            raise self.errors.popleft()
        self.accepted.append(msg.message_id)
        return SendReceipt(provider_message_id=f"provider-{msg.message_id}")


@asynccontextmanager
async def running_outbound(
    broker: Broker, namespace: Namespace, channel_id: str, transport: Transport[Any]
) -> AsyncIterator[Shutdown]:
    shutdown = Shutdown(grace=2.0)
    actor = OutboundActor(
        broker=broker,
        namespace=namespace,
        channel_id=channel_id,
        transport=transport,
        shutdown=shutdown,
        retry=Backoff(initial=0.01, cap=0.02),
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(actor.run)
        yield shutdown
        shutdown.request("test block ended")


async def publish_outbound(
    broker: Broker, namespace: Namespace, channel_id: str, msg: VumiMessage
) -> None:
    queue = namespace.outbound_queue(channel_id)
    await broker.declare_queue(queue, max_priority=MAX_PRIORITY)
    await broker.publish(queue, encode_payload(msg), priority=1)


async def test_outbound_sends_to_telnet_client_and_acks(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    link = MemoryLink()
    telnet = TelnetTransport(TelnetConfig(twisted_endpoint="tcp:port=0:interface=127.0.0.1"), link)
    async with trio.open_nursery() as nursery:
        await nursery.start(telnet.run)
        port = int(telnet.server_address.rsplit(":", 1)[1])
        async with await trio.open_tcp_stream("127.0.0.1", port) as client:
            new = await link.next_inbound()
            msg = VumiMessage(to_addr=new.from_addr, content="hello")
            await publish_outbound(broker, namespace, channel_id, msg)
            async with running_outbound(broker, namespace, channel_id, telnet):
                with trio.fail_after(WAIT):
                    assert await client.receive_some(100) == b"hello\r\n"
                (body,) = await drain_queue(broker, namespace.event_queue(channel_id), 1)
        nursery.cancel_scope.cancel()
    event = decode_vumi_event(body)
    assert event.event_type == EventType.ACK
    assert event.user_message_id == msg.message_id
    assert event.sent_message_id == msg.message_id
    assert event.transport_name == channel_id
    assert await broker.queue_length(namespace.outbound_queue(channel_id)) == 0


async def test_outbound_permanent_error_is_a_nack(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    transport = FlakyTransport([ProviderRejected("no telnet client at 1.2.3.4:5")])
    msg = VumiMessage(to_addr="1.2.3.4:5", content="x")
    await publish_outbound(broker, namespace, channel_id, msg)
    async with running_outbound(broker, namespace, channel_id, transport):
        (body,) = await drain_queue(broker, namespace.event_queue(channel_id), 1)
    event = decode_vumi_event(body)
    assert event.event_type == EventType.NACK
    assert event.nack_reason == "no telnet client at 1.2.3.4:5"
    assert event.user_message_id == msg.message_id
    assert transport.attempts == [msg.message_id]
    assert await broker.queue_length(namespace.outbound_queue(channel_id)) == 0


async def test_outbound_retryable_error_is_retried_in_order(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    transport = FlakyTransport([ConnectionFailed("link down"), ConnectionFailed("still down")])
    first, second = VumiMessage(content="1"), VumiMessage(content="2")
    for msg in (first, second):
        await publish_outbound(broker, namespace, channel_id, msg)
    async with running_outbound(broker, namespace, channel_id, transport):
        bodies = await drain_queue(broker, namespace.event_queue(channel_id), 2)
    events = [decode_vumi_event(b) for b in bodies]
    assert [e.user_message_id for e in events] == [first.message_id, second.message_id]
    assert [e.sent_message_id for e in events] == [
        f"provider-{first.message_id}",
        f"provider-{second.message_id}",
    ]
    assert transport.attempts == [first.message_id] * 3 + [second.message_id]


async def test_outbound_stop_during_retries_leaves_message_queued(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    transport = FlakyTransport([ConnectionFailed("down")] * 10_000)
    queue = namespace.outbound_queue(channel_id)
    await publish_outbound(broker, namespace, channel_id, VumiMessage(content="x"))
    async with running_outbound(broker, namespace, channel_id, transport):
        await wait_for_length(broker, queue, 0)

        async def retried() -> bool:
            return len(transport.attempts) >= 2

        with trio.fail_after(WAIT):
            await wait_for(retried)
    assert await broker.queue_length(queue) == 1
    assert await broker.queue_length(namespace.event_queue(channel_id)) == 0


async def test_outbound_undecodable_body_is_dead_lettered(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    transport = FlakyTransport([])
    queue = namespace.outbound_queue(channel_id)
    await broker.declare_queue(queue, max_priority=MAX_PRIORITY)
    await broker.publish(queue, b'{"message_type": "nonsense"}')
    dead = dead_letter_queue(namespace, channel_id)
    async with running_outbound(broker, namespace, channel_id, transport):
        await wait_for_length(broker, dead, 1)
    assert await broker.queue_length(queue) == 0
    assert transport.attempts == []
    assert await drain_queue(broker, dead, 1) == [b'{"message_type": "nonsense"}']


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (ProviderRejected("x"), False),
        (ConnectionFailed("x"), True),
    ],
)
def test_send_error_retryable_flags(error: SendError, retryable: bool) -> None:
    assert error.retryable is retryable


async def test_shutdown_receive_does_not_hand_out_prefetched_messages_after_stop(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    queue = namespace.inbound_queue(channel_id)
    for n in range(3):
        await broker.publish(queue, f"{n}".encode())
    shutdown = Shutdown(grace=1.0)
    async with broker.consume(queue, prefetch=3) as consumer:
        first = await shutdown.receive(consumer)
        assert first is not None
        await consumer.ack(first)
        shutdown.request("test")
        assert await shutdown.receive(consumer) is None
    assert await broker.queue_length(queue) == 2
