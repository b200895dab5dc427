"""Channel CRUD and restart: /channels/, /channels/{cid}, /channels/{cid}/restart (2.1-2.6)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from quart import Blueprint

from api import lifecycle
from api.channel_object import channel_object, has_destination, stored_properties
from api.deps import api_context, queue_broker, state_store
from api.errors import (
    ApiError,
    ApiUsageError,
    ChannelLimitError,
    ChannelNotFoundError,
    InvalidChannelConfigError,
    SupervisorUnavailableError,
    envelope,
)
from api.queue_control import queue_snapshot
from api.routers import StoreLease, router_of_channel
from api.routes.body import read_body
from api.schemas import CHANNEL_CREATE_VALIDATOR, CHANNEL_MODIFY_VALIDATOR
from api.templates import check_channel_templates
from ipc.names import new_channel_id

if TYPE_CHECKING:
    from quart import Response

    from api.deps import ApiContext

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

blueprint = Blueprint("channels", __name__)

#: Properties only the API reads: changing just these needs no channel restart.
_API_ONLY_KEYS = frozenset({"label", "metadata", "character_limit", "queue_limit"})


async def load_channel(channel_id: str) -> JsonObject:
    properties = await state_store().get_channel(channel_id)
    if properties is None:
        raise ChannelNotFoundError("")
    return properties


async def _render(context: ApiContext, channel_id: str, properties: JsonObject) -> JsonObject:
    store = state_store()
    queues = await queue_snapshot(store, queue_broker(), context.namespace, channel_id)
    return await channel_object(
        store, channel_id, properties, context.settings.metric_window, queues=queues
    )


async def _check(context: ApiContext, properties: JsonObject) -> None:
    """The checks a channel's properties must pass before they are saved."""
    known = await lifecycle.catalog(context.supervisor)
    lifecycle.check_type_and_config(known, properties.get("type"), properties.get("config"))
    if properties.get("amqp_queue") is not None and context.settings.amqp is None:
        raise ApiUsageError(
            "amqp_queue needs a RabbitMQ broker: this gateway runs the embedded queue "
            "(configure `amqp` to use AMQP integration)"
        )


class ChannelsBusyError(ApiError):
    status = 503
    description = "channels busy"
    error_type = "ChannelsBusy"


#: Creates count and save one at a time in every API worker together, so that two cannot
#: both take the last place. That takes milliseconds: a lease 30 s old is a dead worker's.
CREATE_LEASE: Final = StoreLease(
    "api:channel_create_lease",
    ttl=30.0,
    wait=10.0,
    busy=ChannelsBusyError,
    doing="creating a channel",
)


async def _save_new_channel(context: ApiContext, properties: JsonObject) -> str:
    """Save a new channel unless max_channels exist already (409)."""
    store = state_store()
    limit = context.settings.max_channels
    async with CREATE_LEASE.hold():
        count = len(await store.list_channels())
        if count >= limit:
            raise ChannelLimitError(
                f"this gateway has {count} channels and allows at most {limit} (max_channels): "
                "delete one, or raise --max-channels"
            )
        channel_id = new_channel_id()
        await store.save_channel(channel_id, properties)
    return channel_id


@blueprint.get("/channels/")
async def list_channels() -> Response:
    return envelope(200, "channels listed", await state_store().list_channels())


@blueprint.post("/channels/")
async def create_channel() -> Response:
    context = api_context()
    body = await read_body(CHANNEL_CREATE_VALIDATOR)
    properties = stored_properties(body)
    check_channel_templates(properties)
    await _check(context, properties)
    store = state_store()
    channel_id = await _save_new_channel(context, properties)
    try:
        await lifecycle.start_channel(context.supervisor, channel_id)
    except InvalidChannelConfigError:
        await store.delete_channel(channel_id)
        raise
    except SupervisorUnavailableError as exc:
        # Saved is saved: the supervisor starts it when it can, and the status shows why not.
        log.warning("channel %s created but not started: %s", channel_id, exc.message)
    return envelope(201, "channel created", await _render(context, channel_id, properties))


@blueprint.get("/channels/<channel_id>")
async def get_channel(channel_id: str) -> Response:
    properties = await load_channel(channel_id)
    return envelope(200, "channel found", await _render(api_context(), channel_id, properties))


@blueprint.post("/channels/<channel_id>")
async def modify_channel(channel_id: str) -> Response:
    context = api_context()
    body = await read_body(CHANNEL_MODIFY_VALIDATOR)
    previous = await load_channel(channel_id)
    changes = stored_properties(body)
    check_channel_templates(changes)
    merged = {**previous, **changes}
    if "type" in changes or "config" in changes or "amqp_queue" in changes:
        await _check(context, merged)
    store = state_store()
    if ("mo_url" in changes or "amqp_queue" in changes) and has_destination(merged):
        router_id = await router_of_channel(store, channel_id)
        if router_id is not None:
            raise ApiUsageError(
                f"Router {router_id} routes channel {channel_id}: a routed channel has no "
                "mo_url or amqp_queue of its own (its router's destinations have them)"
            )
    await store.save_channel(channel_id, merged)
    if any(key not in _API_ONLY_KEYS and _changed(previous, merged, key) for key in changes):
        await _apply(context, channel_id, previous)
    return envelope(200, "channel updated", await _render(context, channel_id, merged))


def _changed(previous: JsonObject, merged: JsonObject, key: str) -> bool:
    # Key presence matters too: `"mo_url": null` still gives the channel a destination.
    return key not in previous or previous[key] != merged[key]


async def _apply(context: ApiContext, channel_id: str, previous: JsonObject) -> None:
    """Restart the channel with its new properties; if it refuses them, put the old ones back."""
    try:
        await lifecycle.start_channel(context.supervisor, channel_id)
    except SupervisorUnavailableError as exc:
        log.warning("channel %s updated but not restarted: %s", channel_id, exc.message)
    except InvalidChannelConfigError:
        await state_store().save_channel(channel_id, previous)
        try:
            await lifecycle.start_channel(context.supervisor, channel_id)
        except (InvalidChannelConfigError, SupervisorUnavailableError) as exc:
            log.error(
                "channel %s did not restart with its previous properties: %s", channel_id, exc
            )
        raise


@blueprint.delete("/channels/<channel_id>")
async def delete_channel(channel_id: str) -> Response:
    context = api_context()
    await load_channel(channel_id)
    router_id = await router_of_channel(state_store(), channel_id)
    if router_id is not None:
        raise ApiUsageError(
            f"Router {router_id} routes channel {channel_id}: delete the router first "
            "(or change its config to route other channels)"
        )
    await lifecycle.stop_channel(context.supervisor, context.settings, channel_id)
    await state_store().delete_channel(channel_id)
    broker = queue_broker()
    for queue in context.namespace.channel_queues(channel_id):
        await broker.delete_queue(queue)
        context.declared_queues.discard(queue)
    return envelope(200, "channel deleted", {})


@blueprint.post("/channels/<channel_id>/restart")
async def restart_channel(channel_id: str) -> Response:
    context = api_context()
    await load_channel(channel_id)
    await lifecycle.restart_channel(context.supervisor, context.settings, channel_id)
    return envelope(200, "channel restarted", {})
