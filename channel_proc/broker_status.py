"""The channel's `broker` status component: whether it can reach its queue broker.

Down as soon as its calls start riding out an outage (OutageReporter), and ok again when the
outage is over; down when the broker fails the process (broker_loss_reported: at start, or
once an outage outlasts the ride-through; the process then exits 69 and the supervisor
retries it); ok again once a later run reaches it (record_broker_up). Written to the store
directly, as the status actor may not be running (yet, or any more).
"""

from __future__ import annotations

import contextlib
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import trio

from channel_proc.process import CLEANUP_TIMEOUT
from ipc.errors import (
    BackendUnavailableError,
    BrokerUnavailableError,
    StoreUnavailableError,
    leaf_exceptions,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.settings import Settings
    from ipc.state import StateStore

#: The status component that tells whether the channel can reach its queue broker.
BROKER_COMPONENT: Final = "broker"


def broker_status(
    settings: Settings, channel_id: str, level: str, type_: str, message: str
) -> dict[str, Any]:
    backend = "rabbitmq" if settings.amqp is not None else "embedded"
    return {
        "component": BROKER_COMPONENT,
        "channel_id": channel_id,
        "status": level,
        "type": type_,
        "message": message,
        "details": {"backend": backend},
    }


async def _record_down(store: StateStore, settings: Settings, channel_id: str, error: str) -> None:
    """Best effort and bounded: the store may be failing too."""
    with (
        trio.move_on_after(CLEANUP_TIMEOUT, shield=True),
        contextlib.suppress(StoreUnavailableError),
    ):
        # A deleted channel must not get a status key back.
        if await store.get_channel(channel_id) is not None:
            message = f"The queue broker is unavailable: {error}"
            status = broker_status(settings, channel_id, "down", "unavailable", message)
            await store.set_status(channel_id, BROKER_COMPONENT, status)


@asynccontextmanager
async def broker_loss_reported(
    store: StateStore, settings: Settings, channel_id: str
) -> AsyncIterator[None]:
    """Record the `broker` component down when the block fails with BrokerUnavailableError."""
    try:
        yield
    except* BrokerUnavailableError as group:
        error = "; ".join(str(exc) for exc in leaf_exceptions(group))
        await _record_down(store, settings, channel_id, error)
        raise


async def record_broker_up(store: StateStore, settings: Settings, channel_id: str) -> None:
    """Clear a `broker` down status left by an earlier run or outage (a deleted channel has
    none)."""
    previous = (await store.get_statuses(channel_id)).get(BROKER_COMPONENT)
    if previous is not None and previous.get("status") != "ok":
        message = "The queue broker is reachable again"
        status = broker_status(settings, channel_id, "ok", "recovered", message)
        await store.set_status(channel_id, BROKER_COMPONENT, status)


class OutageReporter:
    """Writes the `broker` component as the broker's ride-through meets an outage and sees
    it end (`note` is its OutageListener). Only the latest news is written: an outage that is
    over before its "down" was stored leaves nothing to clear."""

    def __init__(self, store: StateStore, settings: Settings, channel_id: str) -> None:
        self._store = store
        self._settings = settings
        self._channel_id = channel_id
        #: The error of the outage under way, or None once it is over (read on each wake-up;
        #: _wake is only set together with a new value).
        self._latest: BackendUnavailableError | None = None
        self._wake = trio.Event()

    def note(self, error: BackendUnavailableError | None) -> None:
        self._latest = error
        self._wake.set()

    async def run(self) -> None:
        """Write each piece of news until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            error = self._latest
            if error is not None:
                await _record_down(self._store, self._settings, self._channel_id, str(error))
            else:
                with contextlib.suppress(StoreUnavailableError):
                    await record_broker_up(self._store, self._settings, self._channel_id)
