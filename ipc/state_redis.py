"""The Redis StateStore: the only module that imports the Redis client.

Sync redis-py in worker threads (trio.to_thread, at most 16 at once); every interface
call is one pipeline, so one round trip (delete_channel adds its SCAN), and the writes that
tasks have ready at the same moment share one MULTI/EXEC (ipc/group_commit.py).

With `ride_through` (channel processes), a call that finds Redis refusing connections
(restarting, failing over) is tried again for that many seconds before it fails, so a short
outage delays a channel instead of restarting it (and re-binding its provider link); ping()
is never retried, so health checks see the outage at once.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Final, TypeVar

import outcome
import redis  # this module is the single Redis importer
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from ipc.errors import StoreUnavailableError
from ipc.group_commit import GroupCommit
from ipc.ride_through import RideThrough
from ipc.state import (
    JsonObject,
    KvEntry,
    OutboundRecord,
    OutboundWrites,
    RateCount,
    StateStore,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from ipc.names import Namespace
    from ipc.settings import RedisSettings

T = TypeVar("T")
Command = tuple[str | int, ...]

log = logging.getLogger(__name__)

#: Worker threads (and so pooled connections) one store uses at once.
MAX_THREADS: Final = 16
#: Seconds a call waits for one of those threads. They are only all busy for long when
#: Redis stops answering (each then holds its thread for SOCKET_TIMEOUT): failing at once
#: keeps every caller's wait bounded instead of queueing behind the stuck ones.
THREAD_WAIT: Final = 2.5
SOCKET_TIMEOUT: Final = 5.0
SCAN_BATCH: Final = 500

_GLOB_SPECIAL: Final = str.maketrans({c: "\\" + c for c in "\\*?[]"})
#: Expired keyed records removed per kv_put (amortises the sweep over the writes).
KV_SWEEP_BATCH: Final = 200

# KEYS: values hash, expiry zset. ARGV: now_ms, key, value, expires_at_ms|+inf, sweep batch.
_KV_PUT_LUA: Final = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[5])
if #expired > 0 then
  redis.call('HDEL', KEYS[1], unpack(expired))
  redis.call('ZREM', KEYS[2], unpack(expired))
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
"""
# Sets `live`: whether key ARGV[2] has an unexpired entry (ARGV[1] is now, in ms).
_KV_LIVE_LUA: Final = """
local score = redis.call('ZSCORE', KEYS[2], ARGV[2])
local live = score and (score == 'inf' or tonumber(score) > tonumber(ARGV[1]))
"""
# The same layout as kv_put, written only when the key has no live entry. A script rather
# than SET NX: the entry lives in the scope's hash + expiry zset, which SET NX cannot guard,
# and a script runs atomically. Same KEYS/ARGV; returns 1 when written.
_KV_PUT_IF_ABSENT_LUA: Final = (
    _KV_LIVE_LUA
    + """
if live and redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then
  return 0
end
"""
    + _KV_PUT_LUA
    + "return 1\n"
)
# Same KEYS/ARGV; deletes the entry only while it is live and its value is ARGV[3].
_KV_DELETE_IF_LUA: Final = (
    _KV_LIVE_LUA
    + """
if live and redis.call('HGET', KEYS[1], ARGV[2]) == ARGV[3] then
  redis.call('HDEL', KEYS[1], ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
)


def _dump(obj: JsonObject) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _ms(ttl: float) -> int:
    # PEXPIRE rather than EXPIRE so sub-second TTLs work; 0 would delete the key at once.
    return max(1, math.ceil(ttl * 1000))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _pipeline(
    commands: Sequence[Command],
    client: redis.Redis,
    *,
    atomic: bool,
    raise_on_error: bool = True,
) -> list[Any]:
    """Send `commands` in one round trip (MULTI/EXEC when `atomic`); their replies, a failed
    command's error among them when not `raise_on_error`."""
    with client.pipeline(transaction=atomic) as pipe:
        for command in commands:
            # redis-py leaves execute_command unannotated; replies are parsed by name.
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        return pipe.execute(raise_on_error=raise_on_error)


def _glob_escape(text: str) -> str:
    return text.translate(_GLOB_SPECIAL)


class RedisStateStore(StateStore):
    """Keys as the original Junebug lays them out (behaviour.md section 12).

    Under `[key_prefix:][namespace:]`: `channels` (set), `{cid}:properties`, `{cid}:status`
    (hash), `{cid}:inbound_messages:{mid}` (hash field `message`),
    `{cid}:outbound_messages:{mid}` (hash: `message` plus one field per event id) and
    `{id}:{label}:{bucket}` counters. Event order lives in a companion list
    `{cid}:outbound_messages:{mid}:event_order` of event ids with the hash's TTL; events
    found in the hash but not in the list (written by the original) follow, by timestamp.
    Keyed records (kv_*) live in `{scope}:kv` (hash) with expiry times in `{scope}:kv_expiry`.
    """

    def __init__(
        self, settings: RedisSettings, namespace: Namespace, *, ride_through: float = 0.0
    ) -> None:
        password = settings.password.get_secret_value() if settings.password else None
        self._pool = redis.ConnectionPool(
            host=settings.host,
            port=settings.port,
            db=settings.db,
            password=password,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            decode_responses=True,
            # One immediate retry replaces a pooled connection the server dropped; more
            # would only delay StoreUnavailableError while Redis is really gone. A timeout
            # is not retried: Redis did not answer in SOCKET_TIMEOUT, and waiting as long
            # again would double the time every caller is held.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            max_connections=MAX_THREADS * 2,
        )
        self._client = redis.Redis(connection_pool=self._pool)
        self._limiter = trio.CapacityLimiter(MAX_THREADS)
        # Never waited on: only holders of a `_limiter` token start threads.
        self._threads = trio.CapacityLimiter(MAX_THREADS)
        self._namespace = namespace
        self._prefix = f"{settings.key_prefix}:" if settings.key_prefix else ""
        self._where = f"redis://{settings.host}:{settings.port}/{settings.db}"
        self._group: GroupCommit[Sequence[Command]] = GroupCommit(self._commit, self._commit_one)
        #: Calls keep trying while Redis refuses connections (0 s: they fail at once).
        self._ride_through = RideThrough(ride_through, self._where)

    @classmethod
    async def connect(
        cls, settings: RedisSettings, namespace: Namespace, *, ride_through: float = 0.0
    ) -> RedisStateStore:
        """Open a pool and check it with PING; StoreUnavailableError when Redis does not answer
        (PING is not retried, whatever `ride_through`)."""
        store = cls(settings, namespace, ride_through=ride_through)
        try:
            await store.ping()
        except BaseException:
            store._pool.disconnect()
            raise
        return store

    # --- plumbing ---------------------------------------------------------------------

    def set_write_linger(self, seconds: float) -> None:
        self._group.linger = seconds

    def _key(self, *parts: str) -> str:
        return self._prefix + self._namespace.key(*parts)

    def _outbound_keys(self, channel_id: str, message_id: str) -> tuple[str, str]:
        record = self._key(channel_id, "outbound_messages", message_id)
        return record, f"{record}:event_order"

    async def _call(self, fn: Callable[[redis.Redis], T]) -> T:
        """Run fn(client) in a worker thread; the one place Redis errors are translated."""
        with trio.move_on_after(THREAD_WAIT) as waiting:
            await self._limiter.acquire()
        if waiting.cancelled_caught:
            raise StoreUnavailableError(
                f"{self._where}: no answer (all {MAX_THREADS} connections busy for "
                f"{THREAD_WAIT:g} s)"
            )
        try:
            return await trio.to_thread.run_sync(fn, self._client, limiter=self._threads)
        except redis.RedisError as exc:
            # ConnectionError: refused, reset, or still loading its data (BusyLoadingError);
            # a TimeoutError is not, as waiting SOCKET_TIMEOUT again would hold every caller.
            unreachable = isinstance(exc, redis.ConnectionError)
            raise StoreUnavailableError(f"{self._where}: {exc}", unreachable=unreachable) from exc
        finally:
            self._limiter.release()

    async def _ride(self, op: Callable[[], Awaitable[T]]) -> T:
        """op(), tried again while Redis refuses connections (ipc/ride_through.py)."""
        return await self._ride_through.run(op)

    async def _ride_call(self, fn: Callable[[redis.Redis], T]) -> T:
        """_call(fn), riding out Redis refusing connections (see _ride)."""
        return await self._ride(functools.partial(self._call, fn))

    async def _execute(self, *commands: Command, atomic: bool = True) -> list[Any]:
        """Send the commands in one round trip and return their replies.

        atomic wraps them in MULTI/EXEC, so a write never lands without its TTL, together
        with the atomic commands other tasks have ready (ipc/group_commit.py); reads skip
        it, as a half-applied read (value without refresh) is harmless and MULTI/EXEC costs
        two more commands per call.
        """
        if atomic:
            replies: list[Any] = await self._ride(functools.partial(self._group.run, commands))
            return replies
        return await self._ride_call(functools.partial(_pipeline, commands, atomic=False))

    async def _commit_one(self, write: Sequence[Command]) -> list[Any]:
        with trio.CancelScope(shield=True):
            replies = await self._call(functools.partial(_pipeline, write, atomic=True))
        return replies

    async def _commit(self, batch: Sequence[Sequence[Command]]) -> list[outcome.Outcome[Any]]:
        """Every write of `batch` (two or more: one goes to _commit_one) in one MULTI/EXEC;
        each gets its own replies, or the error of its own failed command (Redis runs the
        others of the transaction regardless). When the transaction was refused whole (a
        command Redis would not queue), each write is sent alone; when Redis did not answer,
        each would fail too."""
        commands = [command for write in batch for command in write]
        try:
            with trio.CancelScope(shield=True):
                replies = await self._call(
                    functools.partial(_pipeline, commands, atomic=True, raise_on_error=False)
                )
        except StoreUnavailableError as exc:
            if not isinstance(exc.__cause__, redis.ResponseError):
                return [
                    outcome.Error(StoreUnavailableError(str(exc), unreachable=exc.unreachable))
                    for _ in batch
                ]
            return [await outcome.acapture(self._commit_one, write) for write in batch]
        results: list[outcome.Outcome[Any]] = []
        start = 0
        for write in batch:
            own = replies[start : start + len(write)]
            start += len(write)
            failed = next((r for r in own if isinstance(r, redis.RedisError)), None)
            if failed is None:
                results.append(outcome.Value(own))
            else:
                results.append(outcome.Error(StoreUnavailableError(f"{self._where}: {failed}")))
        return results

    # --- channels ---------------------------------------------------------------------

    async def save_channel(self, channel_id: str, properties: JsonObject) -> None:
        await self._execute(
            ("SET", self._key(channel_id, "properties"), _dump(properties)),
            ("SADD", self._key("channels"), channel_id),
        )

    async def get_channel(self, channel_id: str) -> JsonObject | None:
        (raw,) = await self._execute(("GET", self._key(channel_id, "properties")), atomic=False)
        return None if raw is None else json.loads(raw)

    async def list_channels(self) -> list[str]:
        (members,) = await self._execute(("SMEMBERS", self._key("channels")), atomic=False)
        return sorted(members)

    async def delete_channel(self, channel_id: str) -> bool:
        fixed = (self._key(channel_id, "properties"), self._key(channel_id, "status"))
        pattern = _glob_escape(self._key(channel_id, "")) + "*"

        def run(client: redis.Redis) -> bool:
            with client.pipeline(transaction=True) as pipe:
                pipe.srem(self._key("channels"), channel_id)
                pipe.delete(*fixed)
                removed_member, removed_keys = pipe.execute()
            batch: list[str] = []
            for key in client.scan_iter(match=pattern, count=SCAN_BATCH):
                batch.append(key)
                if len(batch) >= SCAN_BATCH:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)
            return bool(removed_member or removed_keys)

        return await self._ride_call(run)

    # --- status -----------------------------------------------------------------------

    async def set_status(self, channel_id: str, component: str, status: JsonObject) -> None:
        await self._execute(("HSET", self._key(channel_id, "status"), component, _dump(status)))

    async def get_statuses(self, channel_id: str) -> dict[str, JsonObject]:
        (raw,) = await self._execute(("HGETALL", self._key(channel_id, "status")), atomic=False)
        return {component: json.loads(value) for component, value in raw.items()}

    # --- message records --------------------------------------------------------------

    async def put_inbound(
        self, channel_id: str, message_id: str, message: JsonObject, ttl: float
    ) -> None:
        key = self._key(channel_id, "inbound_messages", message_id)
        await self._execute(("HSET", key, "message", _dump(message)), ("PEXPIRE", key, _ms(ttl)))

    async def get_inbound(self, channel_id: str, message_id: str, ttl: float) -> JsonObject | None:
        key = self._key(channel_id, "inbound_messages", message_id)
        raw, _ = await self._execute(
            ("HGET", key, "message"), ("PEXPIRE", key, _ms(ttl)), atomic=False
        )
        return None if raw is None else json.loads(raw)

    def _put_outbound(self, cid: str, mid: str, record: str, ttl_ms: int) -> list[Command]:
        key, order = self._outbound_keys(cid, mid)
        return [
            ("HSET", key, "message", record),
            ("PEXPIRE", key, ttl_ms),
            ("PEXPIRE", order, ttl_ms),
        ]

    def _add_event(
        self, cid: str, mid: str, event_id: str, event: str, ttl_ms: int
    ) -> list[Command]:
        key, order = self._outbound_keys(cid, mid)
        return [
            ("HSET", key, event_id, event),
            ("RPUSH", order, event_id),
            ("PEXPIRE", key, ttl_ms),
            ("PEXPIRE", order, ttl_ms),
        ]

    async def put_outbound(
        self, channel_id: str, message_id: str, record: JsonObject, ttl: float
    ) -> None:
        await self._execute(*self._put_outbound(channel_id, message_id, _dump(record), _ms(ttl)))

    async def add_event(
        self, channel_id: str, message_id: str, event_id: str, event: JsonObject, ttl: float
    ) -> JsonObject | None:
        key, _ = self._outbound_keys(channel_id, message_id)
        *_, raw = await self._execute(
            *self._add_event(channel_id, message_id, event_id, _dump(event), _ms(ttl)),
            ("HGET", key, "message"),
        )
        return None if raw is None else json.loads(raw)

    async def write_outbound(self, writes: OutboundWrites) -> None:
        mid, ttl_ms = writes.message_id, _ms(writes.ttl)
        record = None if writes.record is None else _dump(writes.record)
        entry = None if writes.entry is None else (writes.entry[0], _dump(writes.entry[1]))
        commands: list[Command] = []
        for owner in writes.owners:
            if record is not None:
                commands += self._put_outbound(owner, mid, record, ttl_ms)
            if entry is not None:
                commands += self._add_event(owner, mid, *entry, ttl_ms)
        for rate in writes.rates:
            commands += self._incr_rate(rate)
        if commands:
            await self._execute(*commands)

    async def get_outbound(
        self, channel_id: str, message_id: str, ttl: float
    ) -> OutboundRecord | None:
        key, order = self._outbound_keys(channel_id, message_id)
        fields, event_ids, _, _ = await self._execute(
            ("HGETALL", key),
            ("LRANGE", order, 0, -1),
            ("PEXPIRE", key, _ms(ttl)),
            ("PEXPIRE", order, _ms(ttl)),
            atomic=False,
        )
        if not fields:
            return None
        raw_message = fields.pop("message", None)
        events = {event_id: json.loads(value) for event_id, value in fields.items()}
        # dict.fromkeys dedupes ids pushed twice (a redelivered event) keeping the first.
        ordered = [events.pop(eid) for eid in dict.fromkeys(event_ids) if eid in events]
        ordered.extend(
            event
            for _, event in sorted(
                events.items(), key=lambda item: (str(item[1].get("timestamp", "")), item[0])
            )
        )
        message = None if raw_message is None else json.loads(raw_message)
        return OutboundRecord(message=message, events=ordered)

    # --- rates ------------------------------------------------------------------------

    def _incr_rate(self, rate: RateCount) -> list[Command]:
        key = self._key(rate.owner_id, rate.label, str(rate.bucket))
        return [("INCR", key), ("PEXPIRE", key, _ms(rate.ttl))]

    async def incr_rates(self, rates: Sequence[RateCount]) -> None:
        commands = [command for rate in rates for command in self._incr_rate(rate)]
        if commands:
            await self._execute(*commands)

    async def get_rates(self, owner_id: str, labels: Sequence[str], bucket: int) -> dict[str, int]:
        if not labels:
            return {}
        keys = [self._key(owner_id, label, str(bucket)) for label in labels]
        (values,) = await self._execute(("MGET", *keys), atomic=False)
        return {label: int(value or 0) for label, value in zip(labels, values, strict=True)}

    # --- small keyed records -----------------------------------------------------------

    def _kv_keys(self, scope: str) -> tuple[str, str]:
        # A hash of values and a sorted set of expiry times (ms; "+inf" = no TTL) per scope;
        # Redis 7.0 has no per-field TTL, so expired fields are dropped by kv_put and ignored
        # by readers.
        return self._key(scope, "kv"), self._key(scope, "kv_expiry")

    def _kv_command(
        self, script: str, scope: str, key: str, value: JsonObject, ttl: float | None, now: int
    ) -> Command:
        """One of the kv write scripts (same keys and arguments), to run with the other
        writes ready (ipc/group_commit.py). EVAL, not EVALSHA: inside MULTI/EXEC a script
        Redis does not know (after its restart) could not be loaded and retried."""
        values, expiry = self._kv_keys(scope)
        expires = "+inf" if ttl is None else str(now + _ms(ttl))
        return ("EVAL", script, 2, values, expiry, now, key, _dump(value), expires, KV_SWEEP_BATCH)

    async def _kv_write(
        self, script: str, scope: str, key: str, value: JsonObject, ttl: float | None
    ) -> object:
        """Run one kv write script; its answer."""
        (answer,) = await self._execute(self._kv_command(script, scope, key, value, ttl, _now_ms()))
        return answer

    async def kv_put(
        self, scope: str, key: str, value: JsonObject, ttl: float | None = None
    ) -> None:
        await self.kv_put_many((KvEntry(scope, key, value, ttl),))

    async def kv_put_many(self, entries: Sequence[KvEntry]) -> None:
        now = _now_ms()
        commands = [
            self._kv_command(_KV_PUT_LUA, e.scope, e.key, e.value, e.ttl, now) for e in entries
        ]
        if commands:
            await self._execute(*commands)

    async def kv_put_if_absent(
        self, scope: str, key: str, value: JsonObject, ttl: float | None = None
    ) -> bool:
        return bool(await self._kv_write(_KV_PUT_IF_ABSENT_LUA, scope, key, value, ttl))

    async def kv_get(self, scope: str, key: str) -> JsonObject | None:
        values, expiry = self._kv_keys(scope)
        raw, score = await self._execute(
            ("HGET", values, key), ("ZSCORE", expiry, key), atomic=False
        )
        if raw is None or score is None or float(score) <= _now_ms():
            return None
        result: JsonObject = json.loads(raw)
        return result

    async def kv_delete(self, scope: str, key: str) -> bool:
        values, expiry = self._kv_keys(scope)
        score, removed, _ = await self._execute(
            ("ZSCORE", expiry, key), ("HDEL", values, key), ("ZREM", expiry, key)
        )
        return bool(removed) and score is not None and float(score) > _now_ms()

    async def kv_delete_if(self, scope: str, key: str, value: JsonObject) -> bool:
        # The script ignores the expiry argument (ttl None).
        return bool(await self._kv_write(_KV_DELETE_IF_LUA, scope, key, value, None))

    async def kv_items(self, scope: str) -> dict[str, JsonObject]:
        values, expiry = self._kv_keys(scope)
        now = _now_ms()

        def run(client: redis.Redis) -> dict[str, JsonObject]:
            live = [str(key) for key in client.zrangebyscore(expiry, f"({now}", "+inf")]
            found: dict[str, JsonObject] = {}
            for start in range(0, len(live), SCAN_BATCH):
                batch = live[start : start + SCAN_BATCH]
                for key, raw in zip(batch, client.hmget(values, batch), strict=True):
                    if raw is not None:
                        found[key] = json.loads(raw)
            return dict(sorted(found.items()))

        return await self._ride_call(run)

    async def kv_clear(self, scope: str) -> None:
        await self._execute(("DEL", *self._kv_keys(scope)))

    # --- lifecycle and maintenance ----------------------------------------------------

    async def ping(self) -> None:
        await self._call(lambda client: client.ping())

    async def aclose(self) -> None:
        # Closing the pooled sockets does not block, so no worker thread is needed.
        self._pool.disconnect()
        await trio.lowlevel.checkpoint()

    def _namespace_pattern(self) -> str:
        if not self._namespace.prefix:
            raise ValueError("refusing to scan the whole keyspace: the namespace has no prefix")
        return _glob_escape(self._prefix + self._namespace.key("")) + "*"

    async def keys_in_namespace(self) -> list[str]:
        """Every key under this store's (non-empty) namespace, sorted; for tests and tooling."""
        pattern = self._namespace_pattern()
        return await self._call(
            lambda client: sorted(client.scan_iter(match=pattern, count=SCAN_BATCH))
        )

    async def purge_namespace(self) -> int:
        """Delete every key under this store's (non-empty) namespace; returns how many."""
        pattern = self._namespace_pattern()

        def run(client: redis.Redis) -> int:
            keys = list(client.scan_iter(match=pattern, count=SCAN_BATCH))
            for start in range(0, len(keys), SCAN_BATCH):
                client.unlink(*keys[start : start + SCAN_BATCH])
            return len(keys)

        return await self._call(run)
