"""Router destinations: CRUD, logs, sending and message status (behaviour 10.3, 10.5, 10.6).

/routers/{rid}/destinations/                     GET list, POST create
/routers/{rid}/destinations/{did}                GET, PUT, PATCH, DELETE
/routers/{rid}/destinations/{did}/logs           GET
/routers/{rid}/destinations/{did}/messages/      POST (also without the slash, as documented)
/routers/{rid}/destinations/{did}/messages/{mid} GET
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio
from quart import Blueprint

from api.deps import api_context, state_store
from api.errors import ApiUsageError, envelope
from api.logs import read_logs
from api.queue_control import effective_queue_limit
from api.routers import (
    InvalidRouterConfigError,
    InvalidRouterDestinationConfigError,
    StoredRouter,
    apply,
    check_amqp_queue,
    check_defaults,
    check_destination_config,
    destination_object,
    load_destination,
    load_destinations,
    load_router,
    purge_destination,
    router_catalog,
    routers_lock,
    stored_properties,
)
from api.routes.body import read_body
from api.routes.channels import load_channel
from api.routes.logs import _requested_count as requested_count
from api.routes.messages import (
    SendTarget,
    check_addressed,
    message_status_result,
    submit_message,
)
from api.schemas import (
    DESTINATION_CREATE_VALIDATOR,
    DESTINATION_PATCH_VALIDATOR,
    MESSAGE_SEND_VALIDATOR,
)
from api.templates import check_template
from ipc.names import destinations_scope, new_destination_id

if TYPE_CHECKING:
    from quart import Response

    from api.deps import ApiContext

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

blueprint = Blueprint("destinations", __name__)

_BASE = "/routers/<router_id>/destinations"


async def _check(
    context: ApiContext, router: StoredRouter, destination_id: str, properties: JsonObject
) -> None:
    """The destination's config suits its router's type, with one default at most."""
    catalog = await router_catalog(context)
    schemas = catalog.get(router.type)
    if schemas is None:
        raise InvalidRouterConfigError(
            f"Router {router.router_id} has type {router.type}, which this gateway no longer "
            f"has (available: {', '.join(sorted(catalog))})"
        )
    check_destination_config(schemas, properties.get("config"))
    check_template("mo_url", properties.get("mo_url"))
    check_amqp_queue(context, properties)
    destinations = await load_destinations(state_store(), router.router_id)
    destinations[destination_id] = properties
    check_defaults(schemas, router.router_id, destinations)


async def _save(
    context: ApiContext,
    router: StoredRouter,
    destination_id: str,
    properties: JsonObject,
    previous: JsonObject | None,
) -> None:
    """Store the destination and apply it; a channel refusing it gets `previous` back."""
    store = state_store()
    scope = destinations_scope(router.router_id)
    await store.kv_put(scope, destination_id, properties)

    async def restore() -> None:
        if previous is None:
            await store.kv_delete(scope, destination_id)
        else:
            await store.kv_put(scope, destination_id, previous)

    await apply(
        context, router.channels, rollback=restore, error=InvalidRouterDestinationConfigError
    )


@blueprint.get(f"{_BASE}/")
async def list_destinations(router_id: str) -> Response:
    store = state_store()
    await load_router(store, router_id)
    destinations = await load_destinations(store, router_id)
    return envelope(200, "destinations retrieved", sorted(destinations))


@blueprint.post(f"{_BASE}/")
async def create_destination(router_id: str) -> Response:
    context = api_context()
    body = await read_body(DESTINATION_CREATE_VALIDATOR)
    async with routers_lock():
        router = await load_router(state_store(), router_id)
        destination_id = new_destination_id()
        properties = stored_properties(body)
        await _check(context, router, destination_id, properties)
        await _save(context, router, destination_id, properties, None)
    result = await destination_object(context, destination_id, properties)
    return envelope(201, "destination created", result)


@blueprint.get(f"{_BASE}/<destination_id>")
async def get_destination(router_id: str, destination_id: str) -> Response:
    store = state_store()
    await load_router(store, router_id)
    properties = await load_destination(store, router_id, destination_id)
    result = await destination_object(api_context(), destination_id, properties)
    return envelope(200, "destination found", result)


async def _change(
    router_id: str, destination_id: str, body: JsonObject, *, merge: bool
) -> Response:
    context = api_context()
    async with routers_lock():
        router = await load_router(state_store(), router_id)
        previous = await load_destination(state_store(), router_id, destination_id)
        changes = stored_properties(body)
        properties = {**previous, **changes} if merge else changes
        await _check(context, router, destination_id, properties)
        await _save(context, router, destination_id, properties, previous)
    result = await destination_object(context, destination_id, properties)
    return envelope(200, "destination updated", result)


@blueprint.put(f"{_BASE}/<destination_id>")
async def replace_destination(router_id: str, destination_id: str) -> Response:
    body = await read_body(DESTINATION_CREATE_VALIDATOR)
    return await _change(router_id, destination_id, body, merge=False)


@blueprint.patch(f"{_BASE}/<destination_id>")
async def update_destination(router_id: str, destination_id: str) -> Response:
    body = await read_body(DESTINATION_PATCH_VALIDATOR)
    return await _change(router_id, destination_id, body, merge=True)


@blueprint.delete(f"{_BASE}/<destination_id>")
async def delete_destination(router_id: str, destination_id: str) -> Response:
    """The router's channels restart without it, then its messages, rates and queues go."""
    context = api_context()
    store = state_store()
    async with routers_lock():
        router = await load_router(store, router_id)
        await load_destination(store, router_id, destination_id)
        await store.kv_delete(destinations_scope(router_id), destination_id)
        await apply(context, router.channels)
        await purge_destination(context, destination_id)
    return envelope(200, "destination deleted", {})


@blueprint.get(f"{_BASE}/<destination_id>/logs")
async def destination_logs(router_id: str, destination_id: str) -> Response:
    settings = api_context().settings
    n = requested_count(settings.max_logs)
    store = state_store()
    await load_router(store, router_id)
    await load_destination(store, router_id, destination_id)
    entries = await trio.to_thread.run_sync(read_logs, settings.logging_path, destination_id, n)
    return envelope(200, "logs retrieved", entries)


@blueprint.post(f"{_BASE}/<destination_id>/messages/")
@blueprint.post(f"{_BASE}/<destination_id>/messages")
async def send_destination_message(router_id: str, destination_id: str) -> Response:
    """Sent through the router's (first) channel, recorded for the destination: replies are
    looked up under it first, its character_limit applies (with the channel's), and the
    message's events come back to it."""
    context = api_context()
    body = await read_body(MESSAGE_SEND_VALIDATOR)
    store = state_store()
    router = await load_router(store, router_id)
    destination = await load_destination(store, router_id, destination_id)
    if not router.channels:
        raise ApiUsageError(f"Router {router_id} routes no channel to send through")
    channel_id = router.channels[0]
    check_addressed(body)
    check_template("event_url", body.get("event_url"))
    channel = await load_channel(channel_id)
    target = SendTarget(
        channel_id=channel_id,
        reply_owners=(destination_id, channel_id),
        character_limits=(destination.get("character_limit"), channel.get("character_limit")),
        record_extra={"destination_id": destination_id, "router_id": router_id},
        record_owners=(destination_id,),
        rate_owners=(destination_id, router_id),
        owner_id=destination_id,
        queue_limit=effective_queue_limit(channel, context.settings.default_queue_limit),
    )
    return (await submit_message(context, target, body)).response()


@blueprint.get(f"{_BASE}/<destination_id>/messages/<message_id>")
async def destination_message_status(
    router_id: str, destination_id: str, message_id: str
) -> Response:
    store = state_store()
    await load_router(store, router_id)
    await load_destination(store, router_id, destination_id)
    result = await message_status_result(api_context(), destination_id, message_id)
    return envelope(200, "message status", result)
