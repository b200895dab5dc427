"""The embedded queue's write linger (set by a channel draining a backlog): publishes and
acks that come within it share one transaction, acks included (they then skip the inline
path), and every one still takes effect. RabbitMQ has nothing to batch: a no-op there."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from ipc import broker_sqlite
from ipc.broker_sqlite import SqliteBroker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.broker import Delivery

LINGER = 0.2
SPACING = 0.01


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[SqliteBroker]:
    opened = await SqliteBroker.open(tmp_path / "queues.sqlite3")
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every write transaction the embedded queue commits."""
    sizes: list[int] = []
    commit = broker_sqlite._commit

    def counted(conn: Any, batch: list[Any], wal_fd: int | None) -> None:
        sizes.append(len(batch))
        commit(conn, batch, wal_fd)

    monkeypatch.setattr(broker_sqlite, "_commit", counted)
    return sizes


async def test_writes_within_the_linger_share_a_transaction(
    broker: SqliteBroker, batches: list[int]
) -> None:
    await broker.declare_queue("q")
    broker.set_write_linger(LINGER)
    batches.clear()
    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(broker.publish, "q", b"%d" % n)
            await trio.sleep(SPACING)
    assert batches == [5]
    assert await broker.queue_length("q") == 5

    batches.clear()
    async with broker.consume("q", prefetch=5) as consumer:
        deliveries: list[Delivery] = [await consumer.receive() for _ in range(5)]
        async with trio.open_nursery() as nursery:
            for delivery in deliveries:
                nursery.start_soon(consumer.ack, delivery)
                await trio.sleep(SPACING)
    # The five acks in one transaction (claims may have gone inline or in their own).
    assert 5 in batches
    assert sorted(d.body for d in deliveries) == [b"%d" % n for n in range(5)]
    assert await broker.queue_length("q") == 0

    broker.set_write_linger(0)
    batches.clear()
    await broker.publish("q", b"alone")
    assert batches == [1]
