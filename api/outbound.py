"""Turn a validated send body into the vumi message to queue (behaviour 4.1-4.5). Pure functions."""

from __future__ import annotations

import datetime as dt
from typing import Any

from api.errors import ApiUsageError, MessageTooLongError
from ipc.payloads import SessionEvent, VumiMessage, vumi_timestamp

JsonObject = dict[str, Any]

#: channel_data keys that become vumi fields instead of helper_metadata.
_SPECIAL_KEYS = ("continue_session", "session_event")

DEFAULT_PRIORITY = 1

#: Where a send's expiry travels in the vumi message (the outbound actor reads it there).
EXPIRES_AT_KEY = "expires_at"
#: Vumi timestamps have four-digit years; nothing sent before 1970 is still queued anyway.
MIN_EXPIRY_YEAR = 1970


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


def _parse_expires_at(text: str) -> dt.datetime:
    """A vumi timestamp or ISO 8601 date-time; without an offset it is UTC."""
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ApiUsageError(
            f"expires_at {text!r} is not a date-time: use UTC YYYY-MM-DD HH:MM:SS[.ffffff] "
            "or ISO 8601 with an offset"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    try:
        moment = moment.astimezone(dt.UTC)
    except OverflowError:
        moment = dt.datetime.min.replace(tzinfo=dt.UTC)
    if not MIN_EXPIRY_YEAR <= moment.year <= dt.MAXYEAR:
        raise ApiUsageError(f"expires_at {text!r} is not between the years 1970 and 9999")
    return moment


def expires_at_of(body: JsonObject, now: dt.datetime | None = None) -> str | None:
    """The send's expiry as a vumi timestamp (UTC), from `validity` seconds or `expires_at`.

    A time already past is accepted: the message is then rejected as expired, not sent.
    """
    validity = body.get("validity")
    expires_at = body.get("expires_at")
    if validity is not None and expires_at is not None:
        raise ApiUsageError('Give "validity" or "expires_at", not both')
    if validity is not None:
        start = now or dt.datetime.now(dt.UTC)
        try:
            return vumi_timestamp(start + dt.timedelta(seconds=validity))
        except OverflowError:
            raise ApiUsageError(f"validity {validity} s is too far in the future") from None
    if isinstance(expires_at, str):
        return vumi_timestamp(_parse_expires_at(expires_at))
    return None


def set_expiry(message: VumiMessage, expires_at: str | None) -> None:
    if expires_at is not None:
        message.routing_metadata[EXPIRES_AT_KEY] = expires_at
