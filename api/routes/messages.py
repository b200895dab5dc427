"""Sending messages and reading their status (behaviour 2.8, 2.9 and 4)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from quart import Blueprint

from api.channel_object import current_bucket, has_destination
from api.deps import api_context, queue_broker, state_store
from api.errors import ApiUsageError, MessageNotFoundError, envelope
from api.outbound import (
    check_character_limit,
    outbound_record,
    plain_message,
    priority_of,
    reply_message,
)
from api.routes.body import read_body
from api.routes.channels import load_channel
from api.schemas import MESSAGE_SEND_VALIDATOR
from ipc.broker import MAX_PRIORITY
from ipc.codec import encode_payload
from ipc.errors import StoreUnavailableError
from ipc.payloads import VumiEvent, VumiMessage, api_event, api_message

if TYPE_CHECKING:
    from quart import Response

    from api.deps import ApiContext

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

blueprint = Blueprint("messages", __name__)

_NO_DESTINATION = 'This channel has no "mo_url" or "amqp_queue"'


async def _channel_with_destination(channel_id: str) -> JsonObject:
    properties = await load_channel(channel_id)
    if not has_destination(properties):
        raise ApiUsageError(_NO_DESTINATION)
    return properties


async def _build_message(context: ApiContext, channel_id: str, body: JsonObject) -> VumiMessage:
    reply_to = body.get("reply_to")
    if reply_to is None:
        return plain_message(channel_id, body)
    inbound = await state_store().get_inbound(
        channel_id, reply_to, context.settings.inbound_message_ttl
    )
    if inbound is not None:
        return reply_message(channel_id, body, VumiMessage.model_validate(inbound))
    if context.settings.allow_expired_replies and body.get("to"):
        return plain_message(channel_id, body)
    raise MessageNotFoundError(f"Inbound message with id {reply_to} not found")


async def _publish(
    context: ApiContext, channel_id: str, message: VumiMessage, priority: int
) -> None:
    broker = queue_broker()
    queue = context.namespace.outbound_queue(channel_id)
    if queue not in context.declared_queues:
        await broker.declare_queue(queue, max_priority=MAX_PRIORITY)
        context.declared_queues.add(queue)
    await broker.publish(queue, encode_payload(message), priority=priority)


async def _count_outbound(context: ApiContext, channel_id: str) -> None:
    window = context.settings.metric_window
    try:
        await state_store().incr_rate(
            channel_id, "outbound", current_bucket(window), math.ceil(2 * window)
        )
    except StoreUnavailableError as exc:
        # The message is already queued; failing the request now would invite a duplicate.
        log.warning("outbound rate of channel %s not counted: %s", channel_id, exc)


@blueprint.post("/channels/<channel_id>/messages/")
async def send_message(channel_id: str) -> Response:
    context = api_context()
    body = await read_body(MESSAGE_SEND_VALIDATOR)
    properties = await _channel_with_destination(channel_id)
    if "to" not in body and "reply_to" not in body:
        raise ApiUsageError('Either "to" or "reply_to" must be specified')
    message = await _build_message(context, channel_id, body)
    check_character_limit(message.content, properties.get("character_limit"))
    priority = priority_of(body)
    result = api_message(message, channel_id)
    await state_store().put_outbound(
        channel_id,
        message.message_id,
        outbound_record(body, result, priority),
        context.settings.outbound_message_ttl,
    )
    await _publish(context, channel_id, message, priority)
    await _count_outbound(context, channel_id)
    log.debug(
        "message queued",
        extra={"channel_id": channel_id, "msg_id": message.message_id, "priority": priority},
    )
    return envelope(201, "message submitted", result)


@blueprint.get("/channels/<channel_id>/messages/<message_id>")
async def message_status(channel_id: str, message_id: str) -> Response:
    context = api_context()
    await _channel_with_destination(channel_id)
    record = await state_store().get_outbound(
        channel_id, message_id, context.settings.outbound_message_ttl
    )
    stored = record.events if record is not None else []
    events = [api_event(VumiEvent.model_validate(event), channel_id) for event in stored]
    # Stable: events with equal timestamps keep the order they were stored in.
    events.sort(key=lambda event: event["timestamp"])
    last = events[-1] if events else None
    return envelope(
        200,
        "message status",
        {
            "id": message_id,
            "last_event_type": last["event_type"] if last else None,
            "last_event_timestamp": last["timestamp"] if last else None,
            "events": events,
        },
    )
