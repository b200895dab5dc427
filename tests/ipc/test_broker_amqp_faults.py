"""RabbitMQ adapter under faults: a failing passive declare does not take concurrent
operations down with it, and a broker that stops answering fails calls in bounded time."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import pytest
import trio

from ipc.broker import open_broker
from ipc.errors import BrokerUnavailableError
from tests.faults.harness import relayed_broker

if TYPE_CHECKING:
    from ipc.names import Namespace
    from ipc.settings import Settings
    from tests.faults.harness import RelayProxy


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
    amqp_relay: RelayProxy, namespace: Namespace
) -> None:
    queue = namespace.queue("stalled")
    async with relayed_broker(amqp_relay, operation_timeout=1.0) as broker:
        try:
            await broker.declare_queue(queue)
            amqp_relay.stall()
            for call in (broker.publish(queue, b"x"), broker.queue_length(queue), broker.ping()):
                began = trio.current_time()
                with pytest.raises(BrokerUnavailableError, match="did not answer within 1 s"):
                    await call
                assert trio.current_time() - began < 3
            amqp_relay.resume()
            with trio.fail_after(10):
                await broker.ping()
        finally:
            amqp_relay.resume()
            await broker.delete_queue(queue)


async def test_amqp_channels_closed_by_rabbitmq_do_not_break_channels_opened_meanwhile(
    redis_settings: Settings, namespace: Namespace
) -> None:
    """RabbitMQ closes the channel of every passive declare of a missing queue, while
    consumers open and close their own channels and some calls are cut short by their
    callers. Cutting a call short must not make aiormq close its channel as well: those closes
    race RabbitMQ's and the reuse of channel numbers, and RabbitMQ then drops the whole
    connection ("second 'channel.open' seen", seen in the poison-message test under CI load)."""
    queue = namespace.queue("consumed")
    missing = namespace.queue("missing")
    async with open_broker(redis_settings) as broker:
        await broker.declare_queue(queue)

        async def lengths() -> None:
            for n in range(600):
                # Some cut short mid-call by their caller.
                with trio.move_on_after(0.0005 * (n % 7)) if n % 2 else nullcontext():
                    assert await broker.queue_length(missing if n % 3 else queue) == 0

        async def consumers() -> None:
            for _ in range(300):
                async with broker.consume(queue, prefetch=1):
                    pass

        try:
            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lengths)
                    nursery.start_soon(consumers)
                    nursery.start_soon(consumers)
        finally:
            await broker.delete_queue(queue)
