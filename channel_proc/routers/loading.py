"""Find and validate the router of a channel at process start (changes arrive as a restart)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from channel_proc.routers import available_routers
from channel_proc.routers.base import RouterConfigError
from channel_proc.transports.errors import ConfigError
from channel_proc.webhook import Callback, WebhookError, safe_url
from ipc.names import ROUTERS_SCOPE, destinations_scope

if TYPE_CHECKING:
    from channel_proc.routers.base import Router
    from ipc.settings import Settings
    from ipc.state import StateStore

log = logging.getLogger(__name__)


class DestinationProperties(BaseModel):
    """The stored destination properties the channel process uses."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    config: dict[str, Any] = Field(default_factory=dict)
    mo_url: str | None = None
    mo_url_token: str | None = None
    amqp_queue: str | None = None
    signing_secret: str | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    destination_id: str
    properties: DestinationProperties
    #: As stored, for the log redactor.
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Routing:
    """The router that routes this process's channel, with its destinations."""

    channel_id: str
    router: Router[Any, Any]
    destinations: dict[str, Destination]
    #: The router's stored properties, for the log redactor.
    raw: dict[str, Any]

    @property
    def router_id(self) -> str:
        return self.router.router_id

    @property
    def home(self) -> bool:
        """Whether this process runs the destinations' forwarders and the router's logs."""
        return self.router.outbound_channel() == self.channel_id


def _errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(root)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


async def load_routing(store: StateStore, settings: Settings, channel_id: str) -> Routing | None:
    """The router naming `channel_id`, validated; None when no router routes it.

    Raises:
        ConfigError: the router's type is unknown or its config or a destination's is invalid.
    """
    records = await store.kv_items(ROUTERS_SCOPE)
    claims = [
        rid
        for rid, record in records.items()
        if isinstance(record.get("channels"), list) and channel_id in record["channels"]
    ]
    if not claims:
        return None
    router_id = claims[0]
    if len(claims) > 1:
        log.error(
            "routers %s all name channel %s; only %s routes it", claims, channel_id, router_id
        )
    raw = records[router_id].get("properties")
    if not isinstance(raw, dict):
        raise ConfigError(f"router {router_id} has no stored properties")
    routers = available_routers(settings)
    kind = raw.get("type")
    cls = routers.get(kind) if isinstance(kind, str) else None
    if cls is None:
        known = ", ".join(sorted(routers)) or "none"
        raise ConfigError(f"router {router_id}: unknown router type {kind!r} (available: {known})")
    try:
        config = cls.config_type.model_validate(raw.get("config"))
    except ValidationError as exc:
        raise ConfigError(f"router {router_id}: invalid config: {_errors(exc)}") from exc
    destinations: dict[str, Destination] = {}
    configs: dict[str, BaseModel] = {}
    for did, stored in (await store.kv_items(destinations_scope(router_id))).items():
        destinations[did] = _destination(router_id, did, stored)
        try:
            configs[did] = cls.destination_config_type.model_validate(
                destinations[did].properties.config
            )
        except ValidationError as exc:
            raise ConfigError(
                f"router {router_id}: destination {did}: invalid config: {_errors(exc)}"
            ) from exc
    try:
        router = cls(router_id, config, configs)
    except RouterConfigError as exc:
        raise ConfigError(str(exc)) from exc
    if channel_id not in router.channels():
        log.warning(
            "router %s is recorded for channel %s but does not name it", router_id, channel_id
        )
        return None
    return Routing(channel_id, router, destinations, raw)


def _destination(router_id: str, did: str, stored: dict[str, Any]) -> Destination:
    try:
        properties = DestinationProperties.model_validate(stored)
    except ValidationError as exc:
        raise ConfigError(f"router {router_id}: destination {did}: {_errors(exc)}") from exc
    callback = Callback(properties.mo_url) if properties.mo_url else None
    # A bad template is not fatal: the destination forwarder logs it and dead-letters.
    if callback is not None and not callback.is_template:
        try:
            callback.check()
        except WebhookError as exc:
            raise ConfigError(
                f"router {router_id}: destination {did}: mo_url "
                f"{safe_url(callback.url)}: {exc.reason}"
            ) from exc
    return Destination(did, properties, stored)
