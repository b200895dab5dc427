"""Idempotent sends (issue 7): a client key (`Idempotency-Key` header or `idempotency_key` body
field) under which the first send's 201 result is kept for a day; a repeat returns it.

Stored: scope "{owner_id}:idempotency" (owner = the channel, or the destination sending),
key = the client's key. The key is first reserved with StateStore.kv_put_if_absent (value
{PENDING_FIELD: token}, ttl RESERVATION_TTL), so of sends racing in any number of API workers
exactly one sends; the winner replaces the reservation with its result (ttl IDEMPOTENCY_TTL),
or releases it when the send failed. A duplicate waits for that result (up to
DUPLICATE_WAIT seconds, then 409). Within one worker, sends with one key also run one at a
time, so they wait on a lock instead of polling the store.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import trio
from quart import current_app, request

from api.errors import ApiError, ApiUsageError
from api.store_wait import RELEASE_GRACE, poll_store
from ipc.errors import StoreUnavailableError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from ipc.state import StateStore

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

HEADER = "Idempotency-Key"
BODY_FIELD = "idempotency_key"
MAX_KEY_LENGTH = 200
IDEMPOTENCY_TTL = 86400
#: The field marking a reservation (a send in progress) rather than a result.
PENDING_FIELD: Final = "_idempotency_pending"
#: Seconds a reservation lasts: a worker that dies mid-send frees its key after this.
RESERVATION_TTL: Final = 60.0
#: Seconds a duplicate waits for the first send's result before 409.
DUPLICATE_WAIT: Final = 30.0
_LOCKS_KEY = "junebug.idempotency_locks"


class IdempotencyKeyInUseError(ApiError):
    status = 409
    description = "idempotency key in use"
    error_type = "IdempotencyKeyInUse"


def idempotency_scope(owner_id: str) -> str:
    return f"{owner_id}:idempotency"


def requested_key(body: JsonObject) -> str | None:
    """The request's key: header or body field (the same when both are given); 400 if bad."""
    # getlist: a missing header costs get() a KeyError, and few sends carry one.
    headers = request.headers.getlist(HEADER)
    field = body.get(BODY_FIELD)
    if headers:
        header = headers[0]
        if not header or len(header) > MAX_KEY_LENGTH:
            raise ApiUsageError(f"{HEADER} must be 1 to {MAX_KEY_LENGTH} characters long")
        if field is not None and field != header:
            raise ApiUsageError(f"{HEADER} and {BODY_FIELD} differ: give one of them")
        return header
    # The body schema bounds the field's length.
    return field if isinstance(field, str) else None


class KeyedLocks:
    """One trio.Lock per key while anyone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (trio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def idempotency_locks() -> KeyedLocks:
    locks: KeyedLocks = current_app.extensions.setdefault(_LOCKS_KEY, KeyedLocks())
    return locks


async def send_once(
    store: StateStore, scope: str, key: str, submit: Callable[[], Awaitable[JsonObject]]
) -> tuple[JsonObject, bool]:
    """(result, replayed): `submit()`'s result if this call reserved the key, else the result
    of the send that did (replayed True). 409 when that send is still running after
    DUPLICATE_WAIT seconds."""
    async with idempotency_locks().hold(f"{scope}\0{key}"):

        async def reserve_or_replay() -> tuple[JsonObject, bool] | None:
            token = uuid.uuid4().hex
            if await store.kv_put_if_absent(scope, key, {PENDING_FIELD: token}, RESERVATION_TTL):
                return await _send_reserved(store, scope, key, token, submit), False
            earlier = await store.kv_get(scope, key)
            if earlier is not None and PENDING_FIELD not in earlier:
                return earlier, True
            # Pending in another worker, or released (that send failed) in between: wait a
            # little and try to reserve again.
            return None

        def in_use() -> ApiError:
            return IdempotencyKeyInUseError(
                f"A send with {HEADER} {key!r} is still in progress; retry later"
            )

        return await poll_store(reserve_or_replay, wait=DUPLICATE_WAIT, give_up=in_use)


async def _send_reserved(
    store: StateStore,
    scope: str,
    key: str,
    token: str,
    submit: Callable[[], Awaitable[JsonObject]],
) -> JsonObject:
    try:
        result = await submit()
    except BaseException:
        # Nothing was queued (publishing is the send's last step that can fail): a retry
        # with this key must be able to send.
        with trio.move_on_after(RELEASE_GRACE, shield=True):
            await _release(store, scope, key, token)
        raise
    try:
        await store.kv_put(scope, key, result, IDEMPOTENCY_TTL)
    except StoreUnavailableError as exc:
        # Queued is queued: failing now would invite the very retry the key is for. The
        # reservation stays until it expires, so duplicates meanwhile get 409, not a resend.
        log.warning("idempotency key of message %s not kept: %s", result.get("message_id"), exc)
    return result


async def _release(store: StateStore, scope: str, key: str, token: str) -> None:
    """Remove our reservation (not a result or another send's reservation)."""
    try:
        await store.kv_delete_if(scope, key, {PENDING_FIELD: token})
    except StoreUnavailableError as exc:
        log.warning(
            "idempotency key %r of %s not released (it expires in %g s): %s",
            key,
            scope,
            RESERVATION_TTL,
            exc,
        )
