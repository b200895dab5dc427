"""RabbitMQ adapter under faults: a failing passive declare does not take concurrent
operations down with it, and a broker that stops answering fails calls in bounded time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from ipc.broker import open_broker
from ipc.broker_amqp import AmqpBroker
from ipc.errors import BrokerUnavailableError
from tests.conftest import AMQP_HOST, AMQP_PORT
from tests.faults.harness import RelayProxy

if TYPE_CHECKING:
    from ipc.names import Namespace
    from ipc.settings import Settings


async def test_amqp_lengths_of_missing_queues_do_not_fail_concurrent_operations(
    redis_settings: Settings, namespace: Namespace
) -> None:
    """RabbitMQ closes the channel of a passive declare of a missing queue (NOT_FOUND);
    declares, publishes and lengths running at the same time (a channel process starting,
    its metrics counting queues not declared yet) must not notice."""
    declared = [namespace.queue(f"declared-{n}") for n in range(20)]
    missing = [namespace.queue(f"missing-{n}") for n in range(50)]
    lengths: dict[str, list[int]] = {}

    async with open_broker(redis_settings) as broker:

        async def use(queue: str) -> None:
            await broker.declare_queue(queue)
            await broker.publish(queue, b"x")
            lengths[queue] = [await broker.queue_length(queue)]

        async def count(queue: str) -> None:
            lengths[queue] = [await broker.queue_length(queue) for _ in range(3)]

        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for queue in declared:
                        nursery.start_soon(use, queue)
                    for queue in missing:
                        nursery.start_soon(count, queue)
        finally:
            for queue in declared:
                await broker.delete_queue(queue)
    assert lengths == {q: [1] for q in declared} | {q: [0, 0, 0] for q in missing}


@pytest.mark.slow
async def test_amqp_calls_fail_in_bounded_time_when_rabbitmq_stops_answering(
    services: None, namespace: Namespace, nursery: trio.Nursery
) -> None:
    from ipc.settings import AmqpSettings

    relay = RelayProxy(AMQP_HOST, AMQP_PORT)
    port = await nursery.start(relay.run)
    broker = await AmqpBroker.connect(
        AmqpSettings(hostname="127.0.0.1", port=port), operation_timeout=1.0
    )
    queue = namespace.queue("stalled")
    try:
        await broker.declare_queue(queue)
        relay.stall()
        for call in (broker.publish(queue, b"x"), broker.queue_length(queue), broker.ping()):
            began = trio.current_time()
            with pytest.raises(BrokerUnavailableError, match="did not answer within 1 s"):
                await call
            assert trio.current_time() - began < 3
        relay.resume()
        with trio.fail_after(10):
            await broker.ping()
    finally:
        relay.resume()
        await broker.delete_queue(queue)
        await broker.aclose()


@pytest.mark.parametrize("lost_queue", [False, True], ids=["queue-kept", "queue-lost"])
async def test_amqp_queue_keeps_its_priorities_across_a_reconnect(
    redis_settings: Settings,
    namespace: Namespace,
    nursery: trio.Nursery,
    lost_queue: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After the connection drops, the first publish re-declares the queue as it was asked
    for (with its priorities): no failed precondition against the live queue, and a queue
    lost meanwhile comes back as a priority queue, not a plain one."""
    from ipc.settings import AmqpSettings

    relay = RelayProxy(AMQP_HOST, AMQP_PORT)
    port = await nursery.start(relay.run)
    queue = namespace.queue("prioritised")
    async with open_broker(redis_settings) as direct:
        broker = await AmqpBroker.connect(AmqpSettings(hostname="127.0.0.1", port=port))
        try:
            await broker.declare_queue(queue, max_priority=10)
            await broker.publish(queue, b"before")
            await relay.down()
            if lost_queue:
                await direct.delete_queue(queue)
            relay.up()
            with trio.fail_after(10):
                for body, priority in ((b"low", 1), (b"high", 9)):
                    while True:
                        try:
                            await broker.publish(queue, body, priority=priority)
                            break
                        except BrokerUnavailableError:
                            await trio.sleep(0.1)
            expected = [b"high", b"low"] if lost_queue else [b"high", b"low", b"before"]
            got: list[bytes] = []
            await direct.declare_queue(queue, max_priority=10)
            with trio.fail_after(10):
                async with direct.consume(queue, prefetch=10) as consumer:
                    async for delivery in consumer:
                        got.append(delivery.body)
                        await consumer.ack(delivery)
                        if len(got) == len(expected):
                            break
            assert got == expected
            assert "exists with other arguments" not in caplog.text
        finally:
            await broker.delete_queue(queue)
            await broker.aclose()
