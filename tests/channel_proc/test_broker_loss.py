"""Consumers lost to a RabbitMQ outage are replaced in place (RabbitMQ behind a relay the
test takes down and brings back within the ride-through): the forwarder's lane cancels its
handlers in flight and takes the queue again from the top, in order; the outbound actor lets
its sends in flight finish, then takes again what it held, in order. Nothing is lost; what
was in flight comes again (at least once)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from channel_proc.lane import consume_in_order
from channel_proc.lifecycle import Shutdown
from ipc.payloads import EventType
from tests.channel_proc.outbound_support import (
    GatedTransport,
    publish_contents,
    read_events,
    running_outbound,
)
from tests.channel_proc.support import WAIT, wait_for, wait_for_length
from tests.faults.harness import relayed_broker

if TYPE_CHECKING:
    from channel_proc.lane import Turn
    from ipc.broker import Broker, Consumer, Delivery
    from ipc.names import Namespace
    from tests.faults.harness import RelayProxy

#: Seconds RabbitMQ is away: well within the ride-through below.
OUTAGE = 1.0
RIDE_THROUGH = 10.0


async def outage(amqp_relay: RelayProxy) -> None:
    await amqp_relay.down()
    await trio.sleep(OUTAGE)
    amqp_relay.up()


@pytest.mark.parametrize(
    ("limit", "taken"),
    [
        # Room for more: the lane hears of the loss from receive().
        (4, 3),
        # Every handler busy and a delivery waiting: no receive() call; Consumer.wait_lost.
        (2, 2),
    ],
)
async def test_lane_replaces_a_lost_consumer_and_keeps_the_order(
    amqp_relay: RelayProxy, rabbitmq: Broker, namespace: Namespace, limit: int, taken: int
) -> None:
    queue = namespace.queue("lane-loss")
    await rabbitmq.declare_queue(queue)
    bodies = [b"m0", b"m1", b"m2"]
    for body in bodies:
        await rabbitmq.publish(queue, body)
    seen: list[tuple[bytes, bool]] = []
    cancelled: list[bytes] = []
    lost = trio.Event()

    async def handle(consumer: Consumer, delivery: Delivery, turn: Turn) -> None:
        seen.append((delivery.body, delivery.redelivered))
        if not lost.is_set():
            # Held until the consumer is lost: then cancelled, as its delivery comes again.
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                cancelled.append(delivery.body)
                raise
        await turn.begin()
        await consumer.ack(delivery)

    shutdown = Shutdown(grace=2.0)
    try:
        async with (
            relayed_broker(amqp_relay, ride_through=RIDE_THROUGH) as broker,
            trio.open_nursery() as nursery,
        ):
            consume = partial(consume_in_order, broker, shutdown, queue, handle, limit=limit)
            await nursery.start(consume)

            async def all_seen(count: int) -> bool:
                return len(seen) >= count

            with trio.fail_after(WAIT):
                await wait_for(partial(all_seen, taken))
                lost.set()
                await outage(amqp_relay)
                await wait_for(partial(all_seen, taken + len(bodies)))
            await wait_for_length(rabbitmq, queue, 0)
            shutdown.request("test done")
    finally:
        await rabbitmq.delete_queue(queue)
    # All of them were delivered once (prefetched, if not taken): all come again as such.
    assert seen == [(b, False) for b in bodies[:taken]] + [(b, True) for b in bodies]
    assert sorted(cancelled) == bodies[:taken]


async def test_outbound_finishes_its_sends_then_takes_again_what_it_held(
    amqp_relay: RelayProxy, rabbitmq: Broker, namespace: Namespace, channel_id: str
) -> None:
    contents = [f"m{n}" for n in range(5)]
    ids = await publish_contents(rabbitmq, namespace, channel_id, contents)
    transport = GatedTransport(window=3)
    try:
        async with relayed_broker(amqp_relay, ride_through=RIDE_THROUGH) as broker:
            async with running_outbound(broker, namespace, channel_id, transport):
                calls = await transport.wait_calls(3)
                await amqp_relay.down()
                # The sends in flight complete while RabbitMQ is away: their events wait
                # for it, their acks are lost with the consumer.
                for call in calls:
                    call.settle()
                await trio.sleep(OUTAGE)
                amqp_relay.up()

                async def all_sent() -> bool:
                    for call in transport.calls:
                        call.settle()
                    return len(transport.calls) >= len(contents) + 3

                with trio.fail_after(WAIT):
                    await wait_for(all_sent)
                await wait_for_length(
                    rabbitmq, namespace.event_queue(channel_id), len(contents) + 3
                )
            # Stopped: anything not acked would be back in the queue.
            left = await rabbitmq.queue_length(namespace.outbound_queue(channel_id))
            events = await read_events(rabbitmq, namespace, channel_id, len(contents) + 3)
    finally:
        for queue in namespace.channel_queues(channel_id):
            await rabbitmq.delete_queue(queue)
    # The three in flight went again (at least once, same message ids), then the rest.
    assert transport.contents() == contents[:3] + contents
    assert sorted(e.user_message_id or "" for e in events) == sorted(
        [ids[c] for c in contents[:3]] * 2 + [ids[c] for c in contents[3:]]
    )
    assert all(e.event_type == EventType.ACK for e in events)
    assert left == 0
