"""The `from_address` router (docs 1.11.2): one channel, destinations by regex on `to_addr`.

Despite its name it matches the channel-side address of an inbound message (`to_addr`: the
long code, short code or USSD code the user wrote to), as the original did. Every matching
destination gets the message; the `default: true` destination gets what matches none; with no
default, an unmatched message is logged and dropped.
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from channel_proc.routers.base import Router, channel_field, default_field

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ipc.payloads import VumiEvent, VumiMessage


class FromAddressConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    channel: uuid.UUID = channel_field(
        "The id of the channel whose messages are routed. It may have neither mo_url nor "
        "amqp_queue, and no other router may route it."
    )


class FromAddressDestinationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    regular_expression: re.Pattern[str] = Field(
        description="Inbound messages whose to_addr this matches (re.search) come here."
    )
    default: bool = default_field(
        "Messages that match no destination come here (one default per router at most)."
    )


class FromAddressRouter(Router[FromAddressConfig, FromAddressDestinationConfig]):
    kind = "from_address"
    config_type = FromAddressConfig
    destination_config_type = FromAddressDestinationConfig

    def _matching(self, address: str | None) -> list[str]:
        if address is not None:
            found = [
                did
                for did, config in self.destinations.items()
                if config.regular_expression.search(address)
            ]
            if found:
                return found
        return self.default_destinations()

    def inbound_destinations(self, channel_id: str, msg: VumiMessage) -> list[str]:
        return self._matching(msg.to_addr)

    def unattributed_event_destinations(
        self, channel_id: str, event: VumiEvent, record: Mapping[str, object] | None
    ) -> list[str]:
        """A message sent through the channel endpoint: its `from` is the address a
        destination answers on, so route by it like an inbound `to_addr`."""
        if record is None:
            return self.default_destinations()
        sender = record.get("from")
        return self._matching(sender if isinstance(sender, str) else None)
