"""An asyncio event loop on a thread of its own, driven from trio: the xmpp transport's
bridge to slixmpp, which is asyncio-only. Trio owns the lifecycle; the loop only runs
the coroutines trio hands it.
"""

from __future__ import annotations

# slixmpp (the maintained XMPP library) is asyncio-only; it runs on this private loop in its own
# thread and nothing asyncio crosses back into trio.
import asyncio  # noqa: TID251
import concurrent.futures
import threading
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine

Ts = TypeVarTuple("Ts")
T = TypeVar("T")


class LoopClosedError(RuntimeError):
    """The asyncio loop stopped (or never started) before the call could run."""


class AsyncioThread:
    """Runs coroutine functions on a private asyncio loop; create it with `open_asyncio_thread`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        self._ready = trio.Event()

    async def call(self, fn: Callable[[*Ts], Coroutine[Any, Any, T]], *args: *Ts) -> T:
        """Run `fn(*args)` on the asyncio loop and return its result (or raise its exception).

        Raises:
            LoopClosedError: the loop is gone.
        Cancellation: cancels the asyncio task (without waiting for it) and raises Cancelled.
        """
        loop = self._loop
        # Checked on the trio thread, which alone requests the stop: a call submitted before
        # the request runs (or is cancelled) before the loop ends, so its future completes.
        if loop is None or self._stop_requested:
            raise LoopClosedError("the asyncio loop is not running")
        coro = fn(*args)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError as exc:
            coro.close()
            raise LoopClosedError("the asyncio loop is closed") from exc
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: concurrent.futures.Future[T]) -> None:
            # Runs on the asyncio thread; after trio's run ended nobody is waiting any more.
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        finally:
            future.cancel()
        try:
            return future.result()
        except concurrent.futures.CancelledError as exc:
            raise LoopClosedError("the asyncio loop cancelled the call") from exc

    def _request_stop(self) -> None:
        """Thread-safe: make the loop finish (at once if it has not started yet)."""
        with self._lock:
            self._stop_requested = True
            if self._loop is not None and self._stop is not None:
                with suppress(RuntimeError):  # the loop already closed
                    self._loop.call_soon_threadsafe(self._stop.set)

    def _thread_main(self, token: trio.lowlevel.TrioToken) -> None:
        asyncio.run(self._main(token))

    async def _main(self, token: trio.lowlevel.TrioToken) -> None:
        stop = asyncio.Event()
        with self._lock:
            if self._stop_requested:
                return
            self._loop, self._stop = asyncio.get_running_loop(), stop
        token.run_sync_soon(self._ready.set)
        await stop.wait()
        # asyncio.run then cancels whatever the library left running and closes the loop.


@asynccontextmanager
async def open_asyncio_thread(name: str) -> AsyncIterator[AsyncioThread]:
    """Start the loop's thread; on exit stop the loop and wait for the thread to end.

    Cleanup left to the asyncio side must be bounded: exit waits for it.
    """
    bridge = AsyncioThread()
    token = trio.lowlevel.current_trio_token()
    # Its own limiter: the thread lives as long as the context and must not hold a slot of
    # trio's shared thread pool.
    run_thread = partial(
        trio.to_thread.run_sync,
        bridge._thread_main,
        token,
        thread_name=name,
        limiter=trio.CapacityLimiter(1),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_thread)
        try:
            await bridge._ready.wait()
            yield bridge
        finally:
            bridge._request_stop()
