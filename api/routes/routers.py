"""Router CRUD and logs: /routers/, /routers/{rid}, /routers/{rid}/logs (behaviour 10.2, 9.3).

A change is checked, saved, then applied by restarting the channels the router routes
(before and after the change); a channel that refuses it gets the previous router back.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio
from quart import Blueprint

from api.deps import api_context, state_store
from api.errors import envelope
from api.logs import read_logs
from api.routers import (
    InvalidRouterConfigError,
    StoredRouter,
    apply,
    check_channels,
    check_defaults,
    check_destination_config,
    check_router_config,
    list_router_ids,
    load_destinations,
    load_router,
    purge_destination,
    router_catalog,
    router_object,
    router_type,
    routers_lock,
    save_router,
    stored_properties,
)
from api.routes.body import read_body
from api.routes.logs import _requested_count as requested_count
from api.schemas import ROUTER_CREATE_VALIDATOR, ROUTER_PATCH_VALIDATOR
from ipc.names import ROUTERS_SCOPE, new_router_id

if TYPE_CHECKING:
    from quart import Response

    from api.deps import ApiContext

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

blueprint = Blueprint("routers", __name__)


async def _checked(
    context: ApiContext, router_id: str, properties: JsonObject, previous: StoredRouter | None
) -> StoredRouter:
    """The router `properties` would make, validated against its type and the channels."""
    catalog = await router_catalog(context)
    schemas = router_type(catalog, properties.get("type"))
    config, channels = check_router_config(schemas, properties.get("config"))
    if not channels:
        raise InvalidRouterConfigError("The router config names no channel to route")
    await check_channels(state_store(), router_id, channels)
    if previous is not None and previous.type != properties.get("type"):
        # The destinations stay: they must suit the new type.
        destinations = await load_destinations(state_store(), router_id)
        for did, destination in destinations.items():
            check_destination_config(schemas, destination.get("config"), f"Destination {did}: ")
        check_defaults(schemas, router_id, destinations)
    return StoredRouter(router_id, {**properties, "config": config}, channels)


@blueprint.get("/routers/")
async def list_routers() -> Response:
    return envelope(200, "routers retrieved", await list_router_ids(state_store()))


@blueprint.post("/routers/")
async def create_router() -> Response:
    context = api_context()
    body = await read_body(ROUTER_CREATE_VALIDATOR)
    store = state_store()
    async with routers_lock():
        router = await _checked(context, new_router_id(), stored_properties(body), None)
        await save_router(store, router)

        async def forget() -> None:
            await store.kv_delete(ROUTERS_SCOPE, router.router_id)

        await apply(context, router.channels, rollback=forget)
    return envelope(201, "router created", await router_object(context, router))


@blueprint.get("/routers/<router_id>")
async def get_router(router_id: str) -> Response:
    router = await load_router(state_store(), router_id)
    return envelope(200, "router found", await router_object(api_context(), router))


async def _change(router_id: str, body: JsonObject, *, merge: bool) -> Response:
    context = api_context()
    store = state_store()
    async with routers_lock():
        previous = await load_router(store, router_id)
        changes = stored_properties(body)
        properties = {**previous.properties, **changes} if merge else changes
        router = await _checked(context, router_id, properties, previous)
        await save_router(store, router)

        async def restore() -> None:
            await save_router(store, previous)

        await apply(context, [*previous.channels, *router.channels], rollback=restore)
    return envelope(200, "router updated", await router_object(context, router))


@blueprint.put("/routers/<router_id>")
async def replace_router(router_id: str) -> Response:
    body = await read_body(ROUTER_CREATE_VALIDATOR)
    return await _change(router_id, body, merge=False)


@blueprint.patch("/routers/<router_id>")
async def update_router(router_id: str) -> Response:
    body = await read_body(ROUTER_PATCH_VALIDATOR)
    return await _change(router_id, body, merge=True)


@blueprint.delete("/routers/<router_id>")
async def delete_router(router_id: str) -> Response:
    """Stop routing (the channels restart without the router), then remove the router's
    state and its destinations' (messages, rates, queues)."""
    context = api_context()
    store = state_store()
    async with routers_lock():
        router = await load_router(store, router_id)
        destinations = await load_destinations(store, router_id)
        await store.kv_delete(ROUTERS_SCOPE, router_id)
        await apply(context, router.channels)
        # Also removes the destinations' records: their scope is "{router_id}:destinations".
        await store.delete_channel(router_id)
        for destination_id in destinations:
            await purge_destination(context, destination_id)
    log.info("router %s deleted with %d destination(s)", router_id, len(destinations))
    return envelope(200, "router deleted", {})


@blueprint.get("/routers/<router_id>/logs")
async def router_logs(router_id: str) -> Response:
    settings = api_context().settings
    n = requested_count(settings.max_logs)
    await load_router(state_store(), router_id)
    entries = await trio.to_thread.run_sync(read_logs, settings.logging_path, router_id, n)
    return envelope(200, "logs retrieved", entries)
