"""The outbound actor on both backends: real telnet transport and TCP client, a flaky fake,
a gated fake for the window (sends in flight at once), and the smpp transport + fake SMSC."""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import TYPE_CHECKING, ClassVar, cast

import pytest
import trio
import trio.testing

from channel_proc.deadletter import dead_letter_queue
from channel_proc.lifecycle import Shutdown
from channel_proc.outbound import BACKLOG_PREFETCH, OUTBOUND_PREFETCH, OutboundActor
from channel_proc.priority import BACKLOG_QUEUE_LINGER, BACKLOG_WRITE_LINGER, apply_backlog
from channel_proc.transports.base import SendReceipt
from channel_proc.transports.errors import ConnectionFailed, ProviderRejected, SendError
from channel_proc.transports.smpp import SmppConfig, SmppTransport
from channel_proc.transports.telnet import TelnetConfig, TelnetTransport
from ipc.broker import MAX_PRIORITY, Broker
from ipc.codec import decode_vumi_event
from ipc.payloads import EventType, VumiMessage
from tests.channel_proc.outbound_support import (
    FakeProvider,
    GatedTransport,
    publish_contents,
    publish_outbound,
    read_events,
    running_outbound,
)
from tests.channel_proc.support import WAIT, drain_queue, wait_for, wait_for_length
from tests.channel_proc.transports.harness import MemoryLink
from tests.fakes.fake_smsc import SubmitAnswer, open_fake_smsc, smpp_config

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from ipc.broker import Consumer
    from ipc.names import Namespace
    from ipc.state import StateStore


class FlakyTransport(FakeProvider):
    """A provider double: raises the scripted SendErrors first, then accepts."""

    kind: ClassVar[str] = "flaky"

    def __init__(self, errors: list[SendError]) -> None:
        super().__init__()
        self.errors = deque(errors)
        self.attempts: list[str] = []
        self.accepted: list[str] = []

    async def send(self, msg: VumiMessage) -> SendReceipt:
        self.attempts.append(msg.message_id)
        if self.errors:
            raise self.errors.popleft()
        self.accepted.append(msg.message_id)
        return SendReceipt(provider_message_id=f"provider-{msg.message_id}")


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


# --- the window: several sends in flight ----------------------------------------------------


async def test_window_sends_in_queue_order_and_acks_each_when_done(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    contents = [f"m{n}" for n in range(6)]
    ids = await publish_contents(broker, namespace, channel_id, contents)
    transport = GatedTransport(window=3)
    async with running_outbound(broker, namespace, channel_id, transport):
        calls = await transport.wait_calls(3)
        assert transport.contents() == ["m0", "m1", "m2"]
        # The second finishes first: its outcome is recorded at once, and a slot frees.
        calls[1].settle(ProviderRejected("no route"))
        [nack] = await read_events(broker, namespace, channel_id, 1)
        assert (nack.event_type, nack.user_message_id) == (EventType.NACK, ids["m1"])
        await transport.wait_calls(4)
        assert transport.contents() == ["m0", "m1", "m2", "m3"]
        for call in transport.calls:
            if not call.settled.is_set():
                call.settle()
        await transport.wait_calls(6)
        for call in transport.calls[4:]:
            call.settle()
        acks = await read_events(broker, namespace, channel_id, 5)
        await wait_for_length(broker, namespace.outbound_queue(channel_id), 0)
    assert transport.contents() == contents
    assert transport.most_busy == 3
    assert {e.user_message_id for e in acks} == {ids[c] for c in contents if c != "m1"}
    assert all(e.event_type == EventType.ACK for e in acks)
    assert await broker.queue_length(namespace.outbound_queue(channel_id)) == 0


class HeldEventsBroker(Broker):
    """The broker under test, except that publishes to `held_queue` wait for `release`."""

    def __init__(self, inner: Broker, held_queue: str) -> None:
        self.inner = inner
        self.held_queue = held_queue
        self.release = trio.Event()
        self.held = 0

    async def declare_queue(self, queue: str, *, max_priority: int = 0) -> None:
        await self.inner.declare_queue(queue, max_priority=max_priority)

    async def publish(self, queue: str, body: bytes, *, priority: int = 0) -> None:
        if queue == self.held_queue:
            self.held += 1
            await self.release.wait()
        await self.inner.publish(queue, body, priority=priority)

    def consume(self, queue: str, *, prefetch: int) -> AbstractAsyncContextManager[Consumer]:
        return self.inner.consume(queue, prefetch=prefetch)

    async def queue_length(self, queue: str) -> int:
        return await self.inner.queue_length(queue)

    async def delete_queue(self, queue: str) -> None:
        await self.inner.delete_queue(queue)

    async def ping(self) -> None:
        await self.inner.ping()

    def set_write_linger(self, seconds: float) -> None:
        self.inner.set_write_linger(seconds)

    async def aclose(self) -> None:
        """The fixture closes the inner broker."""


class DedupingGatedTransport(GatedTransport):
    kind: ClassVar[str] = "deduping-gated"
    dedupes_redeliveries = True


@pytest.mark.parametrize(
    ("transport_type", "next_send_meanwhile"),
    [(GatedTransport, False), (DedupingGatedTransport, True)],
)
async def test_an_answered_send_frees_its_place_before_its_event_only_if_redeliveries_are_deduped(
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    transport_type: type[GatedTransport],
    next_send_meanwhile: bool,
) -> None:
    """Window 1: the first send is answered and its event publish held. A transport that
    dedupes redeliveries (SMPP's ledger) gets the next send meanwhile; any other only once
    the first message is acked (a crash in between would send it twice)."""
    ids = await publish_contents(broker, namespace, channel_id, ["one", "two"])
    held = HeldEventsBroker(broker, namespace.event_queue(channel_id))
    transport = transport_type(window=1)
    async with running_outbound(held, namespace, channel_id, transport):
        (first,) = await transport.wait_calls(1)
        first.settle()

        async def event_held() -> bool:
            return held.held == 1

        with trio.fail_after(WAIT):
            await wait_for(event_held)
        if next_send_meanwhile:
            await transport.wait_calls(2)
        else:
            # Long enough for the next delivery to reach a free window place.
            await trio.sleep(0.3)
        assert transport.contents() == (["one", "two"] if next_send_meanwhile else ["one"])
        held.release.set()
        calls = await transport.wait_calls(2)
        calls[1].settle()
        events = await read_events(broker, namespace, channel_id, 2)
        await wait_for_length(broker, namespace.outbound_queue(channel_id), 0)
    assert [event.user_message_id for event in events] == [ids["one"], ids["two"]]


class DedupingAnsweringTransport(FakeProvider):
    """Answers every send at once, as SMPP's ledger-backed transport may (window 1)."""

    kind: ClassVar[str] = "deduping-answering"
    dedupes_redeliveries = True

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    async def send(self, msg: VumiMessage) -> SendReceipt:
        self.sent.append(msg.content or "")
        return SendReceipt(provider_message_id=f"p-{msg.content}")


class LingerRecorder:
    """Stands in for the store and the broker: records set_write_linger."""

    def __init__(self) -> None:
        self.lingers: list[float] = []

    def set_write_linger(self, seconds: float) -> None:
        self.lingers.append(seconds)


@pytest.mark.parametrize(
    ("transport", "queue_linger", "normal", "backlog"),
    [
        # Answered sends leave the window: room for them too, and many more in a backlog,
        # whose event publishes and acks wait longer.
        (
            DedupingAnsweringTransport(),
            BACKLOG_QUEUE_LINGER,
            2 * 1 + OUTBOUND_PREFETCH,
            2 * 1 + OUTBOUND_PREFETCH + BACKLOG_PREFETCH,
        ),
        # They hold their window place until acked: their queue writes wait no longer than
        # the store's, and the prefetch stays.
        (
            GatedTransport(window=3),
            BACKLOG_WRITE_LINGER,
            3 + OUTBOUND_PREFETCH,
            3 + OUTBOUND_PREFETCH,
        ),
    ],
    ids=["answered leave the window", "answered hold their place"],
)
async def test_a_backlog_makes_the_process_writes_wait_and_its_consumer_hold_more(
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    transport: FakeProvider,
    queue_linger: float,
    normal: int,
    backlog: int,
) -> None:
    actor = OutboundActor(
        broker=broker,
        namespace=namespace,
        channel_id=channel_id,
        transport=transport,
        shutdown=Shutdown(grace=1.0),
    )
    assert actor.prefetch == normal
    store, queues = LingerRecorder(), LingerRecorder()
    on_backlog = partial(apply_backlog, cast("StateStore", store), cast("Broker", queues), actor)
    on_backlog(True)
    assert (store.lingers, queues.lingers, actor.prefetch) == (
        [BACKLOG_WRITE_LINGER],
        [queue_linger],
        backlog,
    )
    on_backlog(False)
    assert (store.lingers[-1], queues.lingers[-1], actor.prefetch) == (0.0, 0.0, normal)


async def test_a_backlog_lets_more_answered_sends_wait_for_their_events(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    """While the channel drains a backlog its queue writes wait longer to be batched
    (channel_proc.priority.apply_backlog), and answered sends that left the window wait for
    their event and ack meanwhile: the consumer is reopened to hold BACKLOG_PREFETCH more of
    them when the backlog starts, and reopened as before when it ends; every message is sent
    once, in queue order. Every event publish is held here, so the sends stop once all the
    consumer may hold is answered."""
    normal = 2 * 1 + OUTBOUND_PREFETCH
    contents = [f"m{n:03d}" for n in range(2 * normal + BACKLOG_PREFETCH + 20)]
    await publish_contents(broker, namespace, channel_id, contents)
    held = HeldEventsBroker(broker, namespace.event_queue(channel_id))
    transport = DedupingAnsweringTransport()

    async def sends_stop_at(count: int) -> None:
        async def reached() -> bool:
            return len(transport.sent) >= count

        with trio.fail_after(WAIT):
            await wait_for(reached)
        # Long enough for a delivery beyond the prefetch to be sent, were there one.
        await trio.sleep(0.3)
        assert len(transport.sent) == count

    def release_held_and_hold_again() -> None:
        released, held.release = held.release, trio.Event()
        released.set()

    async with running_outbound(held, namespace, channel_id, transport) as running:
        await sends_stop_at(normal)
        running.actor.set_backlog(True)
        # The held ones are acked; the next delivery finds the prefetch changed, goes back,
        # and the reopened consumer holds the larger prefetch.
        release_held_and_hold_again()
        await sends_stop_at(normal + normal + BACKLOG_PREFETCH)
        running.actor.set_backlog(False)
        release_held_and_hold_again()
        await sends_stop_at(2 * normal + BACKLOG_PREFETCH + normal)
        held.release.set()
        await read_events(broker, namespace, channel_id, len(contents))
        await wait_for_length(broker, namespace.outbound_queue(channel_id), 0)
    assert transport.sent == contents


async def test_window_retries_failed_sends_in_order_before_newer_ones(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    contents = [f"m{n}" for n in range(6)]
    ids = await publish_contents(broker, namespace, channel_id, contents)
    transport = GatedTransport(window=3)
    async with running_outbound(broker, namespace, channel_id, transport):
        calls = await transport.wait_calls(3)
        calls[2].settle(ConnectionFailed("link down"))
        calls[1].settle(ConnectionFailed("link down"))
        await trio.testing.wait_all_tasks_blocked()
        # Nothing new while a send is still in flight after a failure.
        assert len(transport.calls) == 3
        calls[0].settle()
        # Then the failed ones go again, in queue order, ahead of the rest.
        calls = await transport.wait_calls(6)
        assert transport.contents()[3:] == ["m1", "m2", "m3"]
        calls[3].settle(ConnectionFailed("down again"))
        calls[4].settle()
        calls[5].settle()
        calls = await transport.wait_calls(9)
        assert transport.contents()[6:] == ["m1", "m4", "m5"]
        for call in calls[6:]:
            call.settle()
        events = await read_events(broker, namespace, channel_id, 6)
    assert sorted(e.user_message_id for e in events) == sorted(ids.values())
    assert {e.event_type for e in events} == {EventType.ACK}
    assert await broker.queue_length(namespace.outbound_queue(channel_id)) == 0


async def test_window_respects_priorities_at_the_queue(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    for n in range(3):
        await publish_outbound(broker, namespace, channel_id, VumiMessage(content=f"low{n}"))
    await publish_outbound(broker, namespace, channel_id, VumiMessage(content="high"), priority=5)
    transport = GatedTransport(window=2)
    async with running_outbound(broker, namespace, channel_id, transport):
        calls = await transport.wait_calls(2)
        assert transport.contents() == ["high", "low0"]
        for call in calls:
            call.settle()
        calls = await transport.wait_calls(4)
        for call in calls[2:]:
            call.settle()
        await read_events(broker, namespace, channel_id, 4)
    assert transport.contents() == ["high", "low0", "low1", "low2"]


async def test_stop_with_sends_in_the_window_leaves_them_queued(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    await publish_contents(broker, namespace, channel_id, [f"m{n}" for n in range(5)])
    transport = GatedTransport(window=3)
    queue = namespace.outbound_queue(channel_id)
    async with running_outbound(broker, namespace, channel_id, transport) as running:
        await transport.wait_calls(3)
        # A second signal: what is in flight is abandoned, as in a crash.
        running.shutdown.hurry()
    assert await broker.queue_length(queue) == 5
    assert await broker.queue_length(namespace.event_queue(channel_id)) == 0


async def test_window_over_smpp_writes_submits_in_queue_order(
    broker: Broker, namespace: Namespace, channel_id: str
) -> None:
    contents = [f"m{n:02}" for n in range(20)]
    ids = await publish_contents(broker, namespace, channel_id, contents)
    async with open_fake_smsc() as smsc:
        # Answers come back out of order: later submits are answered sooner.
        smsc.script_submits(*[SubmitAnswer(delay=0.002 * (20 - n)) for n in range(20)])
        config = SmppConfig.model_validate(smpp_config(smsc, window=5))
        transport = SmppTransport(config, MemoryLink(size=1024))
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT):
                await nursery.start(transport.run)
                await smsc.wait_bound()
            async with running_outbound(broker, namespace, channel_id, transport):
                events = await read_events(broker, namespace, channel_id, 20)
            nursery.cancel_scope.cancel()
    sent = [submit.params["short_message"] for submit in smsc.submits]
    assert sent == [c.encode() for c in contents]
    assert sorted(e.user_message_id for e in events) == sorted(ids.values())
    assert {e.event_type for e in events} == {EventType.ACK}
