"""Routers and destinations on the API side: their errors, storage, validation, response objects,
and how a change is applied (restarting the routed channels, which run the routers).

    ApiError
    ├── InvalidRouterTypeError                 400 invalid router type
    ├── InvalidRouterConfigError               400 invalid router config
    ├── InvalidRouterDestinationConfigError    400 invalid router destination config
    ├── RouterNotFoundError                    404 router not found
    └── DestinationNotFoundError               404 destination not found

Stored (ipc.state keyed records): scope "routers", key = router id, value =
{"properties": {type, config, label?, metadata?}, "channels": [channel ids it routes]};
scope "{rid}:destinations", key = destination id, value = the destination as supplied.
"""

from __future__ import annotations

import copy
import logging
import os
import uuid
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio
from quart import current_app

from api import lifecycle
from api.channel_object import has_destination, read_rates
from api.deps import queue_broker, state_store
from api.errors import (
    ApiError,
    ApiUsageError,
    InvalidChannelConfigError,
    SupervisorUnavailableError,
)
from api.schemas import router_config_problems
from api.store_wait import RELEASE_GRACE, poll_store
from api.supervisor_link import SupervisorUnreachableError
from ipc.errors import RemoteError, StoreUnavailableError
from ipc.messages import ROUTER_CHANNEL_KEYWORD, ROUTER_DEFAULT_KEYWORD
from ipc.names import ROUTERS_SCOPE, destinations_scope

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

    from api.deps import ApiContext
    from api.supervisor_link import RouterCatalog
    from ipc.messages import RouterSchemas
    from ipc.state import StateStore

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

#: Keys the API owns in router and destination objects; never stored.
RESERVED_KEYS = frozenset({"id", "status"})
#: The store lease serializing router changes across API workers (see routers_lock).
LEASE_SCOPE: Final = "api:routers_lease"
LEASE_KEY: Final = "lease"
#: Longer than any router change takes (each routed channel restarts within ~20 s).
LEASE_TTL: Final = 300.0
#: Seconds a change waits for another worker's before 503.
LEASE_WAIT: Final = 30.0


class InvalidRouterTypeError(ApiError):
    description = "invalid router type"
    error_type = "InvalidRouterType"


class InvalidRouterConfigError(ApiError):
    description = "invalid router config"
    error_type = "InvalidRouterConfig"


class InvalidRouterDestinationConfigError(ApiError):
    description = "invalid router destination config"
    error_type = "InvalidRouterDestinationConfig"


class RouterNotFoundError(ApiError):
    status = 404
    description = "router not found"
    error_type = "RouterNotFound"


class DestinationNotFoundError(ApiError):
    status = 404
    description = "destination not found"
    error_type = "DestinationNotFound"


@dataclass(frozen=True, slots=True)
class StoredRouter:
    router_id: str
    properties: JsonObject
    channels: list[str]

    @property
    def type(self) -> str:
        return str(self.properties.get("type"))


class RoutersBusyError(ApiError):
    status = 503
    description = "routers busy"
    error_type = "RoutersBusy"


@dataclass(frozen=True, slots=True)
class StoreLease:
    """A lock every API worker shares: one entry in the store, under `scope`.

    Holders in one worker queue on a trio.Lock; across workers they take the entry with
    kv_put_if_absent (of racing workers exactly one wins) and drop it on exit. A worker that
    dies holding it blocks the others until `ttl` passes; a holder that waits `wait` seconds
    gets `busy` (a 503) and "Another API worker has been {doing} for {wait} s".
    """

    scope: str
    ttl: float
    wait: float
    busy: type[ApiError]
    doing: str

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        local: trio.Lock = current_app.extensions.setdefault(
            f"junebug.lease:{self.scope}", trio.Lock()
        )
        store = state_store()
        async with local:
            token = uuid.uuid4().hex
            await self._take(store, token)
            try:
                yield
            finally:
                with trio.move_on_after(RELEASE_GRACE, shield=True):
                    await self._drop(store, token)

    async def _take(self, store: StateStore, token: str) -> None:
        async def take() -> bool | None:
            entry = self._entry(token)
            return await store.kv_put_if_absent(self.scope, LEASE_KEY, entry, self.ttl) or None

        def busy() -> ApiError:
            return self.busy(
                f"Another API worker has been {self.doing} for {self.wait:g} s; retry later"
            )

        await poll_store(take, wait=self.wait, give_up=busy)

    @staticmethod
    def _entry(token: str) -> JsonObject:
        return {"token": token, "pid": os.getpid()}

    async def _drop(self, store: StateStore, token: str) -> None:
        try:
            # Only ours: a lease that outlived its ttl may have passed to another worker.
            await store.kv_delete_if(self.scope, LEASE_KEY, self._entry(token))
        except StoreUnavailableError as exc:
            log.warning("lease %s not released (it expires in %g s): %s", self.scope, self.ttl, exc)


_ROUTERS_LEASE: Final = StoreLease(
    LEASE_SCOPE, ttl=LEASE_TTL, wait=LEASE_WAIT, busy=RoutersBusyError, doing="changing routers"
)


def routers_lock() -> AbstractAsyncContextManager[None]:
    """Router changes run one at a time, in every API worker together: each checks what the
    others write (one router per channel, one default destination) before writing."""
    return _ROUTERS_LEASE.hold()


# --- storage ------------------------------------------------------------------------------


async def list_router_ids(store: StateStore) -> list[str]:
    return sorted(await store.kv_items(ROUTERS_SCOPE))


def _stored(router_id: str, record: JsonObject) -> StoredRouter:
    channels = record.get("channels")
    return StoredRouter(
        router_id,
        record.get("properties") or {},
        [c for c in channels if isinstance(c, str)] if isinstance(channels, list) else [],
    )


async def load_router(store: StateStore, router_id: str) -> StoredRouter:
    record = await store.kv_get(ROUTERS_SCOPE, router_id)
    if record is None:
        raise RouterNotFoundError(f"Router with ID {router_id} cannot be found")
    return _stored(router_id, record)


async def save_router(store: StateStore, router: StoredRouter) -> None:
    record = {"properties": router.properties, "channels": router.channels}
    await store.kv_put(ROUTERS_SCOPE, router.router_id, record)


async def router_of_channel(store: StateStore, channel_id: str) -> str | None:
    """The router routing `channel_id`, if any."""
    for router_id, record in (await store.kv_items(ROUTERS_SCOPE)).items():
        if channel_id in _stored(router_id, record).channels:
            return router_id
    return None


async def load_destinations(store: StateStore, router_id: str) -> dict[str, JsonObject]:
    return await store.kv_items(destinations_scope(router_id))


async def load_destination(store: StateStore, router_id: str, destination_id: str) -> JsonObject:
    found = await store.kv_get(destinations_scope(router_id), destination_id)
    if found is None:
        raise DestinationNotFoundError(
            f"Cannot find destination with ID {destination_id} for router {router_id}"
        )
    return found


def stored_properties(body: JsonObject) -> JsonObject:
    return {key: value for key, value in body.items() if key not in RESERVED_KEYS}


# --- validation ---------------------------------------------------------------------------


async def router_catalog(context: ApiContext) -> RouterCatalog:
    try:
        with trio.fail_after(lifecycle.CATALOG_TIMEOUT):
            return await context.supervisor.router_catalog()
    except (RemoteError, SupervisorUnreachableError) as exc:
        raise SupervisorUnavailableError(f"could not get the router types: {exc}") from exc
    except trio.TooSlowError as exc:
        raise SupervisorUnavailableError(
            "could not get the router types: no answer in time"
        ) from exc


def router_type(catalog: RouterCatalog, kind: object) -> RouterSchemas:
    if not isinstance(kind, str) or kind not in catalog:
        choices = ", ".join(sorted(catalog))
        raise InvalidRouterTypeError(f"Invalid router type {kind}, must be one of: {choices}")
    return catalog[kind]


def _marked(schema: JsonObject, keyword: str) -> list[str]:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return []
    return [
        name
        for name, spec in properties.items()
        if isinstance(spec, dict) and spec.get(keyword) is True
    ]


def _canonical(value: object) -> object:
    """Channel ids as the store keeps them: lower-case, hyphenated (the schema checked them)."""
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            return value
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return value


def check_router_config(schemas: RouterSchemas, given: object) -> tuple[JsonObject, list[str]]:
    """The config with its channel ids canonical, and those channels; 400 when invalid."""
    problems = router_config_problems(schemas.config, given)
    if not problems and not isinstance(given, dict):
        problems = [f"{given!r} is not of type 'object'"]
    if problems:
        raise InvalidRouterConfigError("; ".join(problems))
    assert isinstance(given, dict)
    config: JsonObject = copy.deepcopy(given)
    channels: list[str] = []
    for name in _marked(schemas.config, ROUTER_CHANNEL_KEYWORD):
        if name not in config:
            continue
        config[name] = _canonical(config[name])
        values = config[name] if isinstance(config[name], list) else [config[name]]
        channels += [v for v in values if isinstance(v, str) and v not in channels]
    return config, channels


async def check_channels(store: StateStore, router_id: str | None, channels: list[str]) -> None:
    """Each channel exists, has no destination of its own and no other router (10.4)."""
    for channel_id in channels:
        properties = await store.get_channel(channel_id)
        if properties is None:
            raise InvalidRouterConfigError(f"Channel {channel_id} does not exist")
        if has_destination(properties):
            raise InvalidRouterConfigError(
                f"Channel {channel_id} already has a destination specified"
            )
        other = await router_of_channel(store, channel_id)
        if other is not None and other != router_id:
            raise InvalidRouterConfigError(
                f"Router {other} is already routing channel {channel_id}"
            )


def check_destination_config(schemas: RouterSchemas, config: object, where: str = "") -> None:
    problems = router_config_problems(schemas.destination_config, config)
    if problems:
        raise InvalidRouterDestinationConfigError(where + "; ".join(problems))


def check_defaults(
    schemas: RouterSchemas, router_id: str, destinations: dict[str, JsonObject]
) -> None:
    """At most one destination of a router is its default."""
    fields = _marked(schemas.destination_config, ROUTER_DEFAULT_KEYWORD)
    defaults = sorted(
        did
        for did, destination in destinations.items()
        if isinstance(config := destination.get("config"), dict)
        and any(config.get(name) is True for name in fields)
    )
    if len(defaults) > 1:
        raise InvalidRouterDestinationConfigError(
            f"Router {router_id} may have only one default destination; the defaults would "
            f"be {', '.join(defaults)}"
        )


def check_amqp_queue(context: ApiContext, properties: JsonObject) -> None:
    if properties.get("amqp_queue") is not None and context.settings.amqp is None:
        raise ApiUsageError(
            "amqp_queue needs a RabbitMQ broker: this gateway runs the embedded queue "
            "(configure `amqp` to use AMQP integration)"
        )


# --- response objects ---------------------------------------------------------------------


async def router_object(context: ApiContext, router: StoredRouter) -> JsonObject:
    result = copy.deepcopy(router.properties)
    result["id"] = router.router_id
    result["status"] = await read_rates(
        state_store(), router.router_id, context.settings.metric_window
    )
    return result


async def destination_object(
    context: ApiContext, destination_id: str, properties: JsonObject
) -> JsonObject:
    result = copy.deepcopy(properties)
    result["id"] = destination_id
    result["status"] = await read_rates(
        state_store(), destination_id, context.settings.metric_window
    )
    return result


# --- applying changes ---------------------------------------------------------------------


async def apply(
    context: ApiContext,
    channels: Iterable[str],
    *,
    rollback: Callable[[], Awaitable[None]] | None = None,
    error: type[ApiError] = InvalidRouterConfigError,
) -> None:
    """Restart the routed channels so that they run the new routing.

    A channel that refuses it (its process exits with a config error) gets `rollback` run,
    is restarted as it was, and the request fails with `error` and the channel's reason.
    A supervisor that cannot be reached is logged: the change applies at the next start.
    """
    for channel_id in dict.fromkeys(channels):
        try:
            await lifecycle.start_channel(context.supervisor, channel_id)
        except SupervisorUnavailableError as exc:
            log.warning("routing of channel %s saved but not applied: %s", channel_id, exc.message)
        except InvalidChannelConfigError as exc:
            if rollback is None:
                log.error("channel %s refused its new routing: %s", channel_id, exc.message)
                continue
            await rollback()
            try:
                await lifecycle.start_channel(context.supervisor, channel_id)
            except (InvalidChannelConfigError, SupervisorUnavailableError) as again:
                log.error("channel %s did not restart as it was: %s", channel_id, again)
            raise error(exc.message) from exc


async def purge_destination(context: ApiContext, destination_id: str) -> None:
    """Remove what a deleted destination leaves: messages, rates and its queues."""
    await state_store().delete_channel(destination_id)
    broker = queue_broker()
    namespace = context.namespace
    for queue in (
        *namespace.channel_queues(destination_id),
        namespace.dead_letter_queue(destination_id),
    ):
        await broker.delete_queue(queue)
