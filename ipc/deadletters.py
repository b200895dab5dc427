"""Dead letters: what a channel (or router destination) could not deliver, kept for an operator.

The channel process writes them, the API lists, replays and deletes them; both go through
this module. Each dead letter is one envelope in the state store, in the scope
`{owner_id}:dead_letters` (so deleting the channel or destination removes them), keyed by
its id. They survive restarts and live on both backends; on RabbitMQ a copy of the body also
goes to `{owner_id}.dead` for AMQP consumers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from ipc.broker import MAX_PRIORITY
from ipc.payloads import vumi_timestamp

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.state import StateStore

#: A replayed outbound message goes back at the API's default priority.
REPLAY_PRIORITY = 1

#: Namespaces dead-letter ids: the same body from the same queue gets the same id, so a
#: redelivery after a crash between dead-lettering and the ack does not make a second one.
_ID_NAMESPACE = uuid.UUID("6f1c1e0a-55b3-4c39-9c4d-0f3b1f1d2a61")


class SourceQueue(StrEnum):
    """The queue a dead letter came from, and goes back to when replayed."""

    INBOUND = "inbound"
    EVENT = "event"
    OUTBOUND = "outbound"


def dead_letters_scope(owner_id: str) -> str:
    """The store scope of a channel's (or destination's) dead letters; it starts with
    "{owner_id}:", so the store's delete_channel(owner_id) removes it."""
    return f"{owner_id}:dead_letters"


def source_of(queue: str) -> SourceQueue | None:
    """Which kind of queue `queue` (`{ns}.{owner}.inbound`, ...) is; None for any other."""
    kind = queue.rsplit(".", 1)[-1]
    try:
        return SourceQueue(kind)
    except ValueError:
        return None


def replay_queue(namespace: Namespace, owner_id: str, source: SourceQueue) -> str:
    """Where a replayed dead letter is published: the owner's queue of its kind."""
    match source:
        case SourceQueue.INBOUND:
            return namespace.inbound_queue(owner_id)
        case SourceQueue.EVENT:
            return namespace.event_queue(owner_id)
        case SourceQueue.OUTBOUND:
            return namespace.outbound_queue(owner_id)


class DeadLetter(BaseModel):
    """One dead letter as stored (and as the API shows it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    #: The channel (or router destination) whose queue it came from.
    owner_id: str
    source: SourceQueue
    #: The full name of that queue (namespaced).
    queue: str
    reason: str
    #: When it was dead-lettered (vumi timestamp format, UTC).
    dead_lettered_at: str
    #: The message or event as JSON; None when the body was not JSON (see raw_body).
    body: Any = None
    #: The body, base64-encoded, when it was not JSON (undecodable bytes are kept too).
    raw_body: str | None = None

    @classmethod
    def create(
        cls, *, owner_id: str, source: SourceQueue, queue: str, reason: str, body: bytes
    ) -> DeadLetter:
        parsed: Any = None
        raw: str | None = None
        try:
            parsed = json.loads(body)
        except ValueError:
            raw = base64.b64encode(body).decode("ascii")
        return cls(
            id=dead_letter_id(queue, body),
            owner_id=owner_id,
            source=source,
            queue=queue,
            reason=reason,
            dead_lettered_at=vumi_timestamp(),
            body=parsed,
            raw_body=raw,
        )

    def body_bytes(self) -> bytes:
        """The bytes to publish again (the same JSON, compactly re-encoded)."""
        if self.raw_body is not None:
            return base64.b64decode(self.raw_body)
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode()

    def record(self) -> dict[str, Any]:
        """The JSON object stored (and returned by the API)."""
        return self.model_dump(mode="json")


def dead_letter_id(queue: str, body: bytes) -> str:
    digest = hashlib.sha256(body).hexdigest()
    return uuid.uuid5(_ID_NAMESPACE, f"{queue}:{digest}").hex


async def list_dead_letters(store: StateStore, owner_id: str) -> list[DeadLetter]:
    """A channel's (or destination's) dead letters, oldest first."""
    items = await store.kv_items(dead_letters_scope(owner_id))
    letters = [DeadLetter.model_validate(value) for value in items.values()]
    return sorted(letters, key=lambda letter: (letter.dead_lettered_at, letter.id))


async def replay_dead_letters(
    store: StateStore, broker: Broker, namespace: Namespace, letters: Iterable[DeadLetter]
) -> list[str]:
    """Publish each dead letter back on its source queue, in the order given, then forget it;
    return their ids. A crash between the two replays it again later: at-least-once."""
    replayed = []
    for letter in letters:
        queue = replay_queue(namespace, letter.owner_id, letter.source)
        priority = 0
        if letter.source is SourceQueue.OUTBOUND:
            # Outbound queues are priority queues; RabbitMQ refuses a declaration without it.
            await broker.declare_queue(queue, max_priority=MAX_PRIORITY)
            priority = REPLAY_PRIORITY
        await broker.publish(queue, letter.body_bytes(), priority=priority)
        await store.kv_delete(dead_letters_scope(letter.owner_id), letter.id)
        replayed.append(letter.id)
    return replayed
