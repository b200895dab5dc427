"""The registry of channel types and the loader for custom ones (`channels` in the config)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel

from channel_proc.transports.base import Transport
from channel_proc.transports.dmark import DmarkTransport
from channel_proc.transports.errors import ConfigError
from channel_proc.transports.smpp import SmppTransport
from channel_proc.transports.telnet import TelnetTransport
from channel_proc.transports.websocket import WebsocketTransport
from channel_proc.transports.xmpp import XmppTransport

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ipc.settings import Settings

#: Built-in channel types. Adding a type is one line here (and one module, one test file).
TRANSPORTS: Final[Mapping[str, type[Transport[Any]]]] = {
    "telnet": TelnetTransport,
    "xmpp": XmppTransport,
    "dmark": DmarkTransport,
    "websocket": WebsocketTransport,
    "smpp": SmppTransport,
}


def check_transport_class(cls: object, where: str) -> type[Transport[Any]]:
    """`cls` if it is a usable Transport subclass, else ConfigError naming `where`."""
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise ConfigError(f"{where} is not a channel_proc Transport class")
    if getattr(cls, "__abstractmethods__", None):
        raise ConfigError(f"{where} is abstract")
    config_type = getattr(cls, "config_type", None)
    if not (isinstance(config_type, type) and issubclass(config_type, BaseModel)):
        raise ConfigError(f"{where} has no pydantic config_type")
    if not isinstance(getattr(cls, "kind", None), str):
        raise ConfigError(f"{where} has no kind")
    return cls


def load_transport_class(path: str) -> type[Transport[Any]]:
    """Import "package.module:Class" or "package.module.Class".

    Raises:
        ConfigError: the module or class cannot be imported, or is not a Transport.
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
    return check_transport_class(cls, path)


def available_transports(settings: Settings) -> dict[str, type[Transport[Any]]]:
    """Channel type -> class: the registry plus `settings.channels` (only those when
    `replace_channels`).

    Raises:
        ConfigError: a custom mapping does not load.
    """
    result: dict[str, type[Transport[Any]]] = {} if settings.replace_channels else dict(TRANSPORTS)
    for kind, path in settings.channels.items():
        result[kind] = load_transport_class(path)
    return result


def config_schemas(transports: Mapping[str, type[Transport[Any]]]) -> dict[str, dict[str, Any]]:
    """Channel type -> JSON Schema of its `config`."""
    return {kind: cls.config_type.model_json_schema() for kind, cls in transports.items()}
