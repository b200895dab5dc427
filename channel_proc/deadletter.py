"""The channel's dead-letter queue: where messages go that can never be delivered."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ipc.broker import Broker
    from ipc.names import Namespace

log = logging.getLogger(__name__)


def dead_letter_queue(namespace: Namespace, channel_id: str) -> str:
    """`{ns}.{channel_id}.dead`; bodies are kept unchanged so an operator can replay them."""
    return namespace.queue(f"{channel_id}.dead")


async def dead_letter(
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    body: bytes,
    *,
    source_queue: str,
    reason: str,
) -> None:
    queue = dead_letter_queue(namespace, channel_id)
    await broker.publish(queue, body)
    log.error("moved a message from %s to %s: %s", source_queue, queue, reason)
