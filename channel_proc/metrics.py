"""The channel process's runtime snapshots (issue 7): kv "{cid}:runtime" "queues" every ~1 s
(queue lengths, oldest age, send rate, drain estimate, paused) and "metrics" every ~2 s
(the Counters snapshot plus link_up), and the send-rate meter the outbound actor feeds.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import trio

from ipc.errors import BrokerUnavailableError, StoreUnavailableError
from ipc.names import runtime_scope
from ipc.payloads import vumi_timestamp

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from channel_proc.control_state import ControlState
    from channel_proc.counters import Counters
    from channel_proc.events import StatusReporter
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.state import StateStore

log = logging.getLogger(__name__)

QUEUES_KEY: Final = "queues"
METRICS_KEY: Final = "metrics"
QUEUES_INTERVAL: Final = 1.0
METRICS_INTERVAL: Final = 2.0
#: Seconds over which `send_rate` is measured.
RATE_WINDOW: Final = 10.0
#: Seconds the snapshot waits for the status actor's answer about the link.
LINK_QUERY_TIMEOUT: Final = 0.2


class SendRate:
    """Messages sent over the last `window` seconds (trio clock)."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self._window = window
        self._times: deque[float] = deque()
        self._started = trio.current_time()

    def record(self) -> None:
        self._times.append(trio.current_time())

    def rate(self) -> float:
        """Messages per second; over the time since start while that is shorter than the
        window, so a fresh process does not under-report."""
        now = trio.current_time()
        while self._times and self._times[0] <= now - self._window:
            self._times.popleft()
        span = min(self._window, max(now - self._started, 1.0))
        return len(self._times) / span


async def _always_up() -> bool:
    return True


def link_up_from(reporter: StatusReporter) -> Callable[[], Awaitable[bool]]:
    """The link is up while no component's latest status is "down"."""

    last = True

    async def link_up() -> bool:
        nonlocal last
        # The status actor may be busy (posting to status_url): the snapshot must not wait.
        with trio.move_on_after(LINK_QUERY_TIMEOUT):
            components = await reporter.components()
            last = all(status.get("status") != "down" for status in components.values())
        return last

    return link_up


class RuntimeSnapshots:
    """Writes the "queues" and "metrics" snapshots until cancelled."""

    def __init__(
        self,
        *,
        store: StateStore,
        broker: Broker,
        namespace: Namespace,
        channel_id: str,
        counters: Counters,
        send_rate: SendRate,
        control: ControlState | None = None,
        oldest_outbound_age: Callable[[], float | None] = lambda: None,
        link_up: Callable[[], Awaitable[bool]] = _always_up,
        on_outbound_depth: Callable[[int], None] | None = None,
        queues_interval: float = QUEUES_INTERVAL,
        metrics_interval: float = METRICS_INTERVAL,
    ) -> None:
        self._store = store
        self._broker = broker
        self._namespace = namespace
        self._cid = channel_id
        self._counters = counters
        self._send_rate = send_rate
        self._control = control
        self._oldest = oldest_outbound_age
        self._link_up = link_up
        #: Told each outbound depth read (the backlog priority), so it is read once.
        self._on_outbound_depth = on_outbound_depth
        self._queues_interval = queues_interval
        self._metrics_interval = metrics_interval

    async def restore(self) -> None:
        """Counters continue from the previous run's snapshot (never backwards)."""
        previous = await self._store.kv_get(runtime_scope(self._cid), METRICS_KEY)
        self._counters.restore(previous)

    async def queues(self) -> dict[str, Any]:
        ns, cid = self._namespace, self._cid
        outbound = await self._broker.queue_length(ns.outbound_queue(cid))
        if self._on_outbound_depth is not None:
            self._on_outbound_depth(outbound)
        inbound = await self._broker.queue_length(ns.inbound_queue(cid))
        events = await self._broker.queue_length(ns.event_queue(cid))
        rate = self._send_rate.rate()
        paused = False
        if self._control is not None:
            await self._control.refresh()
            paused = self._control.paused
        drain: float | None
        if outbound == 0:
            drain = 0.0
        elif paused or rate <= 0:
            drain = None
        else:
            drain = outbound / rate
        return {
            "outbound": outbound,
            "inbound": inbound,
            "events": events,
            "oldest_outbound_age": self._oldest(),
            "send_rate": rate,
            "drain_seconds": drain,
            "paused": paused,
            "updated": vumi_timestamp(),
        }

    async def metrics(self) -> dict[str, Any]:
        snapshot = self._counters.snapshot()
        snapshot["link_up"] = 1 if await self._link_up() else 0
        snapshot["updated"] = vumi_timestamp()
        return snapshot

    async def write_queues(self) -> None:
        await self._store.kv_put(runtime_scope(self._cid), QUEUES_KEY, await self.queues())

    async def write_metrics(self) -> None:
        await self._store.kv_put(runtime_scope(self._cid), METRICS_KEY, await self.metrics())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Restore the counters, then write both snapshots periodically until cancelled."""
        await self.restore()
        task_status.started()
        next_metrics = trio.current_time()
        try:
            while True:
                try:
                    await self.write_queues()
                    if trio.current_time() >= next_metrics:
                        next_metrics = trio.current_time() + self._metrics_interval
                        await self.write_metrics()
                except (StoreUnavailableError, BrokerUnavailableError) as exc:
                    # A snapshot is advisory: the next tick tries again.
                    log.warning("runtime snapshot not written: %s", exc)
                await trio.sleep(self._queues_interval)
        finally:
            # The last counts, so the next run continues from them; the link is going down
            # and the status actor may already be gone, so it is not asked.
            with trio.move_on_after(2, shield=True):
                final = self._counters.snapshot()
                final.update(link_up=0, updated=vumi_timestamp())
                try:
                    await self._store.kv_put(runtime_scope(self._cid), METRICS_KEY, final)
                except StoreUnavailableError as exc:
                    log.warning("final metrics snapshot not written: %s", exc)
