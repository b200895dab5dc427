"""Bodies carried on the queues (the vumi message format of docs 1.9) and their API renderings.

Queues carry vumi JSON, as the original did, so `{amqp_queue}.*` integrations and
our own `{channel_id}.*` queues share one format. The Junebug API shapes (mo_url
body, event_url body, message-status events) are derived here once, because the
API and the channel process both produce them.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ipc.names import new_message_id

VUMI_DATE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
MESSAGE_VERSION = "20110921"

JsonObject = dict[str, Any]


def vumi_timestamp(when: dt.datetime | None = None) -> str:
    """UTC, naive, always six microsecond digits: "2015-10-06 14:16:34.578820"."""
    moment = when or dt.datetime.now(dt.UTC)
    return moment.astimezone(dt.UTC).replace(tzinfo=None).strftime(VUMI_DATE_FORMAT)


def parse_vumi_timestamp(text: object) -> dt.datetime | None:
    """A vumi timestamp (UTC) as an aware datetime; None when missing or malformed."""
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.strptime(text, VUMI_DATE_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        return None


class SessionEvent(StrEnum):
    NEW = "new"
    RESUME = "resume"
    CLOSE = "close"


class _Vumi(BaseModel):
    # vumi messages carry transport-specific extras; keep them rather than reject them.
    model_config = ConfigDict(extra="allow")


class VumiMessage(_Vumi):
    """A vumi TransportUserMessage (inbound or outbound)."""

    message_type: Literal["user_message"] = "user_message"
    message_version: str = MESSAGE_VERSION
    message_id: str = Field(default_factory=new_message_id)
    timestamp: str = Field(default_factory=vumi_timestamp)
    to_addr: str | None = None
    from_addr: str | None = None
    group: str | None = None
    content: str | None = None
    in_reply_to: str | None = None
    session_event: SessionEvent | None = None
    transport_name: str | None = None
    transport_type: str | None = None
    transport_metadata: JsonObject = Field(default_factory=dict)
    helper_metadata: JsonObject = Field(default_factory=dict)
    routing_metadata: JsonObject = Field(default_factory=dict)
    provider: str | None = None
    to_addr_type: str | None = None
    from_addr_type: str | None = None


class EventType(StrEnum):
    ACK = "ack"
    NACK = "nack"
    DELIVERY_REPORT = "delivery_report"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    FAILED = "failed"
    DELIVERED = "delivered"


class VumiEvent(_Vumi):
    """A vumi event: ack, nack or delivery_report for an outbound message."""

    message_type: Literal["event"] = "event"
    message_version: str = MESSAGE_VERSION
    event_id: str = Field(default_factory=new_message_id)
    event_type: EventType
    user_message_id: str | None
    timestamp: str = Field(default_factory=vumi_timestamp)
    transport_name: str | None = None
    sent_message_id: str | None = None
    nack_reason: str | None = None
    delivery_status: DeliveryStatus | None = None
    helper_metadata: JsonObject = Field(default_factory=dict)
    transport_metadata: JsonObject = Field(default_factory=dict)
    routing_metadata: JsonObject = Field(default_factory=dict)


def junebug_event_type(event: VumiEvent) -> str | None:
    """The Junebug event type (docs 1.8.2) for a vumi event; None when it has none."""
    match event.event_type:
        case EventType.ACK:
            return "submitted"
        case EventType.NACK:
            return "rejected"
        case EventType.DELIVERY_REPORT:
            match event.delivery_status:
                case DeliveryStatus.PENDING:
                    return "delivery_pending"
                case DeliveryStatus.FAILED:
                    return "delivery_failed"
                case DeliveryStatus.DELIVERED:
                    return "delivery_succeeded"
                case None:
                    return None


def api_event(event: VumiEvent, channel_id: str) -> JsonObject:
    """The event as POSTed to event_url and listed under a message's `events` (docs 1.8.2)."""
    details: JsonObject = {}
    if event.event_type == EventType.NACK:
        details["reason"] = event.nack_reason
    extra = event.helper_metadata.get("event_details")
    if isinstance(extra, dict):
        details.update(extra)
    return {
        "channel_id": channel_id,
        "message_id": event.user_message_id,
        "timestamp": event.timestamp,
        "event_type": junebug_event_type(event),
        "event_details": details,
    }


def api_message(msg: VumiMessage, channel_id: str) -> JsonObject:
    """A message as POSTed to mo_url (docs 1.8.3) and returned by a send (behaviour 4.3)."""
    channel_data = dict(msg.helper_metadata)
    continue_session = getattr(msg, "continue_session", None)
    if continue_session is not None:
        channel_data["continue_session"] = continue_session
    if msg.session_event is not None:
        channel_data["session_event"] = msg.session_event.value
    return {
        "to": msg.to_addr,
        "from": msg.from_addr,
        "group": msg.group,
        "message_id": msg.message_id,
        "channel_id": channel_id,
        "timestamp": msg.timestamp,
        "reply_to": msg.in_reply_to,
        "content": msg.content,
        "channel_data": channel_data,
    }
