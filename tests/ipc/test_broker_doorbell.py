"""The embedded queue's doorbells: a publish in one process wakes another process's consumer
at once (polling is only the fallback), and a missing doorbell never fails a publish."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from ipc import broker_sqlite
from ipc.broker import Consumer, Delivery
from ipc.broker_sqlite import DOORBELLS_AVAILABLE, SqliteBroker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

REPO = Path(__file__).resolve().parents[2]
#: Consumers under test poll this rarely, so only a doorbell can wake them within a test.
NEVER = 60.0

pytestmark = pytest.mark.skipif(not DOORBELLS_AVAILABLE, reason="doorbells need Linux")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "queues.sqlite3"


@pytest.fixture
async def publisher(path: Path) -> AsyncIterator[SqliteBroker]:
    broker = await SqliteBroker.open(path)
    try:
        yield broker
    finally:
        await broker.aclose()


async def open_slow_poller(path: Path, *, doorbells: bool = True) -> SqliteBroker:
    return await SqliteBroker.open(path, doorbells=doorbells, poll_min=NEVER, poll_max=NEVER)


async def wait_until_idle(broker: SqliteBroker, queue: str) -> None:
    """Until a consumer of `broker` has found `queue` empty and waits for an arrival."""
    # Polling: the consumer's wait is internal state with no event to wait on.
    with trio.fail_after(10):
        while not broker._arrivals.waiting.get(queue):  # noqa: ASYNC110
            await trio.sleep(0.005)


async def receive_in_background(
    broker: SqliteBroker, queue: str, nursery: trio.Nursery
) -> trio.MemoryReceiveChannel[Delivery]:
    """A consumer that receives one delivery (acks it) and hands it over."""
    got_send, got_recv = trio.open_memory_channel[Delivery](1)

    async def consume() -> None:
        async with broker.consume(queue, prefetch=1) as consumer:
            delivery = await consumer.receive()
            await consumer.ack(delivery)
            await got_send.send(delivery)

    nursery.start_soon(consume)
    await wait_until_idle(broker, queue)
    return got_recv


async def test_a_publish_rings_another_brokers_idle_consumer(
    path: Path, publisher: SqliteBroker, nursery: trio.Nursery
) -> None:
    consumer_broker = await open_slow_poller(path)
    try:
        got = await receive_in_background(consumer_broker, "q", nursery)
        await publisher.publish("q", b"ding")
        with trio.fail_after(5):
            delivery = await got.receive()
        assert delivery.body == b"ding"
    finally:
        await consumer_broker.aclose()


@pytest.mark.slow
async def test_without_doorbells_only_polling_finds_the_message(
    path: Path, publisher: SqliteBroker, nursery: trio.Nursery
) -> None:
    """The control for the test above: the same wait is not cut short without a doorbell."""
    consumer_broker = await open_slow_poller(path, doorbells=False)
    try:
        got = await receive_in_background(consumer_broker, "q", nursery)
        await publisher.publish("q", b"ding")
        with trio.move_on_after(1):
            await got.receive()
            pytest.fail("the consumer woke up without a doorbell")
    finally:
        nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await consumer_broker.aclose()


async def test_polling_still_delivers_without_doorbells(
    path: Path, publisher: SqliteBroker, nursery: trio.Nursery
) -> None:
    consumer_broker = await SqliteBroker.open(path, doorbells=False)
    try:
        got = await receive_in_background(consumer_broker, "q", nursery)
        await publisher.publish("q", b"polled")
        with trio.fail_after(5):
            assert (await got.receive()).body == b"polled"
    finally:
        await consumer_broker.aclose()


async def test_a_release_rings_the_other_consumers(path: Path, nursery: trio.Nursery) -> None:
    """Rows a consumer leaves unacked wake another broker's consumer of the queue."""
    first = await SqliteBroker.open(path)
    second = await open_slow_poller(path)
    try:
        await first.publish("q", b"held")
        async with first.consume("q", prefetch=1) as holder:
            assert (await holder.receive()).body == b"held"
            got = await receive_in_background(second, "q", nursery)
        # Leaving the consume block released "held" and rang `second`.
        with trio.fail_after(5):
            delivery = await got.receive()
        assert (delivery.body, delivery.redelivered) == (b"held", True)
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_publish_from_another_process_rings(path: Path, nursery: trio.Nursery) -> None:
    consumer_broker = await open_slow_poller(path)
    script = "\n".join(
        [
            "import trio",
            "from pathlib import Path",
            "from ipc.broker_sqlite import SqliteBroker",
            "async def main():",
            f"    broker = await SqliteBroker.open(Path({str(path)!r}))",
            '    await broker.publish("q", b"from afar")',
            "    await broker.aclose()",
            "trio.run(main)",
        ]
    )
    try:
        got = await receive_in_background(consumer_broker, "q", nursery)
        with trio.fail_after(30):
            await trio.run_process([sys.executable, "-c", script], env=child_env())
        with trio.fail_after(5):
            assert (await got.receive()).body == b"from afar"
    finally:
        await consumer_broker.aclose()


@pytest.fixture
def claims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many rows each claim statement took, in order (0: an empty claim)."""
    taken: list[int] = []
    claim = broker_sqlite._claim

    def counting(*args: Any, **kwargs: Any) -> list[Delivery]:
        rows = claim(*args, **kwargs)
        taken.append(len(rows))
        return rows

    monkeypatch.setattr(broker_sqlite, "_claim", counting)
    return taken


@pytest.mark.parametrize("publish_from", ["another broker", "the consumer's broker"])
async def test_a_consumer_that_emptied_its_queue_waits_for_a_ring_not_a_claim(
    path: Path, publisher: SqliteBroker, claims: list[int], publish_from: str
) -> None:
    """Once a claim has taken every ready row, the next receive() does not claim again at
    once (an empty claim takes the queue file's write lock) and does not poll soon
    (this consumer's polls are a minute apart): the next publish wakes it, including one
    made between the two receive() calls, before it waits."""
    consumer_broker = await open_slow_poller(path)
    source = publisher if publish_from == "another broker" else consumer_broker
    try:
        await publisher.publish("q", b"first")
        async with consumer_broker.consume("q", prefetch=4) as consumer:
            assert (await consumer.receive()).body == b"first"
            assert claims == [1]
            await source.publish("q", b"meanwhile")
            with trio.fail_after(5):
                assert (await consumer.receive()).body == b"meanwhile"
            assert claims == [1, 1]
            async with trio.open_nursery() as nursery:
                got = await receive_from(consumer, nursery)
                await wait_until_idle(consumer_broker, "q")
                assert claims == [1, 1]
                await source.publish("q", b"later")
                with trio.fail_after(5):
                    assert (await got.receive()).body == b"later"
            assert claims == [1, 1, 1]
    finally:
        await consumer_broker.aclose()


async def test_a_consumer_that_took_a_full_batch_claims_again_at_once(
    path: Path, publisher: SqliteBroker, claims: list[int]
) -> None:
    """The control: a claim that filled the prefetch may have left rows behind, so once
    those deliveries are settled the consumer claims again without waiting for a ring."""
    consumer_broker = await open_slow_poller(path)
    try:
        for body in (b"1", b"2", b"3"):
            await publisher.publish("q", body)
        async with consumer_broker.consume("q", prefetch=2) as consumer:
            received = []
            with trio.fail_after(5):
                for _ in range(3):
                    delivery = await consumer.receive()
                    received.append(delivery.body)
                    await consumer.ack(delivery)
            assert received == [b"1", b"2", b"3"]
            assert claims == [2, 1]
    finally:
        await consumer_broker.aclose()


@pytest.mark.parametrize("doorbells", [True, False])
async def test_only_a_consumer_without_a_doorbell_polls_soon_after_a_delivery(
    path: Path, publisher: SqliteBroker, monkeypatch: pytest.MonkeyPatch, doorbells: bool
) -> None:
    """With a doorbell every publish rings, so the polls meant for a lost ring keep the idle
    pace (DOORBELL_POLL_MAX) from the start; without one, polls come quickly after traffic."""
    polls = 0
    has_ready = broker_sqlite._has_ready

    def counting(*args: Any, **kwargs: Any) -> bool:
        nonlocal polls
        polls += 1
        return has_ready(*args, **kwargs)

    monkeypatch.setattr(broker_sqlite, "_has_ready", counting)
    consumer_broker = await SqliteBroker.open(path, doorbells=doorbells)
    try:
        await publisher.publish("q", b"only")
        async with consumer_broker.consume("q", prefetch=4) as consumer:
            assert (await consumer.receive()).body == b"only"
            with trio.move_on_after(0.3):
                await consumer.receive()
        assert (polls == 0) == doorbells, polls
    finally:
        await consumer_broker.aclose()


async def receive_from(
    consumer: Consumer, nursery: trio.Nursery
) -> trio.MemoryReceiveChannel[Delivery]:
    got_send, got_recv = trio.open_memory_channel[Delivery](1)

    async def receive() -> None:
        await got_send.send(await consumer.receive())

    nursery.start_soon(receive)
    return got_recv


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@asynccontextmanager
async def consumer_process(path: Path, body: str) -> AsyncIterator[None]:
    """Run the statement `body` inside `async with broker.consume("q", prefetch=1) as
    consumer:` in another process; the block runs once it is done; then SIGKILL."""
    script = "\n".join(
        [
            "import trio",
            "from pathlib import Path",
            "from ipc.broker_sqlite import SqliteBroker",
            "async def main():",
            f"    broker = await SqliteBroker.open(Path({str(path)!r}))",
            '    async with broker.consume("q", prefetch=1) as consumer:',
            f"        {body}",
            '        print("ready", flush=True)',
            "        await trio.sleep_forever()",
            "trio.run(main)",
        ]
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", script], env=child_env(), stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        output = b""
        with trio.fail_after(30):
            while b"\n" not in output:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the consumer process exited early"
                output += chunk
        assert output.strip() == b"ready"
        yield
    finally:
        proc.kill()
        with trio.fail_after(10):
            await proc.wait()
        assert proc.stdout is not None
        await proc.stdout.aclose()


@pytest.mark.slow
async def test_a_killed_consumers_doorbell_does_not_fail_publishes(
    path: Path, publisher: SqliteBroker
) -> None:
    """A consumer killed with SIGKILL stays registered (until reclaimed) with no doorbell."""
    async with consumer_process(path, "pass"):
        pass
    for n in range(3):
        await publisher.publish("q", b"m%d" % n)
    async with publisher.consume("q", prefetch=3) as consumer:
        with trio.fail_after(5):
            bodies = [(await consumer.receive()).body for _ in range(3)]
    assert bodies == [b"m0", b"m1", b"m2"]


@pytest.mark.slow
async def test_rows_reclaimed_from_a_killed_consumer_ring_the_others(
    path: Path, publisher: SqliteBroker, nursery: trio.Nursery
) -> None:
    """Whoever finds the dead consumer (here: a consumer of another queue opening) rings the
    remaining consumers of its queue for the rows it released."""
    await publisher.publish("q", b"held")
    waiting = await open_slow_poller(path)
    try:
        async with consumer_process(path, "await consumer.receive()"):
            # Idle: "held" is claimed by the other process, which is alive.
            got = await receive_in_background(waiting, "q", nursery)
        async with publisher.consume("other", prefetch=1):
            with trio.fail_after(5):
                delivery = await got.receive()
        assert (delivery.body, delivery.redelivered) == (b"held", True)
    finally:
        await waiting.aclose()
