"""A message's timeline (issue 7): the stages the API records on send, and the split of a
message's stored entries into Junebug `events` and the whole `timeline`.

Entries share the message's event list in the store (StateStore.add_event): vumi events have
message_type "event"; timeline entries {"message_type": "timeline", "timestamp", "stage",
"details"} are written by the API ("accepted", "queued"), the outbound actor ("send_attempt")
and the forwarder ("webhook_attempt"). A send_attempt's timestamp is when the send started;
its details: attempt (1, 2, ...), result ("submitted", "rejected", "throttled" or
"transport_error"), retry (whether it goes again), reason and code (when not submitted),
provider_message_ids (when submitted; empty when the provider gives none), parts, and
latency_seconds.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ipc.payloads import VumiEvent, api_event, vumi_timestamp

if TYPE_CHECKING:
    from collections.abc import Iterable


log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

TIMELINE_TYPE = "timeline"
EVENT_TYPE = "event"


def timeline_entry(stage: str, details: JsonObject) -> JsonObject:
    return {
        "message_type": TIMELINE_TYPE,
        "timestamp": vumi_timestamp(),
        "stage": stage,
        "details": details,
    }


def _event_stage(event: VumiEvent, rendered: JsonObject) -> JsonObject:
    details: JsonObject = {
        "event_type": rendered["event_type"],
        "event_details": rendered["event_details"],
    }
    if event.sent_message_id is not None:
        details["provider_message_id"] = event.sent_message_id
    return {"timestamp": event.timestamp, "stage": "event", "details": details}


def split_entries(
    stored: Iterable[JsonObject], owner_id: str
) -> tuple[list[JsonObject], list[JsonObject]]:
    """(Junebug events, timeline), each oldest first; events appear in both.

    An entry that is neither a timeline entry nor a valid vumi event is skipped (logged):
    one bad record must not hide the rest of a message's history.
    """
    events: list[JsonObject] = []
    timeline: list[JsonObject] = []
    for entry in stored:
        if entry.get("message_type") == TIMELINE_TYPE:
            details = entry.get("details")
            timeline.append(
                {
                    "timestamp": str(entry.get("timestamp", "")),
                    "stage": str(entry.get("stage", "")),
                    "details": details if isinstance(details, dict) else {},
                }
            )
            continue
        try:
            event = VumiEvent.model_validate(entry)
        except ValidationError as exc:
            log.warning("skipping an unreadable entry of a message of %s: %s", owner_id, exc)
            continue
        rendered = api_event(event, owner_id)
        events.append(rendered)
        timeline.append(_event_stage(event, rendered))
    # Stable: entries with equal timestamps keep the order they were stored in.
    events.sort(key=lambda item: str(item["timestamp"]))
    timeline.sort(key=lambda item: item["timestamp"])
    return events, timeline
