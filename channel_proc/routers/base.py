"""The router-type interface: validated configs in, destination ids out. Pure: no I/O.

A router type is a class with a pydantic `config_type` (the router's `config`) and a
`destination_config_type` (each destination's `config`); the API validates bodies against
their JSON Schemas (served in the catalog) and the channel process validates them again with
the models. Fields of `config_type` marked `channel_field()` name the channels it routes.
"""

from __future__ import annotations

import abc
import uuid
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, Field

from ipc.messages import ROUTER_CHANNEL_KEYWORD, ROUTER_DEFAULT_KEYWORD

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ipc.payloads import VumiEvent, VumiMessage

ConfigT = TypeVar("ConfigT", bound=BaseModel)
DestinationConfigT = TypeVar("DestinationConfigT", bound=BaseModel)


def channel_field(description: str) -> Any:
    """A required config field holding the id of a channel the router routes (or a list)."""
    return Field(description=description, json_schema_extra={ROUTER_CHANNEL_KEYWORD: True})


def default_field(description: str) -> Any:
    """A boolean destination-config field marking the router's (single) default destination."""
    return Field(False, description=description, json_schema_extra={ROUTER_DEFAULT_KEYWORD: True})


def _marked(model: type[BaseModel], keyword: str) -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get(keyword) is True:
            names.append(name)
    return names


def _channel_ids(value: object) -> list[str]:
    if isinstance(value, uuid.UUID | str):
        return [str(value)]
    if isinstance(value, list | tuple):
        return [channel for item in value for channel in _channel_ids(item)]
    return []


class RouterConfigError(ValueError):
    """The destinations break a rule of the router type (e.g. two defaults)."""


class Router(abc.ABC, Generic[ConfigT, DestinationConfigT]):
    """One router: its config and its destinations' configs, by destination id.

    Subclasses say where an inbound message goes (`inbound_destinations`) and may say where
    an event goes when its message was not sent by a destination
    (`unattributed_event_destinations`). Everything else is the channel process's business.
    """

    kind: ClassVar[str]
    config_type: ClassVar[type[BaseModel]]
    destination_config_type: ClassVar[type[BaseModel]]

    def __init__(
        self,
        router_id: str,
        config: ConfigT,
        destinations: Mapping[str, DestinationConfigT],
    ) -> None:
        """Raises RouterConfigError when the destinations break the type's rules."""
        self.router_id = router_id
        self.config = config
        # Sorted by id, so that "every match" has one order in every process.
        self.destinations = dict(sorted(destinations.items()))
        self.check()

    def check(self) -> None:
        """The rules across destinations. Default: at most one default destination."""
        defaults = self.default_destinations()
        if len(defaults) > 1:
            raise RouterConfigError(
                f"router {self.router_id} has more than one default destination: "
                + ", ".join(defaults)
            )

    def channels(self) -> list[str]:
        """The channels this router routes, in config order, without repeats."""
        found: list[str] = []
        for name in _marked(type(self.config), ROUTER_CHANNEL_KEYWORD):
            for channel_id in _channel_ids(getattr(self.config, name)):
                if channel_id not in found:
                    found.append(channel_id)
        return found

    def outbound_channel(self) -> str:
        """The channel a destination's messages leave through (the API agrees: the first)."""
        return self.channels()[0]

    def default_destinations(self) -> list[str]:
        fields = _marked(self.destination_config_type, ROUTER_DEFAULT_KEYWORD)
        return [
            did
            for did, config in self.destinations.items()
            if any(getattr(config, name, False) is True for name in fields)
        ]

    @abc.abstractmethod
    def inbound_destinations(self, channel_id: str, msg: VumiMessage) -> list[str]:
        """The destinations an inbound message of `channel_id` goes to ([] drops it)."""

    def event_destinations(
        self, channel_id: str, event: VumiEvent, record: Mapping[str, object] | None
    ) -> list[str]:
        """Where an event goes: back to the destination that sent the message when the
        outbound record names one, else what the type decides."""
        sender = record.get("destination_id") if record is not None else None
        if isinstance(sender, str) and sender in self.destinations:
            return [sender]
        return self.unattributed_event_destinations(channel_id, event, record)

    def unattributed_event_destinations(
        self, channel_id: str, event: VumiEvent, record: Mapping[str, object] | None
    ) -> list[str]:
        """Events of messages sent through the channel endpoint (or AMQP): none by default."""
        return []
