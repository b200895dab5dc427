"""The production TransportLink: inbound messages and delivery reports to durable queues,
statuses to the status actor, and the transport's notes in the state store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from ipc.codec import encode_payload
from ipc.state import KvEntry

if TYPE_CHECKING:
    from collections.abc import Mapping

    from channel_proc.events import StatusReporter
    from channel_proc.transports.base import StatusLevel
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.payloads import VumiEvent, VumiMessage
    from ipc.state import StateStore

#: Notes of a transport live in store scopes "{channel_id}:transport:{group}", so
#: delete_channel removes them and one group can be listed without the others.
NOTE_SCOPE: Final = "transport"


def split_note_key(key: str) -> tuple[str, str]:
    """("group", "name") of a note key "group:name".

    Raises:
        ValueError: the key has no group.
    """
    group, sep, name = key.partition(":")
    if not sep or not group or not name:
        raise ValueError(f"note key {key!r} is not 'group:name'")
    return group, name


class QueueLink:
    """Publishes what a transport receives to `{channel_id}.inbound` / `.event`."""

    def __init__(
        self,
        broker: Broker,
        namespace: Namespace,
        channel_id: str,
        reporter: StatusReporter,
        *,
        store: StateStore,
        note_ttl: float,
    ) -> None:
        self._broker = broker
        self._inbound_queue = namespace.inbound_queue(channel_id)
        self._event_queue = namespace.event_queue(channel_id)
        self._channel_id = channel_id
        self._reporter = reporter
        self._store = store
        self._note_ttl = note_ttl

    async def inbound(self, msg: VumiMessage) -> None:
        # vumi's transport_name is the worker's name, which for Junebug is the channel id.
        stamped = msg.model_copy(update={"transport_name": self._channel_id})
        await self._broker.publish(self._inbound_queue, encode_payload(stamped))

    async def delivery_report(self, event: VumiEvent) -> None:
        stamped = event.model_copy(update={"transport_name": self._channel_id})
        await self._broker.publish(self._event_queue, encode_payload(stamped))

    def status(
        self,
        component: str,
        level: StatusLevel,
        type: str,
        message: str,
        details: Mapping[str, object] | None = None,
    ) -> None:
        self._reporter.report(component, level, type, message, details)

    # --- notes ------------------------------------------------------------------------

    def _scope(self, group: str) -> str:
        return f"{self._channel_id}:{NOTE_SCOPE}:{group}"

    async def note_put(
        self, key: str, value: Mapping[str, object], ttl: float | None = None
    ) -> None:
        await self.note_put_many({key: value}, ttl)

    async def note_put_many(
        self, notes: Mapping[str, Mapping[str, object]], ttl: float | None = None
    ) -> None:
        lifetime = self._note_ttl if ttl is None else ttl
        entries = []
        for key, value in notes.items():
            group, name = split_note_key(key)
            entries.append(KvEntry(self._scope(group), name, dict(value), lifetime))
        await self._store.kv_put_many(entries)

    async def note_get(self, key: str) -> dict[str, object] | None:
        group, name = split_note_key(key)
        return await self._store.kv_get(self._scope(group), name)

    async def note_delete(self, key: str) -> bool:
        group, name = split_note_key(key)
        return await self._store.kv_delete(self._scope(group), name)

    async def notes(self, prefix: str) -> dict[str, dict[str, object]]:
        group, sep, rest = prefix.partition(":")
        if not sep or not group:
            raise ValueError(f"note prefix {prefix!r} does not name a group ('group:...')")
        items = await self._store.kv_items(self._scope(group))
        return {f"{group}:{name}": value for name, value in items.items() if name.startswith(rest)}
