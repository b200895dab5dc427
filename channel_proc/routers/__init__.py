"""Routers: one channel, many applications. The registry of router types and their loader.

Where a router runs, and why: inside the channel process of the channel it routes, not in a
process of its own.

* The channel process already owns `{cid}.inbound` and `{cid}.event`. A router elsewhere would
  be a second consumer of those queues (the original's "danger": messages split round-robin
  between the router and a forwarder), or would need an extra queue hop per message. Here,
  when a router names the channel, the process runs the router's dispatcher *instead of* the
  channel forwarder: one consumer, by construction.
* Isolation stays per channel: a router's load, memory and crashes are its channel's, and the
  supervisor's restart policy, budget and `failed` state apply to both at once (a router is
  useless without its channel, and the channel's traffic is unrouted without it).
* Destinations keep the data plane's guarantee: the dispatcher moves each inbound message and
  event to the destination's own durable queues (`{did}.inbound` / `{did}.event`) and acks
  only then; one destination forwarder per destination (the channel forwarder, pointed at
  those queues) delivers to its mo_url / event_url / AMQP queue with retries and acks only
  after delivery. A dead mo_url of one destination never holds up the others.
* Nothing extra to restore or reconcile: the supervisor restores channels at boot and each
  channel process loads the router that names it. A change to a router or a destination is
  applied by restarting the router's channels, as a channel change is. Deleting a router
  restarts its channels without it, then its state and its destinations' are removed.

A router naming several channels runs its dispatcher in each of their processes; its
destinations' forwarders (and its log files) live in the process of its first channel, the
one destination sends leave through.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel

from channel_proc.routers.base import Router
from channel_proc.routers.from_address import FromAddressRouter
from channel_proc.transports.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ipc.settings import Settings

#: Built-in router types.
ROUTERS: Final[Mapping[str, type[Router[Any, Any]]]] = {
    "from_address": FromAddressRouter,
}


def check_router_class(cls: object, where: str) -> type[Router[Any, Any]]:
    """`cls` if it is a usable Router subclass, else ConfigError naming `where`."""
    if not (isinstance(cls, type) and issubclass(cls, Router)):
        raise ConfigError(f"{where} is not a channel_proc Router class")
    if getattr(cls, "__abstractmethods__", None):
        raise ConfigError(f"{where} is abstract")
    for attribute in ("config_type", "destination_config_type"):
        model = getattr(cls, attribute, None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigError(f"{where} has no pydantic {attribute}")
    return cls


def load_router_class(path: str) -> type[Router[Any, Any]]:
    """Import "package.module:Class" or "package.module.Class".

    Raises:
        ConfigError: the module or class cannot be imported, or is not a Router.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{path!r} is not 'module:Class' or 'module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {path!r}: {exc}") from exc
    try:
        cls = getattr(module, attr)
    except AttributeError as exc:
        raise ConfigError(f"module {module_name!r} has no {attr!r}") from exc
    return check_router_class(cls, path)


def available_routers(settings: Settings) -> dict[str, type[Router[Any, Any]]]:
    """Router type -> class: the registry plus `settings.routers` (only those when
    `replace_routers`).

    Raises:
        ConfigError: a custom mapping does not load.
    """
    result: dict[str, type[Router[Any, Any]]] = {} if settings.replace_routers else dict(ROUTERS)
    for kind, path in settings.routers.items():
        result[kind] = load_router_class(path)
    return result


def router_schemas(routers: Mapping[str, type[Router[Any, Any]]]) -> dict[str, dict[str, Any]]:
    """Router type -> {"config": schema, "destination_config": schema} (ipc RouterSchemas)."""
    return {
        kind: {
            "config": cls.config_type.model_json_schema(),
            "destination_config": cls.destination_config_type.model_json_schema(),
        }
        for kind, cls in routers.items()
    }
