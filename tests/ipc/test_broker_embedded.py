"""The embedded broker's layout: one queue file per queue owner (what one owner's writes lock,
no other owner waits for), safe file names, the write linger reaching files opened later,
and the move of the single-file layout's queues into the owners' files. The queue semantics
themselves are tests/ipc/test_broker.py's, on both backends."""

from __future__ import annotations

import os
import sqlite3
from typing import TYPE_CHECKING, Any

import pytest
import trio

from ipc import broker_sqlite
from ipc.broker import MAX_PRIORITY, open_broker
from ipc.broker_embedded import DEFAULT_OWNER, EmbeddedBroker, owner_file, queue_owner
from ipc.broker_sqlite import SqliteBroker
from ipc.errors import BrokerUnavailableError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.broker import Broker
    from ipc.settings import Settings


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "queues"


@pytest.fixture
async def broker(directory: Path) -> AsyncIterator[EmbeddedBroker]:
    opened = await EmbeddedBroker.open(directory)
    try:
        yield opened
    finally:
        await opened.aclose()


async def drain(broker: Broker, queue: str) -> list[bytes]:
    """Every ready message of `queue`, in delivery order (acked)."""
    expected = await broker.queue_length(queue)
    got: list[bytes] = []
    async with broker.consume(queue, prefetch=100) as consumer:
        with trio.fail_after(10):
            for _ in range(expected):
                delivery = await consumer.receive()
                got.append(delivery.body)
                await consumer.ack(delivery)
    return got


@pytest.mark.parametrize(
    ("queue", "owner"),
    [
        ("4f1c.outbound", "4f1c"),
        ("ns-1.4f1c.inbound", "ns-1.4f1c"),
        ("4f1c.dead", "4f1c"),
        ("plain", DEFAULT_OWNER),
        (".event", DEFAULT_OWNER),
    ],
)
def test_queue_owner(queue: str, owner: str) -> None:
    assert queue_owner(queue) == owner


@pytest.mark.parametrize("owner", ["../up", "a/b", "", ".hidden", "x" * 200, "é"])
def test_an_owner_unfit_for_a_file_name_is_hashed_inside_the_directory(
    directory: Path, owner: str
) -> None:
    path = owner_file(directory, owner)
    assert path.parent == directory
    assert path.name.startswith("h-")
    assert path.suffix == ".sqlite3"


async def test_each_owners_queues_share_one_file_apart_from_other_owners(
    broker: EmbeddedBroker, directory: Path
) -> None:
    for queue in ("a1.outbound", "a1.inbound", "b2.outbound"):
        await broker.publish(queue, queue.encode())

    def queues_in(owner: str) -> set[str]:
        conn = sqlite3.connect(owner_file(directory, owner))
        try:
            return {row[0] for row in conn.execute("SELECT DISTINCT queue FROM messages")}
        finally:
            conn.close()

    assert queues_in("a1") == {"a1.outbound", "a1.inbound"}
    assert queues_in("b2") == {"b2.outbound"}
    assert broker.path_for("b2.event") == owner_file(directory, "b2")


async def test_one_owners_write_lock_holds_up_no_other_owner(
    broker: EmbeddedBroker, directory: Path
) -> None:
    """What scenario 7 needs: a channel's writes (here a lock held by another connection)
    keep its own publishes waiting, never another channel's."""
    await broker.declare_queue("busy.outbound")
    await broker.declare_queue("calm.outbound")
    holder = sqlite3.connect(owner_file(directory, "busy"), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with trio.fail_after(2):
            await broker.publish("calm.outbound", b"not held up")
        published = trio.Event()

        async def publish_busy() -> None:
            await broker.publish("busy.outbound", b"waits for the lock")
            published.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_busy)
            await trio.sleep(0.3)
            assert not published.is_set()
            holder.execute("ROLLBACK")
            with trio.fail_after(5):
                await published.wait()
    finally:
        holder.close()
    assert await broker.queue_length("busy.outbound") == 1
    assert await broker.queue_length("calm.outbound") == 1


async def test_the_write_linger_reaches_files_opened_after_it_was_set(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    execute = broker_sqlite._execute

    def counted(conn: Any, batch: list[Any]) -> None:
        sizes.append(len(batch))
        execute(conn, batch)

    broker.set_write_linger(0.2)
    await broker.declare_queue("later.outbound")
    monkeypatch.setattr(broker_sqlite, "_execute", counted)
    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(broker.publish, "later.outbound", f"m{n}".encode())
    assert sizes == [4]


async def test_deleting_an_owners_last_queue_removes_its_file(
    broker: EmbeddedBroker, directory: Path
) -> None:
    for queue in ("gone.outbound", "gone.inbound", "kept.outbound"):
        await broker.publish(queue, b"x")
    await broker.delete_queue("gone.outbound")
    assert broker.path_for("gone.inbound").exists()
    await broker.delete_queue("gone.inbound")
    assert not broker.path_for("gone.inbound").exists()
    assert [name for name in os.listdir(directory) if name.startswith("gone")] == []
    assert await broker.queue_length("kept.outbound") == 1
    # The owner can be used again: its file is made anew.
    await broker.publish("gone.outbound", b"again")
    assert await broker.queue_length("gone.outbound") == 1


def deleted_files_open(directory: Path) -> list[str]:
    """Files of `directory` this process holds open although they were deleted."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target.startswith(str(directory)) and target.endswith(" (deleted)"):
            held.append(target)
    return held


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_another_process_closes_an_owners_file_once_it_was_deleted(
    broker: EmbeddedBroker, directory: Path
) -> None:
    """Two brokers on one directory stand for two API workers: when one deletes a
    channel's queues (and so its file), the other lets go of the file as it next opens an
    owner's file, and uses the owner's new file if it comes back."""
    other = await EmbeddedBroker.open(directory)
    other.sweep_interval = 0
    try:
        for queue in ("gone.outbound", "gone.inbound"):
            await other.publish(queue, b"x")
        for queue in ("gone.outbound", "gone.inbound"):
            await broker.delete_queue(queue)
        assert not broker.path_for("gone.inbound").exists()
        assert deleted_files_open(directory) != []  # `other` still holds them
        await other.publish("new.outbound", b"y")
        assert deleted_files_open(directory) == []
        # The owner's later messages go to its new file, where every process looks.
        await other.publish("gone.outbound", b"again")
        assert await broker.queue_length("gone.outbound") == 1
        assert await broker.queue_length("new.outbound") == 1
    finally:
        await other.aclose()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_deleted_files_are_looked_for_at_most_once_per_sweep_interval(
    broker: EmbeddedBroker, directory: Path
) -> None:
    """The control: within the interval, opening another owner's file leaves the rest as
    they are (no stat of every open file at each open)."""
    other = await EmbeddedBroker.open(directory)
    other.sweep_interval = 3600
    try:
        await other.publish("first.outbound", b"x")  # the first open looks (nothing to find)
        await other.publish("gone.outbound", b"x")
        await broker.delete_queue("gone.outbound")
        await other.publish("new.outbound", b"y")
        assert deleted_files_open(directory) != []
    finally:
        await other.aclose()


async def test_closed_broker_refuses_a_new_owner_and_a_ping(directory: Path) -> None:
    broker = await EmbeddedBroker.open(directory)
    await broker.aclose()
    with pytest.raises(BrokerUnavailableError):
        await broker.publish("new.outbound", b"x")
    with pytest.raises(BrokerUnavailableError):
        await broker.ping()


# --- the single-file layout ----------------------------------------------------------------


async def write_legacy(path: Path) -> None:
    """A queue file as the single-file layout left it: two owners, priorities, one message
    delivered before (claimed by a consumer that is gone)."""
    legacy = await SqliteBroker.open(path)
    try:
        await legacy.declare_queue("o1.outbound", max_priority=MAX_PRIORITY)
        for body, priority in ((b"o1-low-1", 1), (b"o1-high", 5), (b"o1-low-2", 1)):
            await legacy.publish("o1.outbound", body, priority=priority)
        for n in range(3):
            await legacy.publish("o2.inbound", f"o2-{n}".encode())
    finally:
        await legacy.aclose()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(
            "UPDATE messages SET consumer = 999, deliveries = 1 WHERE body = ?", (b"o2-0",)
        )
    finally:
        conn.close()


async def test_the_single_file_layout_is_moved_into_the_owners_files(
    embedded_settings: Settings,
) -> None:
    legacy = embedded_settings.data_dir / "queues.sqlite3"
    await write_legacy(legacy)
    async with open_broker(embedded_settings) as broker:
        assert not legacy.exists()
        assert not legacy.with_name("queues.sqlite3-wal").exists()
        assert await drain(broker, "o1.outbound") == [b"o1-high", b"o1-low-1", b"o1-low-2"]
        async with broker.consume("o2.inbound", prefetch=10) as consumer:
            with trio.fail_after(10):
                first = await consumer.receive()
        assert (first.body, first.redelivered) == (b"o2-0", True)
        assert await drain(broker, "o2.inbound") == [b"o2-0", b"o2-1", b"o2-2"]
        # The priorities the queue was declared with came along.
        await broker.publish("o1.outbound", b"low", priority=1)
        await broker.publish("o1.outbound", b"high", priority=4)
        assert await drain(broker, "o1.outbound") == [b"high", b"low"]
    async with open_broker(embedded_settings) as broker:
        assert await broker.queue_length("o1.outbound") == 0
        assert await broker.queue_length("o2.inbound") == 0


async def test_processes_opening_together_move_the_single_file_once(
    embedded_settings: Settings,
) -> None:
    legacy = embedded_settings.data_dir / "queues.sqlite3"
    await write_legacy(legacy)
    directory = embedded_settings.data_dir / "queues"
    opened: list[EmbeddedBroker] = []

    async def open_one() -> None:
        opened.append(await EmbeddedBroker.open(directory, legacy=legacy))

    async with trio.open_nursery() as nursery:
        # Eight at once also create the directory's first file together, which must not
        # answer "database is locked" to any of them.
        for _ in range(8):
            nursery.start_soon(open_one)
    try:
        assert await opened[0].queue_length("o1.outbound") == 3
        assert await opened[1].queue_length("o2.inbound") == 3
    finally:
        for broker in opened:
            await broker.aclose()


async def test_an_unreadable_single_file_is_a_clear_error_and_is_kept(
    embedded_settings: Settings,
) -> None:
    legacy = embedded_settings.data_dir / "queues.sqlite3"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"not a database " * 100)
    with pytest.raises(BrokerUnavailableError, match="cannot move the queues"):
        async with open_broker(embedded_settings):
            pass
    assert legacy.exists()
