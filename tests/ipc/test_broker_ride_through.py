"""The RabbitMQ adapter riding out an outage (RabbitMQ behind a relay the test takes down):
publishes wait for it within the ride-through and fail past it; a consumer whose connection
dropped says so (ConsumerLostError), drops acks it can no longer send, and a new consumer
gets its unacked deliveries again; a consumer RabbitMQ cancelled is not "lost"."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from ipc.errors import BrokerUnavailableError, ConsumerLostError
from tests.faults.harness import relayed_broker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.broker import Broker, Consumer
    from ipc.names import Namespace
    from tests.faults.harness import RelayProxy


@pytest.fixture
async def queue(rabbitmq: Broker, namespace: Namespace) -> AsyncIterator[str]:
    name = namespace.queue("ride")
    await rabbitmq.declare_queue(name)
    yield name
    await rabbitmq.delete_queue(name)


async def test_a_publish_waits_out_an_outage_shorter_than_the_ride_through(
    amqp_relay: RelayProxy, rabbitmq: Broker, queue: str
) -> None:
    async with relayed_broker(amqp_relay, ride_through=10) as broker:
        await broker.publish(queue, b"before")
        await amqp_relay.down()
        published = trio.Event()

        async def publish() -> None:
            await broker.publish(queue, b"during")
            published.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            await trio.sleep(1.0)
            assert not published.is_set()
            amqp_relay.up()
            with trio.fail_after(10):
                await published.wait()
    assert await rabbitmq.queue_length(queue) == 2


@pytest.mark.parametrize(
    ("ride_through", "at_least", "at_most"), [(0.0, 0.0, 0.5), (1.0, 1.0, 3.0)], ids=str
)
async def test_a_publish_fails_once_the_ride_through_is_over(
    amqp_relay: RelayProxy, queue: str, ride_through: float, at_least: float, at_most: float
) -> None:
    async with relayed_broker(amqp_relay, ride_through=ride_through) as broker:
        await broker.publish(queue, b"before")
        await amqp_relay.down()
        began = trio.current_time()
        with pytest.raises(BrokerUnavailableError) as failed:
            await broker.publish(queue, b"during")
        took = trio.current_time() - began
    assert failed.value.unreachable
    assert at_least <= took <= at_most


async def test_a_lost_consumer_says_so_and_a_new_one_gets_its_deliveries_again(
    amqp_relay: RelayProxy, rabbitmq: Broker, queue: str
) -> None:
    for body in (b"m0", b"m1"):
        await rabbitmq.publish(queue, body)
    async with relayed_broker(amqp_relay, ride_through=10) as broker:
        with trio.fail_after(10):
            async with broker.consume(queue, prefetch=1) as consumer:
                first = await consumer.receive()
                await amqp_relay.down()
                # Heard of without a receive() call (a consumer busy with what it holds).
                assert isinstance(await consumer.wait_lost(), ConsumerLostError)
                with pytest.raises(ConsumerLostError):
                    await consumer.receive()
                # Its channel is gone: the ack cannot be sent, and is not an error.
                await consumer.ack(first)
            amqp_relay.up()
            got = []
            async with broker.consume(queue, prefetch=1) as consumer:
                for _ in range(2):
                    delivery = await consumer.receive()
                    got.append((delivery.body, delivery.redelivered))
                    await consumer.ack(delivery)
    assert (first.body, first.redelivered) == (b"m0", False)
    assert got == [(b"m0", True), (b"m1", False)]
    assert await rabbitmq.queue_length(queue) == 0


async def test_without_ride_through_a_lost_consumer_fails_as_unavailable(
    amqp_relay: RelayProxy, rabbitmq: Broker, queue: str
) -> None:
    await rabbitmq.publish(queue, b"m0")
    async with relayed_broker(amqp_relay, ride_through=0) as broker:
        with trio.fail_after(10):
            async with broker.consume(queue, prefetch=1) as consumer:
                await consumer.receive()
                await amqp_relay.down()
                with pytest.raises(BrokerUnavailableError) as failed:
                    await consumer.receive()
                assert not await _heard_lost(consumer)
    assert not isinstance(failed.value, ConsumerLostError)


async def _heard_lost(consumer: Consumer) -> bool:
    with trio.move_on_after(0.2):
        await consumer.wait_lost()
        return True
    return False


async def test_a_consumer_rabbitmq_cancelled_is_not_lost(
    amqp_relay: RelayProxy, rabbitmq: Broker, namespace: Namespace
) -> None:
    """A deleted queue cancels its consumers: opening a new one would create it again."""
    doomed = namespace.queue("doomed")
    await rabbitmq.declare_queue(doomed)
    try:
        async with relayed_broker(amqp_relay, ride_through=10) as broker:
            with trio.fail_after(10):
                async with broker.consume(doomed, prefetch=1) as consumer:
                    await rabbitmq.delete_queue(doomed)
                    with pytest.raises(BrokerUnavailableError, match="cancelled") as failed:
                        await consumer.receive()
                    assert not await _heard_lost(consumer)
        assert not isinstance(failed.value, ConsumerLostError)
    finally:
        await rabbitmq.delete_queue(doomed)
