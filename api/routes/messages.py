"""Sending messages and reading their status (behaviour 2.8, 2.9 and 4)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quart import Blueprint

from api.channel_object import has_destination
from api.deps import api_context, state_store
from api.errors import ApiUsageError, MessageNotFoundError, envelope
from api.idempotency import idempotency_scope, requested_key, send_once
from api.outbound import (
    check_character_limit,
    expires_at_of,
    outbound_record,
    plain_message,
    priority_of,
    reply_message,
    set_expiry,
)
from api.queue_control import check_queue_room, effective_queue_limit
from api.routers import router_of_channel
from api.routes.body import read_body
from api.routes.channels import load_channel
from api.schemas import MESSAGE_SEND_VALIDATOR
from api.templates import check_template
from api.timeline import split_entries, timeline_entry
from ipc.broker import MAX_PRIORITY
from ipc.codec import encode_payload
from ipc.errors import StoreUnavailableError
from ipc.names import new_message_id
from ipc.payloads import VumiMessage, api_message
from ipc.state import OutboundWrites, RateCount

if TYPE_CHECKING:
    from quart import Response

    from api.deps import ApiContext

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

blueprint = Blueprint("messages", __name__)

_NO_DESTINATION = 'This channel has no "mo_url" or "amqp_queue"'


@dataclass(frozen=True, slots=True, kw_only=True)
class SendTarget:
    """Where a send goes and who else it concerns: the channel endpoint sends for the channel;
    a destination endpoint sends for the destination, through its router's channel."""

    channel_id: str
    #: Where `reply_to` is looked up, in order.
    reply_owners: tuple[str, ...]
    #: Every limit the content must fit (None: no limit).
    character_limits: tuple[object, ...]
    #: Added to the stored outbound record (who sent it, so its events go back there).
    record_extra: JsonObject = field(default_factory=dict)
    #: Besides the channel, who keeps a copy of the outbound record (message status).
    record_owners: tuple[str, ...] = ()
    #: Besides the channel, whose outbound rate counts the send.
    rate_owners: tuple[str, ...] = ()
    #: Whose idempotency keys the send's key is one of (the endpoint's channel/destination).
    owner_id: str | None = None
    #: Queued outbound messages of the channel beyond which the send gets 429.
    queue_limit: int | None = None

    @property
    def idempotency_owner(self) -> str:
        return self.owner_id or self.channel_id


async def _channel_with_destination(channel_id: str) -> tuple[JsonObject, str | None]:
    """The channel's properties and the router routing it (a routed channel has no
    destination of its own but can still be sent through)."""
    properties = await load_channel(channel_id)
    if has_destination(properties):
        return properties, None
    router_id = await router_of_channel(state_store(), channel_id)
    if router_id is None:
        raise ApiUsageError(_NO_DESTINATION)
    return properties, router_id


async def _build_message(context: ApiContext, target: SendTarget, body: JsonObject) -> VumiMessage:
    reply_to = body.get("reply_to")
    if reply_to is None:
        return plain_message(target.channel_id, body)
    for owner in target.reply_owners:
        inbound = await context.state_store().get_inbound(
            owner, reply_to, context.settings.inbound_message_ttl
        )
        if inbound is not None:
            return reply_message(target.channel_id, body, VumiMessage.model_validate(inbound))
    if context.settings.allow_expired_replies and body.get("to"):
        return plain_message(target.channel_id, body)
    raise MessageNotFoundError(f"Inbound message with id {reply_to} not found")


async def _publish(
    context: ApiContext, channel_id: str, message: VumiMessage, priority: int
) -> None:
    broker = context.queue_broker()
    queue = context.namespace.outbound_queue(channel_id)
    if queue not in context.declared_queues:
        await broker.declare_queue(queue, max_priority=MAX_PRIORITY)
        context.declared_queues.add(queue)
    await broker.publish(queue, encode_payload(message), priority=priority)


#: event_urls up to this long are remembered once they pass the check (a bounded memory).
_CACHED_URL_LENGTH = 2048


@functools.lru_cache(maxsize=1024)
def _checked_event_url(url: str, allowed_hosts: tuple[str, ...]) -> None:
    # Only a URL that passes is cached (lru_cache keeps no exception): senders tend to
    # give the same event_url every time, and parsing it is a measurable part of a send.
    check_template("event_url", url, allowed_hosts)


def check_event_url(context: ApiContext, body: JsonObject) -> None:
    """400 when the send's event_url is not a valid callback URL template (api.templates)."""
    url = body.get("event_url")
    if not isinstance(url, str):
        return
    allowed_hosts = tuple(context.settings.webhook_allowed_hosts)
    if len(url) > _CACHED_URL_LENGTH:
        check_template("event_url", url, allowed_hosts)
    else:
        _checked_event_url(url, allowed_hosts)


def check_addressed(body: JsonObject) -> None:
    if "to" not in body and "reply_to" not in body:
        raise ApiUsageError('Either "to" or "reply_to" must be specified')


@dataclass(frozen=True, slots=True)
class Submitted:
    """A send's answer: the API message object, and whether it repeats an earlier send's."""

    result: JsonObject
    replayed: bool = False

    def response(self) -> Response:
        headers = {"Idempotent-Replayed": "true"} if self.replayed else None
        return envelope(201, "message submitted", self.result, headers=headers)


async def submit_message(context: ApiContext, target: SendTarget, body: JsonObject) -> Submitted:
    """One send (behaviour 4), or the first one's answer when its idempotency key repeats."""
    key = requested_key(body)
    if key is None:
        return Submitted(await _submit(context, target, body))
    scope = idempotency_scope(target.idempotency_owner)
    result, replayed = await send_once(
        context.state_store(), scope, key, lambda: _submit(context, target, body)
    )
    return Submitted(result, replayed=replayed)


async def _submit(context: ApiContext, target: SendTarget, body: JsonObject) -> JsonObject:
    """Build, check, record and queue one send; the API message object."""
    message = await _build_message(context, target, body)
    for limit in target.character_limits:
        check_character_limit(message.content, limit)
    expires_at = expires_at_of(body)
    set_expiry(message, expires_at)
    priority = priority_of(body)
    channel_id = target.channel_id
    store = context.state_store()
    await check_queue_room(
        store, context.queue_broker(), context.namespace, channel_id, target.queue_limit
    )
    result = api_message(message, channel_id)
    record = {**outbound_record(body, result, priority), **target.record_extra}
    ttl = context.settings.outbound_message_ttl
    owners = (channel_id, *target.record_owners)
    accepted: JsonObject = {"priority": priority}
    if expires_at is not None:
        accepted["expires_at"] = expires_at
    # Every copy is written before the message is queued: its first event may be quick.
    await store.write_outbound(
        OutboundWrites(
            message_id=message.message_id,
            owners=owners,
            ttl=ttl,
            record=record,
            entry=(new_message_id(), timeline_entry("accepted", accepted)),
        )
    )
    await _publish(context, channel_id, message, priority)
    await _after_publish(context, target, message.message_id, owners)
    log.debug(
        "message queued",
        extra={"channel_id": channel_id, "msg_id": message.message_id, "priority": priority},
    )
    return result


async def _after_publish(
    context: ApiContext, target: SendTarget, message_id: str, owners: tuple[str, ...]
) -> None:
    """The "queued" stage and the outbound rate counts, in one store transaction."""
    settings = context.settings
    writes = OutboundWrites(
        message_id=message_id,
        owners=owners,
        ttl=settings.outbound_message_ttl,
        entry=(new_message_id(), timeline_entry("queued", {})),
        rates=tuple(
            RateCount.now(owner, "outbound", settings.metric_window)
            for owner in (target.channel_id, *target.rate_owners)
        ),
    )
    try:
        await context.state_store().write_outbound(writes)
    except StoreUnavailableError as exc:
        # The message is already queued; failing the request now would invite a duplicate.
        log.warning("queued stage and rate of message %s not recorded: %s", message_id, exc)


async def message_status_result(context: ApiContext, owner_id: str, message_id: str) -> JsonObject:
    """A sent message's events as recorded under `owner_id` (a channel or a destination)."""
    record = await context.state_store().get_outbound(
        owner_id, message_id, context.settings.outbound_message_ttl
    )
    events, timeline = split_entries(record.events if record is not None else [], owner_id)
    last = events[-1] if events else None
    return {
        "id": message_id,
        "last_event_type": last["event_type"] if last else None,
        "last_event_timestamp": last["timestamp"] if last else None,
        "events": events,
        "timeline": timeline,
    }


@blueprint.post("/channels/<channel_id>/messages/")
async def send_message(channel_id: str) -> Response:
    context = api_context()
    body = await read_body(MESSAGE_SEND_VALIDATOR)
    properties, router_id = await _channel_with_destination(channel_id)
    check_addressed(body)
    check_event_url(context, body)
    target = SendTarget(
        channel_id=channel_id,
        reply_owners=(channel_id,),
        character_limits=(properties.get("character_limit"),),
        rate_owners=(router_id,) if router_id is not None else (),
        queue_limit=effective_queue_limit(properties, context.settings.default_queue_limit),
    )
    return (await submit_message(context, target, body)).response()


@blueprint.get("/channels/<channel_id>/messages/<message_id>")
async def message_status(channel_id: str, message_id: str) -> Response:
    context = api_context()
    await _channel_with_destination(channel_id)
    result = await message_status_result(context, channel_id, message_id)
    return envelope(200, "message status", result)
