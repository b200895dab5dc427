"""Identifier types and every name derived from them: store keys, queue names, socket paths.

No other module builds a key, queue or socket name by hand, so that a Namespace
(a prefix used by tests and by several gateways sharing one Redis/RabbitMQ)
applies everywhere.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, NewType

if TYPE_CHECKING:
    from pathlib import Path

ChannelId = NewType("ChannelId", str)
MessageId = NewType("MessageId", str)
RouterId = NewType("RouterId", str)
DestinationId = NewType("DestinationId", str)

#: The AMQP exchange vumi and Junebug use for every queue.
EXCHANGE = "vumi"


def new_channel_id() -> ChannelId:
    """Channel ids are uuid4 strings with hyphens, as the original."""
    return ChannelId(str(uuid.uuid4()))


def new_router_id() -> RouterId:
    """Router ids are uuid4 strings with hyphens, like channel ids."""
    return RouterId(str(uuid.uuid4()))


def new_destination_id() -> DestinationId:
    return DestinationId(str(uuid.uuid4()))


#: Keyed-record scope of the routers: key = router id, value = {"properties", "channels"}.
ROUTERS_SCOPE = "routers"


def destinations_scope(router_id: str) -> str:
    """Keyed-record scope of a router's destinations (key = destination id). It starts with
    "{router_id}:", so the store's delete_channel(router_id) removes it with the router."""
    return f"{router_id}:destinations"


def new_message_id() -> MessageId:
    """Message and event ids are uuid4 hex, as vumi makes them."""
    return MessageId(uuid.uuid4().hex)


@dataclass(frozen=True, slots=True)
class Namespace:
    """A prefix for every store key and queue name this gateway owns ("" in production)."""

    prefix: str = ""

    def key(self, *parts: str) -> str:
        joined = ":".join(parts)
        return f"{self.prefix}:{joined}" if self.prefix else joined

    def queue(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def outbound_queue(self, channel_id: str) -> str:
        return self.queue(f"{channel_id}.outbound")

    def inbound_queue(self, channel_id: str) -> str:
        return self.queue(f"{channel_id}.inbound")

    def event_queue(self, channel_id: str) -> str:
        return self.queue(f"{channel_id}.event")

    def dead_letter_queue(self, owner_id: str) -> str:
        """Where a channel's (or a router destination's) undeliverable messages are kept."""
        return self.queue(f"{owner_id}.dead")

    def channel_queues(self, channel_id: str) -> tuple[str, str, str]:
        return (
            self.inbound_queue(channel_id),
            self.outbound_queue(channel_id),
            self.event_queue(channel_id),
        )


def amqp_inbound_key(amqp_queue: str) -> str:
    """Routing key for inbound messages of a channel with `amqp_queue` (docs 1.9); no prefix."""
    return f"{amqp_queue}.inbound"


def amqp_event_key(amqp_queue: str) -> str:
    return f"{amqp_queue}.event"


def amqp_outbound_queue(amqp_queue: str) -> str:
    return f"{amqp_queue}.outbound"


def supervisor_socket(run_dir: Path) -> Path:
    return run_dir / "supervisor.sock"


def channel_socket(run_dir: Path, channel_id: str) -> Path:
    # Unix socket paths are limited to ~107 bytes; run_dir is kept short by the supervisor.
    return run_dir / f"ch-{channel_id}.sock"


# Store scopes the API writes and a channel process reads (queue control and its snapshot).
def control_scope(channel_id: str) -> str:
    return f"{channel_id}:control"


def cancelled_scope(channel_id: str) -> str:
    return f"{channel_id}:cancelled"


def runtime_scope(channel_id: str) -> str:
    return f"{channel_id}:runtime"
