"""The component schemas of the API's OpenAPI document (api.openapi): the shapes of what the
API answers, and the request bodies of api.schemas as they are."""

from __future__ import annotations

from typing import Any

from api.channel_object import RATES
from api.queue_control import SNAPSHOT_FIELDS
from api.routes.dead_letters import DEAD_LETTER_SCHEMA
from api.schemas import (
    CHANNEL_CREATE,
    CHANNEL_MODIFY,
    DESTINATION_CREATE,
    DESTINATION_PATCH,
    MESSAGE_SEND,
    ROUTER_CREATE,
    ROUTER_PATCH,
)

JsonObject = dict[str, Any]


def ref(name: str) -> JsonObject:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(kind: str) -> JsonObject:
    return {"type": [kind, "null"]}


_STATUS_COMPONENT: JsonObject = {
    "type": "object",
    "properties": {
        "component": {"type": "string"},
        "channel_id": {"type": "string"},
        "status": {"enum": ["ok", "degraded", "down"]},
        "type": nullable("string"),
        "message": nullable("string"),
        "details": {"type": "object"},
    },
}

_CHANNEL_STATUS: JsonObject = {
    "type": "object",
    "required": ["status", "components", *(key for _, key in RATES), "queues"],
    "properties": {
        "status": {"enum": ["ok", "degraded", "down", None]},
        "components": {"type": "object", "additionalProperties": ref("StatusComponent")},
        **{key: {"type": "number", "minimum": 0} for _, key in RATES},
        "queues": ref("QueueSnapshot"),
    },
}

_NULLABLE_SECONDS: JsonObject = {"type": ["number", "null"], "minimum": 0}

#: The channel process's queue snapshot (every ~1 s); without a recent one, the counts come
#: from the broker and the other fields are null.
_QUEUE_SNAPSHOT: JsonObject = {
    "type": "object",
    "required": list(SNAPSHOT_FIELDS),
    "properties": {
        "outbound": {"type": "integer", "minimum": 0, "description": "queued outbound"},
        "inbound": {"type": "integer", "minimum": 0, "description": "inbound not forwarded"},
        "events": {"type": "integer", "minimum": 0, "description": "events not forwarded"},
        "oldest_outbound_age": {
            **_NULLABLE_SECONDS,
            "description": "seconds the oldest queued outbound message has waited",
        },
        "send_rate": {**_NULLABLE_SECONDS, "description": "messages sent/s over the last 10 s"},
        "drain_seconds": {
            **_NULLABLE_SECONDS,
            "description": "estimated seconds to send the queue at the current rate",
        },
        "paused": {"type": ["boolean", "null"]},
        "updated": {**nullable("string"), "description": "when the snapshot was taken (UTC)"},
    },
}

#: The control state a pause or resume leaves.
_CONTROL_STATE: JsonObject = {
    "type": "object",
    "required": ["paused", "cancel_before", "updated"],
    "properties": {
        "paused": {"type": "boolean"},
        "cancel_before": {
            **nullable("string"),
            "description": "messages timestamped at or before this (UTC) are cancelled",
        },
        "updated": {"type": "string"},
    },
}

#: The stored properties as supplied (any extra keys too), plus `id` and `status` (behaviour 3).
_CHANNEL: JsonObject = {
    "type": "object",
    "required": ["id", "status"],
    "properties": {"id": {"type": "string"}, "status": ref("ChannelStatus")},
    "additionalProperties": True,
}

_RATES: JsonObject = {
    "type": "object",
    "required": [key for _, key in RATES],
    "properties": {key: {"type": "number", "minimum": 0} for _, key in RATES},
}

#: The stored router (type, config, label, metadata) plus `id` and `status` (its rates).
_ROUTER: JsonObject = {
    "type": "object",
    "required": ["id", "type", "config", "status"],
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string"},
        "config": {"type": "object"},
        "label": {"type": "string"},
        "metadata": {"type": "object"},
        "status": ref("Rates"),
    },
}

#: The destination as supplied plus `id` and `status` (its rates).
_DESTINATION: JsonObject = {
    "type": "object",
    "required": ["id", "config", "status"],
    "properties": {
        **DESTINATION_CREATE["properties"],
        "id": {"type": "string"},
        "status": ref("Rates"),
    },
}

_MESSAGE: JsonObject = {
    "type": "object",
    "required": [
        "to",
        "from",
        "group",
        "message_id",
        "channel_id",
        "timestamp",
        "reply_to",
        "content",
        "channel_data",
    ],
    "properties": {
        "to": nullable("string"),
        "from": nullable("string"),
        "group": nullable("string"),
        "message_id": {"type": "string"},
        "channel_id": {"type": "string"},
        "timestamp": {"type": "string", "description": "UTC, YYYY-MM-DD HH:MM:SS.ffffff"},
        "reply_to": nullable("string"),
        "content": nullable("string"),
        "channel_data": {"type": "object"},
    },
}

_EVENT: JsonObject = {
    "type": "object",
    "required": ["channel_id", "message_id", "timestamp", "event_type", "event_details"],
    "properties": {
        "channel_id": {"type": "string"},
        "message_id": nullable("string"),
        "timestamp": {"type": "string"},
        "event_type": {
            "enum": [
                "submitted",
                "rejected",
                "delivery_succeeded",
                "delivery_failed",
                "delivery_pending",
                None,
            ]
        },
        "event_details": {
            "type": "object",
            "description": "for rejected: reason (cancelled, expired, send_crashed or the"
            " provider's error), for delivery reports the provider's status",
        },
    },
}

_TIMELINE_ENTRY: JsonObject = {
    "type": "object",
    "required": ["timestamp", "stage", "details"],
    "properties": {
        "timestamp": {"type": "string"},
        "stage": {
            "type": "string",
            "description": "accepted, queued, send_attempt, event or webhook_attempt",
        },
        "details": {"type": "object"},
    },
}

_MESSAGE_STATUS: JsonObject = {
    "type": "object",
    "required": ["id", "last_event_type", "last_event_timestamp", "events", "timeline"],
    "properties": {
        "id": {"type": "string"},
        "last_event_type": _EVENT["properties"]["event_type"],
        "last_event_timestamp": nullable("string"),
        "events": {"type": "array", "items": ref("Event")},
        "timeline": {
            "type": "array",
            "items": ref("TimelineEntry"),
            "description": "the message's whole life, oldest first (events as stage event)",
        },
    },
}

_LOG_ENTRY: JsonObject = {
    "type": "object",
    "properties": {
        "logger": {"type": "string"},
        "level": {"type": "integer"},
        "timestamp": {"type": "number", "description": "seconds since the epoch"},
        "message": {"type": "string"},
        "exception": {
            "type": "object",
            "properties": {
                "class": {"type": "string"},
                "instance": {"type": "string"},
                "stack": {"type": "array"},
            },
        },
    },
}

_QUEUE_REPORT: JsonObject = {
    "type": "object",
    "required": ["name", "stuck", "messages"],
    "properties": {
        "name": {"type": "string"},
        "stuck": {"type": "boolean"},
        "messages": {"type": "number"},
        "rate": {"type": "number"},
    },
}

_ERROR_ITEM: JsonObject = {
    "type": "object",
    "required": ["type", "message"],
    "properties": {
        "type": {"type": "string"},
        "message": {"type": "string"},
        "schema_path": {"type": "array", "items": {"type": ["string", "integer"]}},
        "code": {"type": "integer"},
        "new_url": {"type": "string"},
    },
}


ERRORS_RESULT: JsonObject = {
    "type": "object",
    "required": ["errors"],
    "properties": {"errors": {"type": "array", "items": ref("ErrorItem")}},
}

HEALTH_RESULT: JsonObject = {
    "oneOf": [{"type": "object", "maxProperties": 0}, ref("QueueReportList")]
}


def envelope_schema(result: JsonObject) -> JsonObject:
    """Every response of the API (behaviour 1.1): {status, code, description, result}."""
    return {
        "type": "object",
        "required": ["status", "code", "description", "result"],
        "properties": {
            "status": {"type": "integer"},
            "code": {"type": "string"},
            "description": nullable("string"),
            "result": result,
        },
        "additionalProperties": False,
    }


COMPONENT_SCHEMAS: dict[str, JsonObject] = {
    "ChannelCreate": CHANNEL_CREATE,
    "ChannelModify": CHANNEL_MODIFY,
    "MessageSend": MESSAGE_SEND,
    "RouterCreate": ROUTER_CREATE,
    "RouterPatch": ROUTER_PATCH,
    "DestinationCreate": DESTINATION_CREATE,
    "DestinationPatch": DESTINATION_PATCH,
    "Router": _ROUTER,
    "Destination": _DESTINATION,
    "Rates": _RATES,
    "Channel": _CHANNEL,
    "ChannelStatus": _CHANNEL_STATUS,
    "QueueSnapshot": _QUEUE_SNAPSHOT,
    "ControlState": _CONTROL_STATE,
    "StatusComponent": _STATUS_COMPONENT,
    "Message": _MESSAGE,
    "MessageStatus": _MESSAGE_STATUS,
    "TimelineEntry": _TIMELINE_ENTRY,
    "Event": _EVENT,
    "LogEntry": _LOG_ENTRY,
    "QueueReport": _QUEUE_REPORT,
    "QueueReportList": {"type": "array", "items": ref("QueueReport")},
    "ErrorItem": _ERROR_ITEM,
    "ErrorEnvelope": envelope_schema(ERRORS_RESULT),
    "DeadLetter": DEAD_LETTER_SCHEMA,
}
