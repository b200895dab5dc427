"""The channel side of issue 7's control records: a cached reader of the API's pause/cancel
state (kv "{cid}:control" "state" and scope "{cid}:cancelled"), and each message's verdict;
the names of the outbound actor's own records (scope "{cid}:send_attempts").
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Final

import trio

from ipc.names import cancelled_scope, control_scope
from ipc.payloads import parse_vumi_timestamp

if TYPE_CHECKING:
    from ipc.payloads import VumiMessage
    from ipc.state import StateStore

#: Seconds a read of the control records is reused: pause/cancel apply within about this.
REFRESH_INTERVAL: Final = 0.5
CANCELLED: Final = "cancelled"
EXPIRED: Final = "expired"
#: The rejected reason of a message whose sends kept crashing the channel process.
SEND_CRASHED: Final = "send_crashed"


def send_attempts_scope(channel_id: str) -> str:
    """Sends started and not finished, per message id (the outbound actor's crash counter)."""
    return f"{channel_id}:send_attempts"


class ControlState:
    """What the API last asked of this channel, re-read from the store at most every
    `interval` seconds (one trio thread; concurrent refreshes share nothing but the result)."""

    def __init__(
        self, store: StateStore, channel_id: str, *, interval: float = REFRESH_INTERVAL
    ) -> None:
        self._store = store
        self._channel_id = channel_id
        self._interval = interval
        self._read_at: float | None = None
        self.paused = False
        self.cancel_before: dt.datetime | None = None
        self.cancelled: frozenset[str] = frozenset()

    async def refresh(self, *, force: bool = False) -> None:
        """Re-read the records unless the last read is fresher than the interval."""
        now = trio.current_time()
        if not force and self._read_at is not None and now - self._read_at < self._interval:
            return
        self._read_at = now
        state: dict[str, Any] = (
            await self._store.kv_get(control_scope(self._channel_id), "state") or {}
        )
        cancelled = await self._store.kv_items(cancelled_scope(self._channel_id))
        self.paused = state.get("paused") is True
        self.cancel_before = parse_vumi_timestamp(state.get("cancel_before"))
        self.cancelled = frozenset(cancelled)

    async def verdict(self, msg: VumiMessage, *, now: dt.datetime | None = None) -> str | None:
        """CANCELLED or EXPIRED when `msg` must not be sent, else None."""
        await self.refresh()
        if msg.message_id in self.cancelled:
            return CANCELLED
        if self.cancel_before is not None:
            stamp = parse_vumi_timestamp(msg.timestamp)
            if stamp is not None and stamp <= self.cancel_before:
                return CANCELLED
        expires_at = parse_vumi_timestamp(msg.routing_metadata.get("expires_at"))
        if expires_at is not None and expires_at < (now or dt.datetime.now(dt.UTC)):
            return EXPIRED
        return None
