"""Poison messages, on both backends: a message whose send crashes the channel process (here,
the outbound actor's nursery; the supervisor restarts the process and the broker redelivers)
is dead-lettered and rejected with `send_crashed` after MAX_SEND_CRASHES counted crashes, and
the messages around it still go out, even those that were in flight when it crashed."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import pytest
import trio

from channel_proc.control_state import SEND_CRASHED, send_attempts_scope
from channel_proc.deadletter import dead_letter_queue
from channel_proc.outbound import MAX_SEND_CRASHES
from channel_proc.transports.base import SendReceipt
from ipc.codec import decode_vumi_event, decode_vumi_message
from ipc.payloads import EventType, VumiMessage
from tests.channel_proc.outbound_support import FakeProvider, publish_outbound, running_outbound
from tests.channel_proc.support import WAIT, drain_queue

if TYPE_CHECKING:
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.state import StateStore

POISON = "poison"


class PoisonError(Exception):
    """What a provider library might raise on input it cannot handle."""


class PoisonTransport(FakeProvider):
    """Accepts everything but POISON, whose send raises an unexpected error; each send takes
    `delay` seconds (the poison one half of it), so with a window others are in flight."""

    kind: ClassVar[str] = "poison"

    def __init__(self, *, window: int = 1, delay: float = 0.0) -> None:
        super().__init__()
        self.window = window
        self.delay = delay
        self.sent: list[str] = []
        self.poison_sends = 0

    @property
    def max_in_flight(self) -> int:
        return self.window

    async def send(self, msg: VumiMessage) -> SendReceipt:
        if msg.content == POISON:
            self.poison_sends += 1
            await trio.sleep(self.delay / 2)
            raise PoisonError("cannot encode this")
        await trio.sleep(self.delay)
        self.sent.append(msg.content or "")
        return SendReceipt()


async def run_until_settled(
    broker: Broker,
    namespace: Namespace,
    cid: str,
    store: StateStore,
    transport: PoisonTransport,
    events: int,
) -> int:
    """Run the actor as restarted processes would (a fresh one after each crash) until
    `events` events are queued; returns the number of crashes."""
    crashes = 0
    queue = namespace.event_queue(cid)
    for _ in range(MAX_SEND_CRASHES + 3):
        try:
            with trio.fail_after(WAIT):
                async with running_outbound(broker, namespace, cid, transport, store=store):
                    while await broker.queue_length(queue) < events:  # noqa: ASYNC110
                        await trio.sleep(0.02)
            return crashes
        except* PoisonError:
            crashes += 1
    raise AssertionError(f"still crashing after {crashes} runs")


async def outcomes(broker: Broker, namespace: Namespace, cid: str, count: int) -> dict[str, str]:
    """message id -> "ack" or the nack reason, for the first `count` events."""
    found: dict[str, str] = {}
    for body in await drain_queue(broker, namespace.event_queue(cid), count):
        event = decode_vumi_event(body)
        assert event.user_message_id is not None
        ack = event.event_type == EventType.ACK
        found[event.user_message_id] = "ack" if ack else str(event.nack_reason)
    return found


@pytest.mark.slow
async def test_poison_message_rejected_after_crashes_others_sent(
    broker: Broker, namespace: Namespace, channel_id: str, store: StateStore
) -> None:
    messages = [VumiMessage(to_addr="+1", content=c) for c in ("first", POISON, "after")]
    for msg in messages:
        await publish_outbound(broker, namespace, channel_id, msg)
    transport = PoisonTransport()

    crashes = await run_until_settled(broker, namespace, channel_id, store, transport, 3)

    first, poison, after = (msg.message_id for msg in messages)
    # The first delivery is not counted (see channel_proc.outbound).
    assert crashes == transport.poison_sends == 1 + MAX_SEND_CRASHES
    assert await outcomes(broker, namespace, channel_id, 3) == {
        first: "ack",
        poison: SEND_CRASHED,
        after: "ack",
    }
    assert transport.sent == ["first", "after"]
    (dead,) = await drain_queue(broker, dead_letter_queue(namespace, channel_id), 1)
    assert decode_vumi_message(dead).message_id == poison
    assert await broker.queue_length(namespace.outbound_queue(channel_id)) == 0
    # Counters are cleared: by the rejection, and by every send that returned.
    assert await store.kv_items(send_attempts_scope(channel_id)) == {}


@pytest.mark.slow
async def test_poison_message_does_not_take_the_messages_in_flight_with_it(
    broker: Broker, namespace: Namespace, channel_id: str, store: StateStore
) -> None:
    """With a window, the messages in flight when the poison one crashes the process are
    redelivered too; once a crash is on record each is sent alone, so only the poison one
    collects crashes."""
    contents = ["a", POISON, "b", "c", "d"]
    messages = [VumiMessage(to_addr="+1", content=c) for c in contents]
    for msg in messages:
        await publish_outbound(broker, namespace, channel_id, msg)
    transport = PoisonTransport(window=3, delay=0.1)

    crashes = await run_until_settled(broker, namespace, channel_id, store, transport, 5)

    assert crashes == 1 + MAX_SEND_CRASHES
    expected = {msg.message_id: "ack" for msg in messages}
    expected[messages[1].message_id] = SEND_CRASHED
    assert await outcomes(broker, namespace, channel_id, 5) == expected
    assert set(transport.sent) == {"a", "b", "c", "d"}
    assert await store.kv_items(send_attempts_scope(channel_id)) == {}


async def test_poison_counter_cleared_by_a_normal_send(
    broker: Broker, namespace: Namespace, channel_id: str, store: StateStore
) -> None:
    """A redelivered message with a crash on record that then sends fine leaves no count."""
    msg = VumiMessage(to_addr="+1", content="fine")
    scope = send_attempts_scope(channel_id)
    await store.kv_put(scope, msg.message_id, {"started": MAX_SEND_CRASHES - 1})
    await publish_outbound(broker, namespace, channel_id, msg)
    # Taken once and given back unacked: the next delivery is a redelivery.
    async with broker.consume(namespace.outbound_queue(channel_id), prefetch=1) as consumer:
        with trio.fail_after(WAIT):
            await consumer.nack(await consumer.receive(), requeue=True)
    transport = PoisonTransport()
    crashes = await run_until_settled(broker, namespace, channel_id, store, transport, 1)
    assert crashes == 0
    assert await outcomes(broker, namespace, channel_id, 1) == {msg.message_id: "ack"}
    assert await store.kv_items(scope) == {}
