"""The registry of channel types and the loader for custom ones (`channels` in the config)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel

from channel_proc.transports.base import Transport
from channel_proc.transports.errors import ConfigError

if TYPE_CHECKING:
    from ipc.settings import Settings

#: Built-in channel types. Adding a type is one line here (and one module, one test file).
#: Named, not imported: a channel process imports only its own type (every type at once
#: cost ~0.3 s of CPU per channel start, and memory, mostly for types it never runs).
BUILTIN_TRANSPORTS: Final[Mapping[str, str]] = {
    "telnet": "channel_proc.transports.telnet:TelnetTransport",
    "xmpp": "channel_proc.transports.xmpp:XmppTransport",
    "dmark": "channel_proc.transports.dmark:DmarkTransport",
    "websocket": "channel_proc.transports.websocket:WebsocketTransport",
    "smpp": "channel_proc.transports.smpp:SmppTransport",
}


class TransportRegistry(Mapping[str, type[Transport[Any]]]):
    """Channel type -> Transport class, each imported when first looked up.

    Looking up a type whose module does not load raises ConfigError (a KeyError only for
    a type that is not registered)."""

    def __init__(self, paths: Mapping[str, str]) -> None:
        self._paths = dict(paths)
        self._loaded: dict[str, type[Transport[Any]]] = {}

    def __getitem__(self, kind: str) -> type[Transport[Any]]:
        cls = self._loaded.get(kind)
        if cls is None:
            cls = self._loaded[kind] = load_transport_class(self._paths[kind])
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


#: The built-in types, loaded as used.
TRANSPORTS: Final = TransportRegistry(BUILTIN_TRANSPORTS)


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


def available_transports(settings: Settings) -> TransportRegistry:
    """Channel type -> class: the registry plus `settings.channels` (only those when
    `replace_channels`), each imported when looked up; looking up one that does not load
    raises ConfigError."""
    paths: dict[str, str] = {} if settings.replace_channels else dict(BUILTIN_TRANSPORTS)
    paths.update(settings.channels)
    return TransportRegistry(paths)


def config_schemas(transports: Mapping[str, type[Transport[Any]]]) -> dict[str, dict[str, Any]]:
    """Channel type -> JSON Schema of its `config`."""
    return {kind: cls.config_type.model_json_schema() for kind, cls in transports.items()}
