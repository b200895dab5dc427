"""Ordered, bounded-concurrency consumption of one queue (the forwarder's and the router's).

Deliveries are taken in queue order and handled by up to `limit` tasks at once; each handler
marks the moment its outward work starts (`Turn.begin`), and those moments follow queue order
whatever the handlers did before (decoding, storing). A write whose order matters (a message's
events, listed in the order stored) goes between `Turn.wait_to_record` and `Turn.recorded`,
which also follow queue order. A handler whose attempt failed calls
`Turn.wait_to_retry`: while any delivery of the lane is failing, no new one begins, and a
failing one retries only when no earlier one is unsettled (failing, or in flight with its
outcome not known yet); so the earliest retries, with its own backoff, the others wait for it
to settle, a dead receiver sees one probe at a time and a backlog keeps its order. With `limit` 1,
handling is strictly sequential.

Every handler runs under `Shutdown.busy()`: a stop lets in-flight deliveries finish within
the grace period; what is not acked by then goes back to the queue.

A consumer lost to a broker outage (ConsumerLostError) is replaced in place: the handlers in
flight are cancelled, as their deliveries are back in the queue whatever they do (letting
them finish would only deliver each twice), and a new consumer takes the queue from the top
with a fresh lane, so order holds. The loss is noticed at once (Consumer.wait_lost), even
when every handler is busy, e.g. retrying a webhook that is down, and none calls receive.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Final

import trio

from ipc.errors import ConsumerLostError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from channel_proc.lifecycle import Shutdown
    from ipc.broker import Broker, Consumer, Delivery

    Handler = Callable[["Consumer", "Delivery", "Turn"], Awaitable[None]]

#: Deliveries a consumer may hold unacked at least (more when the lane's limit is higher).
PREFETCH: Final = 16

log = logging.getLogger(__name__)


class _Sequence:
    """Positions 0, 1, 2, ... passing one point in order, whatever order they arrive in.

    Each waiter has its own event, woken only when its turn comes: with many deliveries in
    flight, one shared "something changed" event would wake them all at every step.
    """

    def __init__(self, shutdown: Shutdown) -> None:
        #: The next position allowed through; those in `_passed` went (or never will).
        self.next = 0
        self._passed: set[int] = set()
        self._waiting: dict[int, trio.Event] = {}
        self._shutdown = shutdown

    async def wait_turn(self, position: int) -> bool:
        """Until `position` is next; False when a stop was requested first."""
        if self.next == position:
            return True
        event = self._waiting.setdefault(position, trio.Event())
        with self._shutdown.idle() as scope:
            await event.wait()
        return not scope.cancelled_caught

    def passed(self, position: int) -> None:
        self._passed.add(position)
        while self.next in self._passed:
            self._passed.discard(self.next)
            self.next += 1
        event = self._waiting.pop(self.next, None)
        if event is not None:
            event.set()


class Lane:
    """The ordering and failure state of one consumed queue (owned by its consume loop)."""

    def __init__(self, limit: int, shutdown: Shutdown) -> None:
        self.limit = max(1, limit)
        self.in_flight = 0
        self._shutdown = shutdown
        self._positions = itertools.count()
        self._starts = _Sequence(shutdown)
        self._records = _Sequence(shutdown)
        #: Positions whose last attempt failed and that have not settled yet.
        self._failing: set[int] = set()
        #: Positions that have begun and not settled yet (the failing ones among them).
        self._open: set[int] = set()
        #: Set (and replaced) when a slot frees or the failing set changes.
        self._changed = trio.Event()

    @property
    def failing(self) -> bool:
        return bool(self._failing)

    def new_turn(self) -> Turn:
        return Turn(self, next(self._positions))

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self) -> bool:
        """Wait for a slot or the failing set to change; False when a stop was requested."""
        with self._shutdown.idle() as scope:
            await self._changed.wait()
        return not scope.cancelled_caught

    async def wait_slot(self) -> bool:
        """Until a new delivery may be taken; False when a stop was requested."""
        while self.in_flight >= self.limit or self._failing:
            if not await self.wait_change():
                return False
        return not self._shutdown.requested


class Turn:
    """One delivery's place in its lane."""

    def __init__(self, lane: Lane, position: int) -> None:
        self._lane = lane
        self.position = position
        self._begun = False
        self._recorded = False

    async def wait_to_record(self) -> bool:
        """Wait until every earlier delivery has recorded (or never will); False when a stop
        was requested first. Call `recorded` once the write is done."""
        return await self._lane._records.wait_turn(self.position)

    def recorded(self) -> None:
        if not self._recorded:
            self._recorded = True
            self._lane._records.passed(self.position)

    async def begin(self) -> bool:
        """Wait until every earlier delivery has begun and none is failing, then begin.

        False when a stop was requested first (the delivery must then stay unacked).
        """
        lane = self._lane
        if self._begun:
            return True
        if not await lane._starts.wait_turn(self.position):
            return False
        # Later ones wait for this one to begin, so its turn holds while failures clear.
        while lane._failing:
            if not await lane.wait_change():
                return False
        self._begun = True
        lane._open.add(self.position)
        lane._starts.passed(self.position)
        return True

    async def wait_to_retry(self) -> bool | None:
        """After a failed attempt: wait until no earlier delivery of the lane is unsettled,
        failing or still in flight (one whose failure is not known yet must not be
        overtaken: its retry comes first).

        Returns True when none was (it should back off, then retry: it probes the
        receiver), None when it had to wait for earlier ones to settle (retry at once: the
        receiver may well be back), False when a stop was requested meanwhile.
        """
        lane = self._lane
        self.failed()
        waited = False
        while self._behind_others():
            waited = True
            if not await lane.wait_change():
                return False
        return None if waited else True

    def failed(self) -> None:
        """Its attempt just failed: from now on no new delivery begins and later failing
        ones hold their retries. Call it before anything that waits (recording the attempt),
        or a delivery that begins meanwhile could overtake this one's retry."""
        lane = self._lane
        if self.position not in lane._failing:
            lane._failing.add(self.position)
            lane.notify()

    def _behind_others(self) -> bool:
        return any(position < self.position for position in self._lane._open)

    @property
    def probing(self) -> bool:
        """Whether this is the failing delivery that retries: no earlier one is unsettled."""
        return self.position in self._lane._failing and not self._behind_others()

    def settle(self) -> None:
        """Delivered, given up or abandoned: it no longer holds anything up."""
        lane = self._lane
        self.recorded()
        if not self._begun:
            self._begun = True
            lane._starts.passed(self.position)
        if self.position in lane._open or self.position in lane._failing:
            lane._open.discard(self.position)
            lane._failing.discard(self.position)
            lane.notify()


async def consume_in_order(
    broker: Broker,
    shutdown: Shutdown,
    queue: str,
    handle: Handler,
    *,
    limit: int,
    task_status: trio.TaskStatus[None],
) -> None:
    """Consume `queue` with up to `limit` handlers at once until a stop is requested and
    every handler has returned. `handle` acks (or not) each delivery itself."""
    await broker.declare_queue(queue)
    prefetch = max(PREFETCH, limit)
    started = False
    while True:
        lane = Lane(limit, shutdown)
        async with (
            broker.consume(queue, prefetch=prefetch) as consumer,
            trio.open_nursery() as tasks,
        ):
            if not started:
                task_status.started()
                started = True
            # Cancelling the nursery ends the handlers and this loop alike.
            watch = trio.CancelScope()
            tasks.start_soon(_end_when_lost, consumer, queue, tasks.cancel_scope, watch)
            try:
                while await lane.wait_slot():
                    try:
                        delivery = await shutdown.receive(consumer)
                    except ConsumerLostError as exc:
                        _lost(queue, exc, tasks.cancel_scope)
                        break
                    if delivery is None:
                        return
                    lane.in_flight += 1
                    tasks.start_soon(_run_one, lane, handle, consumer, delivery, lane.new_turn())
                else:
                    return
            finally:
                watch.cancel()
        if shutdown.requested:
            # Lost as a stop came: nothing left to take the queue for.
            return


async def _end_when_lost(
    consumer: Consumer, queue: str, scope: trio.CancelScope, watch: trio.CancelScope
) -> None:
    with watch:
        _lost(queue, await consumer.wait_lost(), scope)


def _lost(queue: str, exc: ConsumerLostError, scope: trio.CancelScope) -> None:
    if not scope.cancel_called:
        log.warning("consumer of %s lost (%s); opening a new one", queue, exc)
        scope.cancel()


async def _run_one(
    lane: Lane, handle: Handler, consumer: Consumer, delivery: Delivery, turn: Turn
) -> None:
    try:
        with lane._shutdown.busy():
            await handle(consumer, delivery, turn)
    finally:
        turn.settle()
        lane.in_flight -= 1
        lane.notify()
