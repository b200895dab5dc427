"""submit_sm in order within the window: the line that sends take their place in, and the
one writer task that puts their PDUs on the wire.

A send reserves its place before its first checkpoint (so places follow call order), fills
it with its parts once they are built, then waits for each part's response. The writer
takes parts in place order, each once the window has room, the SMSC's throttling pause is
over and mt_tps allows; a part the SMSC throttled (ESME_RTHROTTLED, ESME_RMSGQFUL) goes
again, after the pause, before anything not yet written. The window counts PDUs on the
wire: a slot frees when the response arrives or the connection is lost.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

from channel_proc.transports.base import StatusLevel
from channel_proc.transports.errors import ConnectionFailed, ProviderRejected
from channel_proc.transports.smpp.bind import LinkDown
from channel_proc.transports.smpp.pdu import STATUS_CODES, status_name

if TYPE_CHECKING:
    from channel_proc.transports.errors import SendError
    from channel_proc.transports.smpp.bind import BindLoop, Connection, StatusSink, Waiter
    from channel_proc.transports.smpp.pdu import Pdu

log = logging.getLogger(__name__)

#: Answers that mean "slow down and send it again".
THROTTLED: Final = frozenset({STATUS_CODES["ESME_RTHROTTLED"], STATUS_CODES["ESME_RMSGQFUL"]})


class Throttle:
    """The SMSC asked us to slow down: every submit on the bind waits until `until`."""

    def __init__(self, delay: float, status: StatusSink) -> None:
        self._delay = delay
        self._status = status
        self._until = -math.inf
        self.active = False

    def hit(self, reason: str) -> None:
        self._until = trio.current_time() + self._delay
        if not self.active:
            self.active = True
            log.warning("throttled by the SMSC (%s); pausing submits", reason)
            self._status(StatusLevel.DEGRADED, "throttled", "Throttled", {"reason": reason})

    async def wait(self) -> None:
        # A hit during the sleep moves `until` later: sleep again (a loop on a deadline
        # that moves, not polling).
        while (until := self._until) > trio.current_time():  # noqa: ASYNC110
            await trio.sleep_until(until)

    def passed(self) -> None:
        if self.active and trio.current_time() >= self._until:
            self.active = False
            log.info("no longer throttled")
            self._status(StatusLevel.OK, "throttled_end", "No longer throttled", {})


class Pacer:
    """At most `tps` submit_sm PDUs per second, evenly spaced (0: no limit)."""

    def __init__(self, tps: float) -> None:
        self._interval = 1 / tps if tps > 0 else 0.0
        self._next = -math.inf

    async def wait(self) -> None:
        if not self._interval:
            return
        at = max(trio.current_time(), self._next)
        self._next = at + self._interval
        await trio.sleep_until(at)


@dataclass(eq=False, slots=True)
class Submission:
    """One submit_sm PDU on its way. `order` is (place, part): the order on the wire."""

    order: tuple[int, int]
    params: dict[str, object]
    #: Said after the PDU in the log line: whose part it is.
    note: str = ""
    #: Set once it was written (`waiter` then holds the answer) or failed before (`error`).
    settled: trio.Event = field(default_factory=trio.Event)
    error: SendError | None = None
    connection: Connection | None = None
    waiter: Waiter | None = None
    written_at: float = 0.0
    #: The same PDU written again because the SMSC throttled this one.
    retry: Submission | None = None

    def __lt__(self, other: Submission) -> bool:
        return self.order < other.order

    def fail(self, error: SendError) -> None:
        self.error = error
        self.settled.set()


@dataclass(eq=False, slots=True)
class Place:
    """One send's place in line; `parts` None until the send has built its PDUs."""

    number: int
    parts: deque[Submission] | None = None
    withdrawn: bool = False


class SubmitLine:
    """The order of submit_sm on the wire and the window (see the module docstring)."""

    def __init__(self, bind: BindLoop, window: int, throttle: Throttle, pacer: Pacer) -> None:
        self._bind = bind
        self._window = trio.Semaphore(window)
        self._throttle = throttle
        self._pacer = pacer
        self._places: deque[Place] = deque()
        self._numbers = 0
        self._again: list[Submission] = []
        self._work = trio.Event()

    # --- the senders' side --------------------------------------------------------------

    def reserve(self) -> Place:
        """A place behind every earlier one (synchronous: call it before any checkpoint)."""
        self._numbers += 1
        place = Place(self._numbers)
        self._places.append(place)
        return place

    def fill(
        self, place: Place, parts: list[dict[str, object]], notes: list[str]
    ) -> list[Submission]:
        """The PDUs of a place, in the order they go out, with their log notes."""
        subs = [
            Submission((place.number, index), params, note)
            for index, (params, note) in enumerate(zip(parts, notes, strict=True))
        ]
        place.parts = deque(subs)
        self._wake()
        return subs

    def withdraw(self, place: Place) -> None:
        """The send is over (done, failed or cancelled): its unwritten parts never go."""
        if not place.withdrawn:
            place.withdrawn = True
            if any(sub.order[0] == place.number for sub in self._again):
                # A throttled part nobody waits for any more must not go out unrecorded.
                self._again = [sub for sub in self._again if sub.order[0] != place.number]
                heapq.heapify(self._again)
            self._trim()
            self._wake()

    async def response(self, sub: Submission, expiry: float) -> Pdu:
        """The SMSC's answer to `sub`.

        Raises:
            ConnectionFailed: not bound, the connection was lost, or no answer within
                `expiry` s of writing it (the connection is then dropped: a rebind resets
                whatever state the SMSC is in).
            ProviderRejected: the PDU cannot be encoded.
        """
        while True:
            await sub.settled.wait()
            if sub.error is not None:
                raise sub.error
            waiter, conn = sub.waiter, sub.connection
            assert waiter is not None
            assert conn is not None
            with trio.move_on_at(sub.written_at + expiry):
                await waiter.done.wait()
            if not waiter.done.is_set():
                conn.lose(f"no submit_sm_resp within {expiry:g} s")
                raise ConnectionFailed(
                    f"no submit_sm_resp within {expiry:g} s", code="response_timeout"
                )
            if sub.retry is not None:
                sub = sub.retry
                continue
            if waiter.response is None:
                raise ConnectionFailed(f"connection to the SMSC lost: {conn.lost_reason}")
            return waiter.response

    # --- the writer ---------------------------------------------------------------------

    def _answered(self, sub: Submission) -> None:
        """The answer (or the loss) is in: free the window slot.

        Runs as the answer is read, before anyone can take the slot: a throttled PDU is
        queued to go again (and the pause starts) before the writer can pick another.
        """
        assert sub.waiter is not None
        response = sub.waiter.response
        if response is not None:
            if response.status in THROTTLED:
                self._throttle.hit(status_name(response.status))
                sub.retry = Submission(sub.order, sub.params, sub.note)
                heapq.heappush(self._again, sub.retry)
                self._wake()
            elif response.ok:
                self._throttle.passed()
        self._window.release()

    def _wake(self) -> None:
        self._work.set()

    def _trim(self) -> None:
        """Drop places at the head of the line that have nothing more to write."""
        places = self._places
        while places and (
            places[0].withdrawn or (places[0].parts is not None and not places[0].parts)
        ):
            places.popleft()

    def _next(self) -> Submission | None:
        """The next PDU to write, if one is ready (a throttled one first, then in order)."""
        if self._again:
            return heapq.heappop(self._again)
        self._trim()
        if self._places and self._places[0].parts:
            return self._places[0].parts.popleft()
        return None

    def _ready(self) -> bool:
        self._trim()
        return bool(self._again) or bool(self._places and self._places[0].parts)

    async def run(self) -> None:
        """Write PDUs for as long as the transport runs."""
        while True:
            while not self._ready():
                self._work = trio.Event()
                await self._work.wait()
            await self._window.acquire()
            try:
                await self._throttle.wait()
                await self._pacer.wait()
            except BaseException:
                self._window.release()
                raise
            # Chosen after the waits: a PDU throttled meanwhile goes first.
            sub = self._next()
            if sub is None:
                self._window.release()
                continue
            await self._write(sub)

    async def _write(self, sub: Submission) -> None:
        conn = self._bind.bound_connection
        if conn is None:
            self._window.release()
            sub.fail(ConnectionFailed("not bound to the SMSC", code="not_bound"))
            return
        try:
            outgoing = conn.session.request("submit_sm", sub.params)
        except RuntimeError as exc:
            self._window.release()
            sub.fail(ConnectionFailed(str(exc), code="not_bound"))
            return
        except ValueError as exc:
            self._window.release()
            sub.fail(ProviderRejected(str(exc), code="unencodable"))
            return
        sub.connection = conn
        sub.waiter = conn.expect(outgoing.pdu.sequence, partial(self._answered, sub))
        sub.written_at = trio.current_time()
        sub.settled.set()
        try:
            await conn.write(outgoing.data, outgoing.pdu, sub.note)
        except LinkDown:
            # The loss resolved the waiter: the sender sees it and the slot is free.
            return
