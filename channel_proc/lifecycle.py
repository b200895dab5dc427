"""The graceful-stop request shared by the actors: idle waits end at once, work gets a grace."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ipc.broker import Consumer, Delivery

log = logging.getLogger(__name__)


class Shutdown:
    """Requested by SIGTERM, stdin EOF or an IPC Drain.

    Code waiting for new work runs under `idle()` and is cancelled at once; code
    finishing a message runs under `busy()` and gets `grace` seconds from the request.
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.reason = ""
        self._event = trio.Event()
        self._idle: set[trio.CancelScope] = set()
        self._busy: set[trio.CancelScope] = set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str) -> None:
        if self.requested:
            return
        log.info("stopping: %s", reason)
        self.reason = reason
        self._event.set()
        for scope in self._idle:
            scope.cancel()
        deadline = trio.current_time() + self.grace
        for scope in self._busy:
            scope.deadline = min(scope.deadline, deadline)

    def hurry(self) -> None:
        """Cut the grace period short: in-flight work is cancelled now (a second signal)."""
        self.request("hurried")
        for scope in self._busy:
            scope.cancel()

    async def wait(self) -> None:
        await self._event.wait()

    @contextmanager
    def idle(self) -> Iterator[trio.CancelScope]:
        """A scope cancelled as soon as a stop is requested (check `cancelled_caught`)."""
        scope = trio.CancelScope()
        if self.requested:
            scope.cancel()
        self._idle.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._idle.discard(scope)

    @contextmanager
    def busy(self) -> Iterator[trio.CancelScope]:
        """A scope that gets `grace` seconds once a stop is requested."""
        scope = trio.CancelScope()
        if self.requested:
            scope.deadline = trio.current_time() + self.grace
        self._busy.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._busy.discard(scope)

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless a stop is requested; False when the sleep was cut short by one."""
        with self.idle() as scope:
            await trio.sleep(seconds)
        return not scope.cancelled_caught

    async def receive(self, consumer: Consumer) -> Delivery | None:
        """The next delivery, or None once a stop is requested.

        A delivery received as the stop arrives is not returned: it stays unacked and
        goes back to the queue when the consumer closes.
        """
        if self._event.is_set():
            return None
        delivery = None
        with self.idle():
            # receive() may return a prefetched delivery without a checkpoint, hence the
            # checks around it rather than relying on the cancellation alone.
            delivery = await consumer.receive()
        return None if self._event.is_set() else delivery
