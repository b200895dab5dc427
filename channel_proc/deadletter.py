"""Dead-lettering: where messages go that can never be delivered (see ipc.deadletters).

With the state store given, an envelope is kept there for the API to list and replay; on
RabbitMQ (or without a store) the body also goes, unchanged, to `{owner}.dead`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ipc.deadletters import DeadLetter, dead_letters_scope, source_of

if TYPE_CHECKING:
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.state import StateStore

log = logging.getLogger(__name__)


def dead_letter_queue(namespace: Namespace, channel_id: str) -> str:
    """`{ns}.{channel_id}.dead`; bodies are kept unchanged so an operator can replay them."""
    return namespace.dead_letter_queue(channel_id)


async def dead_letter(
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    body: bytes,
    *,
    source_queue: str,
    reason: str,
    store: StateStore | None = None,
    queue_copy: bool = True,
    logger: logging.Logger | None = None,
) -> str | None:
    """Keep `body` (taken from `source_queue`) where an operator can find it; return the
    dead letter's id when it was stored.

    Args:
        store: keeps the envelope listed and replayed by the API (`GET/POST
            /channels/{id}/dead_letters`); without it only the queue copy is made.
        queue_copy: also publish the body to `{channel_id}.dead` (for AMQP consumers; on the
            embedded queue nobody consumes it, so the forwarder turns it off there).
    """
    logger = logger or log
    queue = dead_letter_queue(namespace, channel_id)
    source = source_of(source_queue)
    stored: str | None = None
    if store is not None and source is not None:
        letter = DeadLetter.create(
            owner_id=channel_id, source=source, queue=source_queue, reason=reason, body=body
        )
        await store.kv_put(dead_letters_scope(channel_id), letter.id, letter.record())
        stored = letter.id
    if queue_copy or stored is None:
        await broker.publish(queue, body)
    where = f"dead letter {stored}" if stored else queue
    logger.error("moved a message from %s to %s: %s", source_queue, where, reason)
    return stored
