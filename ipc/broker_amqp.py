"""The RabbitMQ Broker: the only module importing aiormq (and asyncio).

aiormq runs on its own asyncio loop in a daemon thread (faster than trio-asyncio); trio tasks
submit coroutines to it and wait without blocking trio. Every library error becomes
BrokerUnavailableError in `_unavailable`, and so does an operation RabbitMQ does not finish
within `operation_timeout` (aiormq has no deadlines of its own: a stalled peer, or a broker
blocking publishers under a resource alarm, would otherwise hang the caller).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import quote

import aiormq
import trio
from aiormq.exceptions import (
    AMQPError,
    AuthenticationError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    IncompatibleProtocolError,
    ProbableAuthenticationError,
)
from pamqp.commands import Basic
from pamqp.exceptions import PAMQPException

from ipc.broker import Broker, Consumer, Delivery
from ipc.errors import BrokerUnavailableError, ConsumerLostError
from ipc.names import EXCHANGE
from ipc.ride_through import OutageListener, RideThrough

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine

    from aiormq.abc import (
        AbstractChannel,
        AbstractConnection,
        ArgumentsType,
        DeliveredMessage,
    )

    from ipc.settings import AmqpSettings

T = TypeVar("T")

log = logging.getLogger(__name__)

#: What aiormq raises when the broker, the connection or a channel fails.
_FAILURES: Final = (AMQPError, PAMQPException, ChannelInvalidStateError, OSError)
_PUBLISH: Final = "publish"
_ADMIN: Final = "admin"
#: Passive declares (does it exist, how long is it) get a channel of their own.
_PASSIVE: Final = "passive"
#: Seconds one broker operation (connecting and retrying included) may take.
OPERATION_TIMEOUT: Final = 10.0


#: Connection failures that waiting will not fix (credentials, protocol).
_REFUSED_FOR_GOOD: Final = (
    AuthenticationError,
    ProbableAuthenticationError,
    IncompatibleProtocolError,
)


def _unavailable(exc: BaseException) -> BrokerUnavailableError:
    """The one translation of aiormq/pamqp/socket errors into ours; `unreachable` when the
    connection was refused or dropped (RabbitMQ restarting), which a moment may fix."""
    if isinstance(exc, asyncio.CancelledError):
        return BrokerUnavailableError(
            "AMQP operation aborted: its channel or connection closed", unreachable=True
        )
    unreachable = isinstance(exc, OSError | ChannelInvalidStateError) and not isinstance(
        exc, _REFUSED_FOR_GOOD
    )
    return BrokerUnavailableError(f"RabbitMQ unavailable: {exc!r}", unreachable=unreachable)


def _url(settings: AmqpSettings) -> str:
    user = quote(settings.username, safe="")
    password = quote(settings.password.get_secret_value(), safe="")
    host = f"[{settings.hostname}]" if ":" in settings.hostname else settings.hostname
    vhost = "" if settings.vhost == "/" else quote(settings.vhost, safe="")
    return f"amqp://{user}:{password}@{host}:{settings.port}/{vhost}?heartbeat={settings.heartbeat}"


def _cancelled_by_caller() -> bool:
    """Tell our own cancellation from aiormq cancelling futures of a closing channel."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


# --- the asyncio side (runs on the loop thread only) ------------------------------------------


class _Core:
    """Connection, shared channels and the declared-queue cache; touched only on the loop."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: AbstractConnection | None = None
        self._channels: dict[str, AbstractChannel] = {}
        #: queue -> max_priority it was declared with on this connection.
        self._declared: dict[str, int] = {}
        #: queue -> max_priority asked for, kept across reconnects: a publish or consumer that
        #: re-declares a queue after one must ask for what the queue was made with, or it
        #: fails the precondition (and would make a lost queue without its priorities).
        self._wanted: dict[str, int] = {}
        self._setup = asyncio.Lock()
        self._passive = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def _connection(self) -> AbstractConnection:
        async with self._setup:
            if self._conn is None or self._conn.is_closed:
                self._channels.clear()
                self._declared.clear()
                conn = await aiormq.connect(self._url)
                try:
                    channel = await conn.channel(publisher_confirms=False)
                    await channel.exchange_declare(EXCHANGE, exchange_type="direct", durable=True)
                except BaseException:
                    await conn.close()
                    raise
                self._conn = conn
                self._channels[_ADMIN] = channel
            return self._conn

    async def _channel(self, kind: str) -> AbstractChannel:
        conn = await self._connection()
        async with self._setup:
            channel = self._channels.get(kind)
            if channel is None or channel.is_closed:
                if conn.is_closed:
                    raise aiormq.AMQPConnectionError("connection closed")
                channel = await conn.channel(publisher_confirms=kind == _PUBLISH)
                self._channels[kind] = channel
            return channel

    def _discard(self, channel: AbstractChannel) -> None:
        """Forget a channel that failed; the next call opens a fresh one."""
        for kind, known in list(self._channels.items()):
            if known is channel:
                del self._channels[kind]
        if not channel.is_closed:
            self.spawn(channel.close())

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("closing a discarded AMQP channel failed: %r", task.exception())

    @asynccontextmanager
    async def _using(self, kind: str) -> AsyncIterator[AbstractChannel]:
        channel = await self._channel(kind)
        try:
            yield channel
        except asyncio.CancelledError:
            # aiormq closes a channel whose RPC was cancelled; a cancelled publish leaves
            # its channel usable (and a stale one is caught by the retry below).
            if kind != _PUBLISH or not _cancelled_by_caller():
                self._discard(channel)
            raise
        except DeliveryError:
            raise  # nack or return: the channel is fine
        except _FAILURES:
            self._discard(channel)
            raise

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run `op`; if its channel or connection failed, once more on fresh ones."""
        try:
            return await op()
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
        except _FAILURES as exc:
            log.debug("AMQP call failed, retrying once: %r", exc)
        return await op()

    # --- operations -----------------------------------------------------------------------

    async def connect(self) -> None:
        await self._connection()

    async def declare(self, queue: str, max_priority: int, *, if_new: bool) -> None:
        if if_new:
            max_priority = self._wanted.get(queue, max_priority)
        else:
            self._wanted[queue] = max_priority
        known = self._declared.get(queue)
        if known is not None and (if_new or known == max_priority):
            return
        await self._retrying(lambda: self._declare(queue, max_priority))

    async def _declare(self, queue: str, max_priority: int) -> None:
        arguments: ArgumentsType | None = (
            {"x-max-priority": max_priority} if max_priority > 0 else None
        )
        try:
            async with self._using(_ADMIN) as channel:
                await channel.queue_declare(queue, durable=True, arguments=arguments)
        except ChannelPreconditionFailed:
            # Declared earlier with other arguments (another gateway, a vumi worker):
            # use it as it is rather than fail.
            log.warning("queue %s exists with other arguments; using it as declared", queue)
            # (Gone again meanwhile: the bind below fails, and the caller's retry declares it.)
            await self._passive_declare(queue)
        async with self._using(_ADMIN) as channel:
            await channel.queue_bind(queue, EXCHANGE, routing_key=queue)
        self._declared[queue] = max_priority

    async def publish(self, queue: str, body: bytes, priority: int) -> None:
        async def once() -> None:
            if queue not in self._declared:
                await self._declare(queue, self._wanted.get(queue, 0))
            properties = Basic.Properties(delivery_mode=2, priority=priority)
            try:
                async with self._using(_PUBLISH) as channel:
                    await channel.basic_publish(
                        body,
                        exchange=EXCHANGE,
                        routing_key=queue,
                        properties=properties,
                        # Unroutable means the queue was deleted since we declared it:
                        # RabbitMQ returns it and the retry declares it again.
                        mandatory=True,
                    )
            except DeliveryError:
                self._declared.pop(queue, None)
                raise

        await self._retrying(once)

    async def open_consumer(
        self,
        queue: str,
        prefetch: int,
        on_message: Callable[[DeliveredMessage], None],
        on_closed: Callable[[str, bool], None],
    ) -> AbstractChannel:
        await self.declare(queue, 0, if_new=True)

        async def callback(message: DeliveredMessage) -> None:
            on_message(message)

        async def once() -> AbstractChannel:
            conn = await self._connection()
            channel = await conn.channel(publisher_confirms=False)
            try:
                await channel.basic_qos(prefetch_count=prefetch)
                # Cancelled (the queue was deleted): not lost to an outage, so not re-opened.
                channel.on_consumer_cancel_callbacks.add(
                    lambda _frame: on_closed(f"RabbitMQ cancelled the consumer of {queue}", False)
                )
                await channel.basic_consume(queue, callback, no_ack=False)
            except BaseException:
                self.spawn(channel.close())
                raise
            channel.closing.add_done_callback(
                lambda closing: on_closed(f"AMQP channel closed: {_reason(closing)}", True)
            )
            return channel

        return await self._retrying(once)

    async def close_consumer(self, channel: AbstractChannel) -> None:
        # Closing the channel cancels its consumer and requeues its unacked deliveries.
        await channel.close()

    async def settle(self, channel: AbstractChannel, tag: int, *, ack: bool, requeue: bool) -> None:
        if ack:
            await channel.basic_ack(tag)
        else:
            await channel.basic_nack(tag, requeue=requeue)

    async def _passive_declare(self, queue: str) -> int | None:
        """The queue's message count; None when it does not exist.

        One at a time, on a channel of their own: RabbitMQ closes the channel of a passive
        declare that fails (NOT_FOUND), which would fail every other operation in flight
        on it (the declares of a channel process starting up, say).
        """
        async with self._passive:
            try:
                async with self._using(_PASSIVE) as channel:
                    declared = await channel.queue_declare(queue, passive=True)
            except ChannelNotFoundEntity:
                return None
        return declared.message_count or 0

    async def queue_length(self, queue: str) -> int:
        async def once() -> int:
            return await self._passive_declare(queue) or 0

        return await self._retrying(once)

    async def delete_queue(self, queue: str) -> None:
        async def once() -> None:
            self._declared.pop(queue, None)
            self._wanted.pop(queue, None)
            with suppress(ChannelNotFoundEntity):
                async with self._using(_ADMIN) as channel:
                    await channel.queue_delete(queue)

        await self._retrying(once)

    async def ping(self) -> None:
        async def once() -> None:
            async with self._using(_ADMIN) as channel:
                await channel.exchange_declare(EXCHANGE, exchange_type="direct", passive=True)

        await self._retrying(once)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._conn is not None:
            await self._conn.close()


def _reason(closing: asyncio.Future[Any]) -> str:
    if closing.cancelled() or closing.exception() is None:
        return "closed"
    return repr(closing.exception())


class _LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="junebug-amqp", daemon=True)
        self._stopped = False
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.loop.call_soon_threadsafe(self.loop.stop)
        await trio.to_thread.run_sync(self._thread.join)


# --- the trio side ---------------------------------------------------------------------------


class AmqpBroker(Broker):
    def __init__(
        self,
        runner: _LoopThread,
        core: _Core,
        token: trio.lowlevel.TrioToken,
        *,
        operation_timeout: float = OPERATION_TIMEOUT,
        ride_through: RideThrough | None = None,
    ) -> None:
        self._runner = runner
        self._core = core
        self._token = token
        self._closed = False
        self.operation_timeout = operation_timeout
        self._ride = ride_through or RideThrough(0.0, "RabbitMQ")

    @classmethod
    async def connect(
        cls,
        settings: AmqpSettings,
        *,
        operation_timeout: float = OPERATION_TIMEOUT,
        ride_through: float = 0.0,
        on_outage: OutageListener | None = None,
    ) -> AmqpBroker:
        """Connect (not retried, whatever `ride_through`: a channel process that cannot
        reach RabbitMQ at start exits, to be restarted with backoff).

        With `ride_through` (channel processes), publishes and declares that find RabbitMQ
        refusing or dropping connections are tried again for that many seconds, and a
        consumer whose connection dropped raises ConsumerLostError so that its owner opens
        a new one (see ipc/ride_through.py); lengths, deletes and ping() fail at once.
        `on_outage` hears when calls start riding out an outage and when it is over.
        """
        runner = _LoopThread()
        where = f"amqp://{settings.hostname}:{settings.port}"
        broker = cls(
            runner,
            _Core(_url(settings)),
            trio.lowlevel.current_trio_token(),
            operation_timeout=operation_timeout,
            ride_through=RideThrough(ride_through, where, on_outage=on_outage),
        )
        try:
            await broker._call(broker._core.connect())
        except BaseException:
            await broker.aclose()
            raise
        return broker

    async def _call(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        undo: Callable[[T], Coroutine[Any, Any, None]] | None = None,
    ) -> T:
        """Run `coro` as a task on the loop thread and wait for it without blocking trio.

        Cancellation by the caller leaves the asyncio task running: aiormq answers a
        cancelled RPC by closing its channel, and that close races the broker's own closes
        (a failed passive declare) and the reuse of the channel number, which RabbitMQ
        punishes by dropping the whole connection ("second 'channel.open' seen", "expected
        'channel.open'") and every consumer on it. So a cancelled publish still arrives.
        Running past `operation_timeout` does cancel the task (the broker is not answering;
        waiting on would pile tasks up), then raises BrokerUnavailableError. Either way, if
        the task completes after trio gave up, `undo(result)` runs on the loop so that
        nothing is left without an owner. Both decisions are made on the loop thread, so a
        task finishing just as trio gives up cannot slip between them.
        """
        if self._closed:
            coro.close()
            raise BrokerUnavailableError("the AMQP broker is closed")
        loop = self._runner.loop
        token = self._token
        done = trio.Event()
        started: list[asyncio.Task[T]] = []
        abandoned = False

        def undo_if_completed(task: asyncio.Task[T]) -> None:
            if undo is not None and not task.cancelled() and task.exception() is None:
                self._core.spawn(undo(task.result()))

        def finished(task: asyncio.Task[T]) -> None:
            if abandoned:
                undo_if_completed(task)
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        def start() -> None:
            task = loop.create_task(coro)
            task.add_done_callback(finished)
            started.append(task)

        def abandon(timed_out: bool) -> None:
            nonlocal abandoned
            abandoned = True
            task = started[0]
            if task.done():
                undo_if_completed(task)
            elif timed_out:
                task.cancel()

        loop.call_soon_threadsafe(start)
        with trio.move_on_after(self.operation_timeout) as waiting:
            try:
                await done.wait()
            except trio.Cancelled:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(abandon, waiting.cancel_called)
                raise
        if waiting.cancelled_caught:
            raise BrokerUnavailableError(
                f"RabbitMQ did not answer within {self.operation_timeout:g} s"
            )
        try:
            return started[0].result()
        except (*_FAILURES, asyncio.CancelledError) as exc:
            raise _unavailable(exc) from exc

    async def declare_queue(self, queue: str, *, max_priority: int = 0) -> None:
        await self._ride.run(
            lambda: self._call(self._core.declare(queue, max_priority, if_new=False))
        )

    async def publish(self, queue: str, body: bytes, *, priority: int = 0) -> None:
        # A publish whose confirm was lost with the connection may be stored twice: at least
        # once is the contract (the copies carry the same message id).
        await self._ride.run(lambda: self._call(self._core.publish(queue, body, priority)))

    @asynccontextmanager
    async def consume(self, queue: str, *, prefetch: int) -> AsyncIterator[Consumer]:
        """A consumer on its own channel (declaring the queue first if this broker has not).

        On exit the channel is closed, which requeues the unacked deliveries.
        """
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        consumer = _AmqpConsumer(self, prefetch, rides_through=self._ride.seconds > 0)
        token = self._token

        def on_message(message: DeliveredMessage) -> None:
            delivery = Delivery(
                body=message.body,
                tag=message.delivery_tag or 0,
                redelivered=bool(message.redelivered),
            )
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(consumer.deliver, delivery)

        def on_closed(reason: str, lost: bool) -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(consumer.fail, reason, lost)

        channel = await self._ride.run(
            lambda: self._call(
                self._core.open_consumer(queue, prefetch, on_message, on_closed),
                undo=self._core.close_consumer,
            )
        )
        consumer.channel = channel
        try:
            yield consumer
        finally:
            consumer.fail("the consumer is closed")
            # Nothing to release when the connection is already gone.
            with trio.move_on_after(2, shield=True), suppress(BrokerUnavailableError):
                await self._call(self._core.close_consumer(channel))

    async def queue_length(self, queue: str) -> int:
        return await self._call(self._core.queue_length(queue))

    def set_write_linger(self, seconds: float) -> None:
        # Nothing to batch: RabbitMQ takes each publish and ack on its own, with no lock
        # shared with the other channels' processes.
        pass

    async def delete_queue(self, queue: str) -> None:
        await self._call(self._core.delete_queue(queue))

    async def ping(self) -> None:
        await self._call(self._core.ping())

    async def aclose(self) -> None:
        if self._closed:
            return
        with trio.move_on_after(5, shield=True), suppress(BrokerUnavailableError):
            await self._call(self._core.close())
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._runner.stop()


class _AmqpConsumer(Consumer):
    def __init__(self, broker: AmqpBroker, prefetch: int, *, rides_through: bool) -> None:
        self._broker = broker
        # basic_qos(prefetch) bounds unacked deliveries, so this buffer never fills.
        self._send, self._recv = trio.open_memory_channel[Delivery](prefetch)
        self._unacked: set[int] = set()
        self._failure: str | None = None
        #: Set when its channel closed under it (not cancelled by RabbitMQ, not closed by us)
        #: and it rides through outages: it is to be replaced, not to fail the caller.
        self._lost = trio.Event()
        self._rides_through = rides_through
        self.channel: AbstractChannel | None = None

    def deliver(self, delivery: Delivery) -> None:
        # A delivery arriving after close stays unacked on the closing channel and is requeued.
        with suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(delivery)

    def fail(self, reason: str, lost: bool = False) -> None:
        if self._failure is None:
            self._failure = reason
            if lost and self._rides_through:
                self._lost.set()
        self._send.close()

    def _lost_error(self) -> ConsumerLostError:
        return ConsumerLostError(self._failure or "the consumer was lost", unreachable=True)

    async def wait_lost(self) -> ConsumerLostError:
        await self._lost.wait()
        return self._lost_error()

    async def receive(self) -> Delivery:
        # Deliveries still buffered from a failed channel can no longer be acked: skip them.
        if self._failure is None:
            with suppress(trio.EndOfChannel):
                delivery = await self._recv.receive()
                if self._failure is None:
                    self._unacked.add(delivery.tag)
                    return delivery
        if self._lost.is_set():
            raise self._lost_error()
        raise BrokerUnavailableError(self._failure or "the consumer is closed")

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(delivery, ack=True, requeue=False)

    async def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        await self._settle(delivery, ack=False, requeue=requeue)

    async def _settle(self, delivery: Delivery, *, ack: bool, requeue: bool) -> None:
        # An unknown or repeated tag would make RabbitMQ close the channel; ignore it.
        # AMQP settles without a reply, so a failed or cancelled one is not retried either.
        if delivery.tag not in self._unacked or self.channel is None:
            return
        self._unacked.discard(delivery.tag)
        if self._lost.is_set():
            # Its channel is gone, and with it the delivery: RabbitMQ delivers it again.
            log.debug("delivery %d not settled: %s", delivery.tag, self._failure)
            return
        try:
            await self._broker._call(
                self._broker._core.settle(self.channel, delivery.tag, ack=ack, requeue=requeue)
            )
        except BrokerUnavailableError as exc:
            if not (exc.unreachable and self._rides_through):
                raise
            log.debug("delivery %d not settled: %s", delivery.tag, exc)
