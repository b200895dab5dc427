"""The state-store interface (channels, statuses, message records, rates) and its factory.

Two implementations sit behind it: Redis (ipc/state_redis.py, the only Redis
importer) and the embedded SQLite store (ipc/state_sqlite.py). Both must pass
the same tests (tests/ipc/test_state.py). Every method raises StoreUnavailableError
when the backend cannot be reached, never a library exception.
"""

from __future__ import annotations

import abc
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from ipc.names import Namespace
    from ipc.settings import Settings

JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RateCount:
    """One count for StateStore.incr_rates: `owner_id:label:bucket`, expiring after ttl."""

    owner_id: str
    label: str
    bucket: int
    ttl: float

    @classmethod
    def now(cls, owner_id: str, label: str, window: float) -> RateCount:
        """A count in the current `window`-second bucket, kept for two windows (rates are
        read from the last complete bucket)."""
        return cls(owner_id, label, int(time.time() / window), math.ceil(2 * window))


@dataclass(frozen=True, slots=True)
class KvEntry:
    """One keyed record for StateStore.kv_put_many: `value` under (scope, key), as kv_put."""

    scope: str
    key: str
    value: JsonObject
    ttl: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundWrites:
    """One step of a send, for StateStore.write_outbound: under each owner, the send record
    (as put_outbound) and then one entry of its event list (as add_event), then each count
    (as incr_rate). `record`, `entry` and `rates` may each be left out."""

    message_id: str
    owners: tuple[str, ...]
    ttl: float
    record: JsonObject | None = None
    #: (event_id, event)
    entry: tuple[str, JsonObject] | None = None
    rates: tuple[RateCount, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboundRecord:
    """What is stored for an outbound message: the send record and its events, oldest first."""

    message: JsonObject | None
    events: list[JsonObject] = field(default_factory=list)


class StateStore(abc.ABC):
    """Configuration and temporary state. TTLs are in seconds and slide: reads refresh them."""

    # --- channels ---------------------------------------------------------------------

    @abc.abstractmethod
    async def save_channel(self, channel_id: str, properties: JsonObject) -> None:
        """Create or replace a channel's properties and add it to the channel set."""

    @abc.abstractmethod
    async def get_channel(self, channel_id: str) -> JsonObject | None: ...

    @abc.abstractmethod
    async def list_channels(self) -> list[str]:
        """All channel ids, sorted."""

    @abc.abstractmethod
    async def delete_channel(self, channel_id: str) -> bool:
        """Remove the channel and everything stored under it (status, messages, rates).

        Returns False when it did not exist.
        """

    # --- status -----------------------------------------------------------------------

    @abc.abstractmethod
    async def set_status(self, channel_id: str, component: str, status: JsonObject) -> None:
        """Store the latest status event of one component (no TTL)."""

    @abc.abstractmethod
    async def get_statuses(self, channel_id: str) -> dict[str, JsonObject]:
        """component -> latest status event."""

    # --- message records --------------------------------------------------------------

    @abc.abstractmethod
    async def put_inbound(
        self, channel_id: str, message_id: str, message: JsonObject, ttl: float
    ) -> None:
        """Keep an inbound vumi message so replies can find it."""

    @abc.abstractmethod
    async def get_inbound(self, channel_id: str, message_id: str, ttl: float) -> JsonObject | None:
        """The inbound vumi message, or None when unknown or expired; refreshes the TTL."""

    @abc.abstractmethod
    async def put_outbound(
        self, channel_id: str, message_id: str, record: JsonObject, ttl: float
    ) -> None:
        """Store the send record (API message object plus event_url, event_auth_token...)."""

    @abc.abstractmethod
    async def add_event(
        self, channel_id: str, message_id: str, event_id: str, event: JsonObject, ttl: float
    ) -> JsonObject | None:
        """Add one event to an outbound record (creating the record if it is missing).

        Returns the send record (as put_outbound stored it), None when there is none: what
        an event's forwarder needs next (its event_url), read in the same transaction.
        """

    @abc.abstractmethod
    async def get_outbound(
        self, channel_id: str, message_id: str, ttl: float
    ) -> OutboundRecord | None:
        """The record and its events (ordered by insertion), None when nothing is stored."""

    @abc.abstractmethod
    async def write_outbound(self, writes: OutboundWrites) -> None:
        """Apply `writes` in one transaction (one round trip): the same outcome as
        put_outbound(owner, message_id, record, ttl) then add_event(owner, message_id,
        *entry, ttl) for each owner in turn, then incr_rate for each count.

        The API's send path: a send costs two of these instead of one call per write.
        """

    # --- rates ------------------------------------------------------------------------

    async def incr_rate(self, owner_id: str, label: str, bucket: int, ttl: float) -> None:
        """Add one to the counter `owner_id:label:bucket` (expires after ttl)."""
        await self.incr_rates([RateCount(owner_id, label, bucket, ttl)])

    @abc.abstractmethod
    def set_write_linger(self, seconds: float) -> None:
        """Writes wait `seconds` for others to commit with them (0, the default: they commit
        as soon as ready). A channel draining a backlog sets it, so that it takes a write
        lock shared with every process, or a round trip, fewer times a second."""

    @abc.abstractmethod
    async def incr_rates(self, rates: Sequence[RateCount]) -> None:
        """Add one to each counter, as incr_rate, in one write (all or none)."""

    @abc.abstractmethod
    async def get_rates(self, owner_id: str, labels: Sequence[str], bucket: int) -> dict[str, int]:
        """The counters of one bucket for each label; missing counters read 0."""

    # --- small keyed records (transport notes, routers, ...) ---------------------------

    @abc.abstractmethod
    async def kv_put(
        self, scope: str, key: str, value: JsonObject, ttl: float | None = None
    ) -> None:
        """Store `value` under (scope, key); ttl None keeps it until deleted.

        Scopes that start with "{channel_id}:" are removed by delete_channel.
        """

    @abc.abstractmethod
    async def kv_put_many(self, entries: Sequence[KvEntry]) -> None:
        """Store every entry, as kv_put would, in one write (one transaction, one MULTI)."""

    @abc.abstractmethod
    async def kv_put_if_absent(
        self, scope: str, key: str, value: JsonObject, ttl: float | None = None
    ) -> bool:
        """Store `value` under (scope, key) only when no live entry is there (an expired one
        counts as absent), atomically across processes: of racing writers exactly one wins.

        Returns True when this call wrote the value.
        """

    @abc.abstractmethod
    async def kv_get(self, scope: str, key: str) -> JsonObject | None:
        """The value, or None when missing or expired (reads do not refresh the TTL)."""

    @abc.abstractmethod
    async def kv_delete(self, scope: str, key: str) -> bool:
        """Remove one entry; False when it did not exist."""

    @abc.abstractmethod
    async def kv_delete_if(self, scope: str, key: str, value: JsonObject) -> bool:
        """Remove the entry only while it is live and holds `value` (as written: the same
        keys in the same order), atomically across processes: a holder drops its own lease
        or reservation, never one that expired and passed to someone else meanwhile.

        Returns True when this call removed it.
        """

    @abc.abstractmethod
    async def kv_items(self, scope: str) -> dict[str, JsonObject]:
        """Every live entry of a scope, by key (sorted)."""

    @abc.abstractmethod
    async def kv_clear(self, scope: str) -> None:
        """Remove every entry of a scope."""

    # --- lifecycle --------------------------------------------------------------------

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailableError when the backend does not answer."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...


@asynccontextmanager
async def open_state(
    settings: Settings, namespace: Namespace, *, ride_through: float = 0.0
) -> AsyncIterator[StateStore]:
    """Open the store the settings select: Redis when `settings.redis` is set, else embedded.

    `ride_through`: seconds a Redis call keeps trying while Redis refuses connections, before
    it fails (ipc/state_redis.py); the embedded store has no connection to lose.
    """
    store: StateStore
    if settings.redis is not None:
        from ipc.state_redis import RedisStateStore

        store = await RedisStateStore.connect(settings.redis, namespace, ride_through=ride_through)
    else:
        from ipc.state_sqlite import SqliteStateStore

        store = await SqliteStateStore.open(settings.data_dir / "state.sqlite3", namespace)
    try:
        yield store
    finally:
        await store.aclose()
