"""Idempotent sends (issue 7): a client key (`Idempotency-Key` header or `idempotency_key` body
field) under which the first send's 201 result is kept for a day; a repeat returns it.

Stored: scope "{owner_id}:idempotency" (owner = the channel, or the destination sending),
key = the client's key, value = the result, ttl IDEMPOTENCY_TTL. Within one API worker, sends
with one key run one at a time, so a retry racing its original still finds the result.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio
from quart import current_app, request

from api.errors import ApiUsageError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

JsonObject = dict[str, Any]

HEADER = "Idempotency-Key"
BODY_FIELD = "idempotency_key"
MAX_KEY_LENGTH = 200
IDEMPOTENCY_TTL = 86400
_LOCKS_KEY = "junebug.idempotency_locks"


def idempotency_scope(owner_id: str) -> str:
    return f"{owner_id}:idempotency"


def requested_key(body: JsonObject) -> str | None:
    """The request's key: header or body field (the same when both are given); 400 if bad."""
    header = request.headers.get(HEADER)
    field = body.get(BODY_FIELD)
    if header is not None:
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
