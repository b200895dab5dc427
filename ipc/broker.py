"""The durable-queue interface and its factory.

Two implementations sit behind it: RabbitMQ (ipc/broker_amqp.py, the only
aiormq importer, with its asyncio bridge) and the embedded SQLite queue
(ipc/broker_embedded.py, a file per queue owner, each an ipc/broker_sqlite.py).
Both must pass the same tests (tests/ipc/test_broker.py).

Semantics both give: a message is durable once `publish` returns; a consumer
gets each message at least once; a message is removed only by `ack`; anything
unacked when its consumer goes away (process killed included) is delivered
again, to the next consumer. Order is FIFO within a priority; higher priority
first when the queue was declared with max_priority.

Errors: BrokerUnavailableError when the backend cannot be reached, never a library
exception. A broker opened with `ride_through` (channel processes; RabbitMQ only, as the
embedded queue has no connection to lose) waits out a short outage in publishes and
declares, and a consumer whose connection dropped raises ConsumerLostError: its owner opens
a new consumer, which gets the unacked deliveries again (acks on the lost one are dropped).
"""

from __future__ import annotations

import abc
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from contextlib import AbstractAsyncContextManager

    from ipc.errors import ConsumerLostError
    from ipc.ride_through import OutageListener
    from ipc.settings import Settings

#: Outbound queues are declared with this many priority levels (API `priority` 1-5).
MAX_PRIORITY = 5


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to a consumer; pass it back to ack/nack."""

    body: bytes
    tag: int
    redelivered: bool = False


class Consumer(abc.ABC):
    """An open consumer on one queue with at most `prefetch` unacked deliveries."""

    @abc.abstractmethod
    async def receive(self) -> Delivery:
        """Wait for the next delivery (ConsumerLostError: open a new consumer)."""

    @abc.abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """Remove the message for good."""

    @abc.abstractmethod
    async def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        """Give the message back (requeue=True: it is delivered again) or drop it."""

    async def wait_lost(self) -> ConsumerLostError:
        """Return, with the error receive() raises, once the consumer is lost to a broker
        outage: a consumer busy with what it holds hears of it without calling receive().
        Never returns for a consumer that cannot be lost (the embedded queue's)."""
        await trio.sleep_forever()

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Delivery:
        return await self.receive()


class Broker(abc.ABC):
    @abc.abstractmethod
    async def declare_queue(self, queue: str, *, max_priority: int = 0) -> None:
        """Create the durable queue if missing (idempotent). AMQP: bound to exchange `vumi`
        with the queue name as routing key."""

    @abc.abstractmethod
    async def publish(self, queue: str, body: bytes, *, priority: int = 0) -> None:
        """Durably enqueue one message (publisher confirm / committed write) and return.

        The queue is declared first (with default arguments) if this broker has not
        declared it yet, so that nothing published before a consumer exists is lost.
        """

    @abc.abstractmethod
    def consume(self, queue: str, *, prefetch: int) -> AbstractAsyncContextManager[Consumer]:
        """Open a consumer; on exit, unacked deliveries go back to the queue."""

    @abc.abstractmethod
    async def queue_length(self, queue: str) -> int:
        """Messages waiting (not counting those delivered and unacked)."""

    @abc.abstractmethod
    async def delete_queue(self, queue: str) -> None:
        """Delete the queue and its messages (no error if it does not exist)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise BrokerUnavailableError when the backend does not answer."""

    @abc.abstractmethod
    def set_write_linger(self, seconds: float) -> None:
        """Writes (publishes, acks) wait `seconds` for others to commit with them (0, the
        default: as soon as ready); see StateStore.set_write_linger."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...


@asynccontextmanager
async def open_broker(
    settings: Settings, *, ride_through: float = 0.0, on_outage: OutageListener | None = None
) -> AsyncIterator[Broker]:
    """Open the broker the settings select: RabbitMQ when `settings.amqp` is set, else embedded
    (which has no outages to ride out: `ride_through` and `on_outage` apply to RabbitMQ)."""
    broker: Broker
    if settings.amqp is not None:
        from ipc.broker_amqp import AmqpBroker

        broker = await AmqpBroker.connect(
            settings.amqp, ride_through=ride_through, on_outage=on_outage
        )
    else:
        from ipc.broker_embedded import EmbeddedBroker

        broker = await EmbeddedBroker.open(
            settings.data_dir / "queues", legacy=settings.data_dir / "queues.sqlite3"
        )
    try:
        yield broker
    finally:
        await broker.aclose()
