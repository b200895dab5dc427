"""One suite for both Broker backends (embedded SQLite queue, RabbitMQ) through open_broker:
ordering, ack/nack, prefetch, priorities, sharing between brokers, a consumer killed with
SIGKILL, cancellation and unreachable backends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from ipc.broker import MAX_PRIORITY, Broker, open_broker
from ipc.broker_embedded import DEFAULT_OWNER, owner_file, queue_owner
from ipc.errors import BrokerUnavailableError
from ipc.settings import SETTINGS_ENV

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from ipc.broker import Consumer, Delivery
    from ipc.names import Namespace
    from ipc.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    async with open_broker(settings) as opened:
        yield opened


@pytest.fixture
async def queue(broker: Broker, namespace: Namespace) -> AsyncIterator[Callable[[str], str]]:
    """Makes namespaced queue names and deletes those queues at teardown."""
    created: list[str] = []

    def make(name: str) -> str:
        created.append(namespace.queue(name))
        return created[-1]

    yield make
    for name in created:
        await broker.delete_queue(name)


async def receive(consumer: Consumer) -> Delivery:
    with trio.fail_after(10):
        return await consumer.receive()


async def wait_for_length(broker: Broker, queue: str, expected: int) -> None:
    with trio.fail_after(10):
        while True:
            if await broker.queue_length(queue) == expected:
                return
            await trio.sleep(0.01)


async def test_broker_publish_then_consume_in_order(
    broker: Broker, queue: Callable[[str], str]
) -> None:
    q = queue("order")
    await broker.declare_queue(q)
    bodies = [f"m{i}".encode() for i in range(5)]
    for body in bodies:
        await broker.publish(q, body)
    async with broker.consume(q, prefetch=10) as consumer:
        got = []
        for _ in bodies:
            delivery = await receive(consumer)
            got.append(delivery)
            await consumer.ack(delivery)
    assert [d.body for d in got] == bodies
    assert not any(d.redelivered for d in got)
    assert await broker.queue_length(q) == 0


async def test_broker_publish_before_any_consumer_is_not_lost(
    broker: Broker, queue: Callable[[str], str]
) -> None:
    q = queue("early")
    await broker.publish(q, b"early")
    async with broker.consume(q, prefetch=1) as consumer:
        assert (await receive(consumer)).body == b"early"


async def test_broker_ack_removes_the_message(broker: Broker, queue: Callable[[str], str]) -> None:
    q = queue("ack")
    await broker.publish(q, b"first")
    async with broker.consume(q, prefetch=1) as consumer:
        await consumer.ack(await receive(consumer))
    await broker.publish(q, b"second")
    async with broker.consume(q, prefetch=1) as consumer:
        assert (await receive(consumer)).body == b"second"


async def test_broker_ack_twice_is_harmless(broker: Broker, queue: Callable[[str], str]) -> None:
    q = queue("ack-twice")
    await broker.publish(q, b"a")
    await broker.publish(q, b"b")
    async with broker.consume(q, prefetch=1) as consumer:
        first = await receive(consumer)
        await consumer.ack(first)
        await consumer.ack(first)
        second = await receive(consumer)
        await consumer.ack(second)
    assert second.body == b"b"


async def test_broker_nack_requeue_redelivers(broker: Broker, queue: Callable[[str], str]) -> None:
    q = queue("nack")
    await broker.publish(q, b"again")
    async with broker.consume(q, prefetch=1) as consumer:
        first = await receive(consumer)
        await consumer.nack(first, requeue=True)
        second = await receive(consumer)
        await consumer.ack(second)
    assert (first.body, first.redelivered) == (b"again", False)
    assert (second.body, second.redelivered) == (b"again", True)


async def test_broker_nack_without_requeue_drops(
    broker: Broker, queue: Callable[[str], str]
) -> None:
    q = queue("drop")
    await broker.publish(q, b"bad")
    await broker.publish(q, b"good")
    async with broker.consume(q, prefetch=1) as consumer:
        await consumer.nack(await receive(consumer), requeue=False)
        good = await receive(consumer)
        await consumer.ack(good)
    assert good.body == b"good"
    assert await broker.queue_length(q) == 0


async def test_broker_leaving_consume_returns_unacked(
    broker: Broker, queue: Callable[[str], str]
) -> None:
    q = queue("unacked")
    await broker.publish(q, b"a")
    await broker.publish(q, b"b")
    async with broker.consume(q, prefetch=5) as consumer:
        assert [(await receive(consumer)).body for _ in range(2)] == [b"a", b"b"]
    await wait_for_length(broker, q, 2)
    async with broker.consume(q, prefetch=5) as consumer:
        again = [await receive(consumer) for _ in range(2)]
    assert [(d.body, d.redelivered) for d in again] == [(b"a", True), (b"b", True)]


@pytest.mark.slow
async def test_broker_prefetch_bounds_unacked(broker: Broker, queue: Callable[[str], str]) -> None:
    q = queue("prefetch")
    for i in range(5):
        await broker.publish(q, str(i).encode())
    async with broker.consume(q, prefetch=2) as consumer:
        held = [await receive(consumer) for _ in range(2)]
        assert await broker.queue_length(q) == 3
        with trio.move_on_after(0.3):
            await consumer.receive()
            pytest.fail("received more than prefetch unacked messages")
        await consumer.ack(held[0])
        third = await receive(consumer)
    assert third.body == b"2"


async def test_broker_priorities_higher_first(broker: Broker, queue: Callable[[str], str]) -> None:
    q = queue("priority")
    await broker.declare_queue(q, max_priority=MAX_PRIORITY)
    for body, priority in ((b"low", 1), (b"high", 5), (b"mid", 3), (b"low2", 1), (b"over", 9)):
        await broker.publish(q, body, priority=priority)
    async with broker.consume(q, prefetch=1) as consumer:
        got = []
        for _ in range(5):
            delivery = await receive(consumer)
            got.append(delivery.body)
            await consumer.ack(delivery)
    # Priorities above max_priority count as max_priority (RabbitMQ's rule); FIFO within one.
    assert got == [b"high", b"over", b"mid", b"low", b"low2"]


async def test_broker_priority_ignored_without_max_priority(
    broker: Broker, queue: Callable[[str], str]
) -> None:
    q = queue("fifo")
    await broker.publish(q, b"first", priority=1)
    await broker.publish(q, b"second", priority=5)
    async with broker.consume(q, prefetch=2) as consumer:
        assert [(await receive(consumer)).body for _ in range(2)] == [b"first", b"second"]


async def test_broker_redeclare_with_other_arguments_keeps_the_first(
    broker: Broker, settings: Settings, queue: Callable[[str], str]
) -> None:
    """Another gateway declaring the queue differently neither fails nor breaks either broker."""
    q = queue("redeclare")
    await broker.declare_queue(q, max_priority=MAX_PRIORITY)
    async with open_broker(settings) as other:
        await other.declare_queue(q)
        await other.publish(q, b"low", priority=1)
    await broker.declare_queue(q, max_priority=2)
    await broker.publish(q, b"high", priority=5)
    async with broker.consume(q, prefetch=1) as consumer:
        assert (await receive(consumer)).body == b"high"


async def test_broker_queue_length_counts_waiting(
    broker: Broker, queue: Callable[[str], str]
) -> None:
    q = queue("length")
    assert await broker.queue_length(q) == 0
    for _ in range(3):
        await broker.publish(q, b"x")
    assert await broker.queue_length(q) == 3
    async with broker.consume(q, prefetch=1) as consumer:
        await receive(consumer)
        assert await broker.queue_length(q) == 2


async def test_broker_delete_queue(broker: Broker, queue: Callable[[str], str]) -> None:
    q = queue("delete")
    await broker.delete_queue(q)
    await broker.publish(q, b"gone")
    await broker.delete_queue(q)
    assert await broker.queue_length(q) == 0
    await broker.publish(q, b"kept")
    async with broker.consume(q, prefetch=1) as consumer:
        assert (await receive(consumer)).body == b"kept"


async def test_broker_two_brokers_share_a_queue(
    broker: Broker, settings: Settings, queue: Callable[[str], str]
) -> None:
    q = queue("shared")
    async with open_broker(settings) as other, other.consume(q, prefetch=1) as consumer:
        await broker.publish(q, b"across")
        delivery = await receive(consumer)
        await consumer.ack(delivery)
    assert delivery.body == b"across"
    assert await broker.queue_length(q) == 0


async def test_broker_publish_after_another_broker_deleted_the_queue(
    broker: Broker, settings: Settings, queue: Callable[[str], str]
) -> None:
    q = queue("stale")
    await broker.publish(q, b"one")
    async with open_broker(settings) as other:
        await other.delete_queue(q)
    await broker.publish(q, b"two")
    assert await broker.queue_length(q) == 1


async def test_broker_cancelled_calls_leave_it_usable(
    broker: Broker, queue: Callable[[str], str]
) -> None:
    q = queue("cancel")
    await broker.declare_queue(q)
    for delay in (0, 0.0001, 0.0005, 0.001, 0.002, 0.005):
        with trio.move_on_after(delay):
            await broker.queue_length(q)
        with trio.move_on_after(delay):
            await broker.declare_queue(q)
        with trio.move_on_after(delay):
            await broker.publish(q, b"maybe")
        with trio.move_on_after(delay):
            async with broker.consume(q, prefetch=10):
                await trio.sleep_forever()
    await broker.publish(q, b"marker")
    await broker.ping()
    # A consumer whose opening was cancelled must not hold messages: the marker arrives.
    async with broker.consume(q, prefetch=10) as consumer:
        # A cancelled publish may still have arrived; the marker must, last.
        while (delivery := await receive(consumer)).body != b"marker":
            assert delivery.body == b"maybe"
            await consumer.ack(delivery)
        await consumer.ack(delivery)


CHILD = textwrap.dedent(
    """
    import sys

    import trio

    from ipc.broker import open_broker
    from ipc.settings import Settings


    async def main(queue: str, count: int) -> None:
        async with open_broker(Settings.from_env()) as broker:
            async with broker.consume(queue, prefetch=count) as consumer:
                for _ in range(count):
                    await consumer.receive()
                print("ready", flush=True)
                await trio.sleep_forever()


    trio.run(main, sys.argv[1], int(sys.argv[2]))
    """
)


@pytest.mark.slow
async def test_broker_consumer_killed_holding_messages_redelivers(
    broker: Broker, settings: Settings, queue: Callable[[str], str], tmp_path: Path
) -> None:
    q = queue("killed")
    bodies = [b"k0", b"k1", b"k2"]
    for body in bodies:
        await broker.publish(q, body)
    script = tmp_path / "consumer.py"
    script.write_text(CHILD)
    env = {**os.environ, SETTINGS_ENV: settings.to_env(), "PYTHONPATH": str(REPO)}
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script), q, str(len(bodies))], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        output = b""
        with trio.fail_after(30):
            while b"ready" not in output:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"child exited early: {output!r}"
                output += chunk
        assert await broker.queue_length(q) == 0
        proc.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            assert await proc.wait() == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(5, shield=True):
                await proc.wait()
    async with broker.consume(q, prefetch=len(bodies)) as consumer:
        again = [await receive(consumer) for _ in bodies]
        for delivery in again:
            await consumer.ack(delivery)
    assert [(d.body, d.redelivered) for d in again] == [(b, True) for b in bodies]


def _unreachable(settings: Settings, tmp_path: Path, sock: socket.socket) -> Settings:
    if settings.amqp is not None:
        # A bound socket that never listens: connecting is refused, and no one can take the port.
        amqp = settings.amqp.model_copy(update={"port": sock.getsockname()[1]})
        return settings.model_copy(update={"amqp": amqp})
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return settings.model_copy(update={"data_dir": blocker})


async def test_broker_unavailable_when_backend_unreachable(
    settings: Settings, tmp_path: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        bad = _unreachable(settings, tmp_path, sock)
        with pytest.raises(BrokerUnavailableError):
            async with open_broker(bad):
                pass


@pytest.mark.parametrize("kind", ["directory", "not a database"])
async def test_sqlite_broker_unavailable_on_unusable_file(
    embedded_settings: Settings, kind: str
) -> None:
    path = owner_file(embedded_settings.data_dir / "queues", DEFAULT_OWNER)
    if kind == "directory":
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"this is not an SQLite database, just some bytes " * 100)
    with pytest.raises(BrokerUnavailableError):
        async with open_broker(embedded_settings):
            pass


class CuttableProxy:
    """A TCP relay to RabbitMQ the test can cut or stop: real socket faults."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._scopes: set[trio.CancelScope] = set()
        self._serving = trio.CancelScope()
        self._stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        try:
            with self._serving:
                task_status.started(listeners[0].socket.getsockname()[1])
                await trio.serve_listeners(self._relay, listeners)
        finally:
            for listener in listeners:
                await listener.aclose()
            self._stopped.set()

    async def stop(self) -> None:
        """Cut every connection and refuse new ones."""
        self._serving.cancel()
        await self._stopped.wait()

    def cut(self) -> None:
        for scope in self._scopes:
            scope.cancel()

    async def _relay(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            async with (
                client,
                await trio.open_tcp_stream(*self._target) as upstream,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(self._pump, client, upstream, scope)
                nursery.start_soon(self._pump, upstream, client, scope)
        self._scopes.discard(scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def test_amqp_connection_loss_fails_consumer_then_publish_reconnects(
    redis_settings: Settings, namespace: Namespace, nursery: trio.Nursery
) -> None:
    assert redis_settings.amqp is not None
    proxy = CuttableProxy(redis_settings.amqp.hostname, redis_settings.amqp.port)
    port = await nursery.start(proxy.run)
    amqp = redis_settings.amqp.model_copy(update={"port": port})
    q = namespace.queue("loss")
    async with open_broker(redis_settings.model_copy(update={"amqp": amqp})) as broker:
        try:
            await broker.publish(q, b"one")
            async with broker.consume(q, prefetch=1) as consumer:
                assert (await receive(consumer)).body == b"one"
                proxy.cut()
                with trio.fail_after(10), pytest.raises(BrokerUnavailableError):
                    await consumer.receive()
            await broker.publish(q, b"two")
            async with broker.consume(q, prefetch=2) as consumer:
                again = [await receive(consumer) for _ in range(2)]
            # "one" went back to the queue when the connection dropped, unacked.
            assert [(d.body, d.redelivered) for d in again] == [(b"one", True), (b"two", False)]
        finally:
            await broker.delete_queue(q)


async def test_amqp_unavailable_once_the_broker_is_gone(
    redis_settings: Settings, namespace: Namespace, nursery: trio.Nursery
) -> None:
    assert redis_settings.amqp is not None
    proxy = CuttableProxy(redis_settings.amqp.hostname, redis_settings.amqp.port)
    port = await nursery.start(proxy.run)
    amqp = redis_settings.amqp.model_copy(update={"port": port})
    q = namespace.queue("gone")
    try:
        async with open_broker(redis_settings.model_copy(update={"amqp": amqp})) as broker:
            await broker.publish(q, b"before")
            await proxy.stop()
            with trio.fail_after(10):
                with pytest.raises(BrokerUnavailableError):
                    await broker.publish(q, b"after")
                with pytest.raises(BrokerUnavailableError):
                    await broker.queue_length(q)
                with pytest.raises(BrokerUnavailableError):
                    await broker.ping()
    finally:
        async with open_broker(redis_settings) as direct:
            length = await direct.queue_length(q)
            await direct.delete_queue(q)
    assert length == 1


@pytest.mark.slow
async def test_sqlite_consumer_holding_messages_quietly_is_not_presumed_dead(
    broker: Broker,
    settings: Settings,
    queue: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumer that holds a delivery and calls nothing for longer than STALE_AFTER (a
    webhook forwarder through a long outage) keeps it: its heartbeat runs by itself."""
    if settings.amqp is not None:
        pytest.skip("heartbeats are the embedded queue's; RabbitMQ tracks its connections")

    from ipc import broker_sqlite

    monkeypatch.setattr(broker_sqlite, "HEARTBEAT_INTERVAL", 0.1)
    monkeypatch.setattr(broker_sqlite, "STALE_AFTER", 0.5)
    q = queue("quiet")
    await broker.publish(q, b"held")
    async with broker.consume(q, prefetch=1) as holder:
        held = await receive(holder)
        # Another process's consumer polls (and reclaims stale consumers' rows) meanwhile.
        async with open_broker(settings) as other, other.consume(q, prefetch=1) as poller:
            with trio.move_on_after(2.0) as waited:
                await poller.receive()
            assert waited.cancelled_caught, "the held message was released to another consumer"
        await holder.ack(held)
    assert await broker.queue_length(q) == 0


async def test_sqlite_durable_publish_syncs_the_log_outside_the_write_lock(
    embedded_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish is synced to disk before it returns, but after COMMIT: meanwhile another
    process (here, another connection) can take the write lock, which a sync inside the lock
    (synchronous=FULL) kept from every other publisher for milliseconds."""
    import sqlite3

    path = owner_file(embedded_settings.data_dir / "queues", queue_owner("durable"))
    synced: list[tuple[bool, bool]] = []
    real_sync = os.fdatasync

    def spying_sync(fd: int) -> None:
        is_wal = os.path.samefile(f"/proc/self/fd/{fd}", f"{path}-wal")
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            lock_free = True
        except sqlite3.OperationalError:
            lock_free = False
        finally:
            other.close()
        synced.append((is_wal, lock_free))
        real_sync(fd)

    # The broker calls os.fdatasync (the module object is shared, so this patch reaches it).
    monkeypatch.setattr(os, "fdatasync", spying_sync)
    async with open_broker(embedded_settings) as broker:
        await broker.publish("durable", b"body")
        assert synced == [(True, True)]
        async with broker.consume("durable", prefetch=1) as consumer:
            registered = len(synced)
            await consumer.ack(await receive(consumer))
            # Claims and acks need no sync (losing one to a power cut means a redelivery).
            assert len(synced) == registered


async def test_sqlite_write_behind_another_writer_retries_in_short_steps(
    embedded_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish finding the write lock taken by another process tries again after
    BUSY_RETRY_MIN, doubling up to BUSY_RETRY_MAX, and gets through once it is free; SQLite's
    own busy handler slept up to 100 ms between tries."""
    from ipc import sqlite_inline
    from tests.ipc.sqlite_locks import lock_held_for_tries

    async with open_broker(embedded_settings) as broker:
        await broker.declare_queue("contended")
        path = owner_file(embedded_settings.data_dir / "queues", queue_owner("contended"))
        with lock_held_for_tries(path, 8, monkeypatch) as delays, trio.fail_after(10):
            await broker.publish("contended", b"after the wait")
        assert len(delays) == 8
        assert delays[0] == sqlite_inline.BUSY_RETRY_MIN
        assert max(delays) == sqlite_inline.BUSY_RETRY_MAX
        assert await broker.queue_length("contended") == 1
