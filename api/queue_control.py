"""Queue control on the API side (issue 7): the control records the channel process reads
(pause, cancel-all, cancel-one), the channel's queue snapshot, and the backpressure check.

Stored (ipc.state keyed records; every scope starts with "{channel_id}:", so deleting the
channel removes them):
    "{cid}:control"    key "state": {"paused", "cancel_before", "updated"}   (API writes)
    "{cid}:cancelled"  key = message id: {"at"}, ttl = outbound_message_ttl   (API writes)
    "{cid}:runtime"    key "queues": the queue snapshot, key "metrics"         (channel writes)
"""

from __future__ import annotations

import datetime as dt
import math
from typing import TYPE_CHECKING, Any

from api.queue_errors import ChannelQueueFullError
from ipc.errors import BrokerUnavailableError
from ipc.names import cancelled_scope, control_scope, runtime_scope
from ipc.payloads import parse_vumi_timestamp, vumi_timestamp

if TYPE_CHECKING:
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.state import StateStore

JsonObject = dict[str, Any]

STATE_KEY = "state"
QUEUES_KEY = "queues"
METRICS_KEY = "metrics"

#: A snapshot older than this is from a channel process that no longer writes (stopped,
#: failed, hung): its counts are read from the broker instead. It is written every ~1 s.
SNAPSHOT_STALE_AFTER = 10.0
#: Retry-After (seconds) when the channel's send rate is unknown, and when it is paused.
RETRY_AFTER_UNKNOWN = 5
RETRY_AFTER_PAUSED = 60
RETRY_AFTER_MAX = 600

#: The snapshot's fields, in the contract's order; those the broker cannot tell are null.
SNAPSHOT_FIELDS = (
    "outbound",
    "inbound",
    "events",
    "oldest_outbound_age",
    "send_rate",
    "drain_seconds",
    "paused",
    "updated",
)


# --- control records ----------------------------------------------------------------------


async def control_state(store: StateStore, channel_id: str) -> JsonObject:
    stored = await store.kv_get(control_scope(channel_id), STATE_KEY)
    state: JsonObject = {"paused": False, "cancel_before": None, "updated": None}
    if stored is not None:
        state.update(
            paused=stored.get("paused") is True,
            cancel_before=stored.get("cancel_before"),
            updated=stored.get("updated"),
        )
    return state


async def update_control(store: StateStore, channel_id: str, **changes: Any) -> JsonObject:
    """Read, change and write the control state; the channel applies it within ~0.5 s."""
    state = await control_state(store, channel_id)
    state.update(changes, updated=vumi_timestamp())
    await store.kv_put(control_scope(channel_id), STATE_KEY, state)
    return state


async def cancel_message(
    store: StateStore, channel_id: str, message_id: str, ttl: float
) -> JsonObject:
    record = {"at": vumi_timestamp()}
    await store.kv_put(cancelled_scope(channel_id), message_id, record, ttl)
    return record


# --- queue snapshot -----------------------------------------------------------------------


def _fresh(snapshot: JsonObject, now: dt.datetime) -> bool:
    updated = parse_vumi_timestamp(snapshot.get("updated"))
    return updated is not None and (now - updated).total_seconds() <= SNAPSHOT_STALE_AFTER


async def queue_snapshot(
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    *,
    now: dt.datetime | None = None,
) -> JsonObject:
    """The channel's queue snapshot as its process wrote it; when it is missing or stale, the
    counts straight from the broker (the rest null, `paused` from the control state)."""
    stored = await store.kv_get(runtime_scope(channel_id), QUEUES_KEY)
    if stored is not None and _fresh(stored, now or dt.datetime.now(dt.UTC)):
        return {name: stored.get(name) for name in SNAPSHOT_FIELDS}
    snapshot: JsonObject = dict.fromkeys(SNAPSHOT_FIELDS)
    try:
        snapshot["outbound"] = await broker.queue_length(namespace.outbound_queue(channel_id))
        snapshot["inbound"] = await broker.queue_length(namespace.inbound_queue(channel_id))
        snapshot["events"] = await broker.queue_length(namespace.event_queue(channel_id))
    except BrokerUnavailableError:
        # Counts are advisory: a broker outage must not hide the channel (or its `broker: down`
        # status), nor turn a create that was already saved into a 503.
        snapshot["outbound"] = snapshot["inbound"] = snapshot["events"] = None
    snapshot["paused"] = (await control_state(store, channel_id))["paused"]
    return snapshot


# --- backpressure -------------------------------------------------------------------------


def effective_queue_limit(properties: JsonObject, default: int | None) -> int | None:
    limit = properties.get("queue_limit")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
        return limit
    return default


async def _retry_after(store: StateStore, channel_id: str, excess: int) -> int:
    """Seconds until about `excess` queued messages will have been sent."""
    if (await control_state(store, channel_id))["paused"]:
        return RETRY_AFTER_PAUSED
    snapshot = await store.kv_get(runtime_scope(channel_id), QUEUES_KEY)
    rate = snapshot.get("send_rate") if snapshot is not None else None
    if (
        snapshot is None
        or not _fresh(snapshot, dt.datetime.now(dt.UTC))
        or not isinstance(rate, int | float)
        or rate <= 0
    ):
        return RETRY_AFTER_UNKNOWN
    return max(1, min(RETRY_AFTER_MAX, math.ceil(excess / rate)))


async def check_queue_room(
    store: StateStore, broker: Broker, namespace: Namespace, channel_id: str, limit: int | None
) -> None:
    """429 (ChannelQueueFullError, with Retry-After) when the outbound queue is at `limit`."""
    if limit is None:
        return
    queued = await broker.queue_length(namespace.outbound_queue(channel_id))
    if queued < limit:
        return
    retry_after = await _retry_after(store, channel_id, queued - limit + 1)
    raise ChannelQueueFullError(
        f"Channel {channel_id} has {queued} messages queued, its queue_limit is {limit}: "
        f"retry after {retry_after} s",
        retry_after=retry_after,
    )
