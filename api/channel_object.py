"""The channel object the API returns (behaviour 3): stored properties + id + status with rates."""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ipc.state import StateStore

JsonObject = dict[str, Any]

#: (store label, channel-object key), in the order the original listed them.
RATES: tuple[tuple[str, str], ...] = (
    ("inbound", "inbound_message_rate"),
    ("outbound", "outbound_message_rate"),
    ("submitted", "submitted_event_rate"),
    ("rejected", "rejected_event_rate"),
    ("delivery_succeeded", "delivery_succeeded_rate"),
    ("delivery_failed", "delivery_failed_rate"),
    ("delivery_pending", "delivery_pending_rate"),
)

#: Worst first: the channel's status is the worst of its components'.
_SEVERITY = ("down", "degraded", "ok")

#: Keys the API owns in the channel object; never stored as properties.
RESERVED_KEYS = frozenset({"id", "status"})


def current_bucket(metric_window: float, now: float | None = None) -> int:
    return int((time.time() if now is None else now) / metric_window)


def worst_status(components: dict[str, JsonObject]) -> str | None:
    levels = {component.get("status") for component in components.values()}
    return next((level for level in _SEVERITY if level in levels), None)


async def read_rates(store: StateStore, owner_id: str, metric_window: float) -> dict[str, float]:
    """Rates over the previous, complete bucket; integer 0 when nothing was counted."""
    bucket = current_bucket(metric_window) - 1
    counts = await store.get_rates(owner_id, [label for label, _ in RATES], bucket)
    rates: dict[str, float] = {}
    for label, key in RATES:
        count = counts.get(label, 0)
        rates[key] = count / metric_window if count else 0
    return rates


async def channel_object(
    store: StateStore,
    channel_id: str,
    properties: JsonObject,
    metric_window: float,
    *,
    queues: JsonObject | None = None,
) -> JsonObject:
    """`queues` (the queue snapshot, api.queue_control) is shown under the status when given."""
    components = await store.get_statuses(channel_id)
    status: JsonObject = {"status": worst_status(components), "components": components}
    status.update(await read_rates(store, channel_id, metric_window))
    if queues is not None:
        status["queues"] = queues
    result = copy.deepcopy(properties)
    result["id"] = channel_id
    result["status"] = status
    return result


def stored_properties(body: JsonObject) -> JsonObject:
    """What is saved for a channel: the body as supplied, without the keys the API owns."""
    return {key: value for key, value in body.items() if key not in RESERVED_KEYS}


def has_destination(properties: JsonObject) -> bool:
    """Key presence, as the original: `"mo_url": null` still counts (Q10, kept)."""
    return "mo_url" in properties or "amqp_queue" in properties
