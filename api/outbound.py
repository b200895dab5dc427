"""Turn a validated send body into the vumi message to queue (behaviour 4.1-4.5). Pure functions."""

from __future__ import annotations

from typing import Any

from api.errors import MessageTooLongError
from ipc.payloads import SessionEvent, VumiMessage

JsonObject = dict[str, Any]

#: channel_data keys that become vumi fields instead of helper_metadata.
_SPECIAL_KEYS = ("continue_session", "session_event")

DEFAULT_PRIORITY = 1


def _session_event(channel_data: JsonObject) -> SessionEvent | None:
    """The body schema (api.schemas.MESSAGE_SEND) has already limited it to these values."""
    value = channel_data.get("session_event")
    return None if value is None else SessionEvent(value)


def _helper_metadata(channel_data: JsonObject) -> JsonObject:
    return {key: value for key, value in channel_data.items() if key not in _SPECIAL_KEYS}


def plain_message(channel_id: str, body: JsonObject) -> VumiMessage:
    """A send without (or with an expired) reply_to: addresses come from the body."""
    channel_data: JsonObject = body.get("channel_data") or {}
    extra: JsonObject = {}
    continue_session = channel_data.get("continue_session")
    if continue_session is not None:
        extra["continue_session"] = continue_session
    return VumiMessage(
        to_addr=body.get("to"),
        from_addr=body.get("from"),
        group=body.get("group"),
        content=body.get("content"),
        transport_name=channel_id,
        session_event=_session_event(channel_data),
        helper_metadata=_helper_metadata(channel_data),
        **extra,
    )


def reply_message(channel_id: str, body: JsonObject, inbound: VumiMessage) -> VumiMessage:
    """A reply: addresses and transport details come from the inbound (body to/from ignored)."""
    channel_data: JsonObject = body.get("channel_data") or {}
    session_event = _session_event(channel_data)
    if session_event is None and channel_data.get("continue_session") is False:
        session_event = SessionEvent.CLOSE
    return VumiMessage(
        to_addr=inbound.from_addr,
        from_addr=inbound.to_addr,
        group=inbound.group,
        provider=inbound.provider,
        transport_type=inbound.transport_type,
        transport_metadata=dict(inbound.transport_metadata),
        in_reply_to=inbound.message_id,
        content=body.get("content"),
        transport_name=channel_id,
        session_event=session_event,
        helper_metadata=_helper_metadata(channel_data),
    )


def check_character_limit(content: str | None, limit: object) -> None:
    """Code points, against the channel's limit; null content counts as empty (fix B1)."""
    if not isinstance(limit, int) or isinstance(limit, bool):
        return
    length = len(content or "")
    if length > limit:
        raise MessageTooLongError(
            f"Message content {content!r} is of length {length}, which is greater than the "
            f"character limit of {limit}"
        )


def priority_of(body: JsonObject) -> int:
    """The schema admits 1-5 as an int or a one-digit string."""
    value = body.get("priority")
    return DEFAULT_PRIORITY if value is None else int(value)


def outbound_record(body: JsonObject, api_message: JsonObject, priority: int) -> JsonObject:
    """The stored send record: the API message plus event_url/event_auth_token/priority if given."""
    record = dict(api_message)
    for key in ("event_url", "event_auth_token"):
        if key in body:
            record[key] = body[key]
    if "priority" in body:
        record["priority"] = priority
    return record
