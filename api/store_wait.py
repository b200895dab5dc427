"""Waiting for an entry that another API worker holds in the state store (a lease, an
idempotency reservation): polled with a doubling pause, since neither backend can tell one
worker that another removed an entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TypeVar

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from api.errors import ApiError

T = TypeVar("T")

#: The first and the longest pause between tries (seconds).
POLL_FIRST: Final = 0.01
POLL_MAX: Final = 0.25
#: Seconds given to releasing an entry when its holder fails or is cancelled.
RELEASE_GRACE: Final = 2.0


async def poll_store(
    attempt: Callable[[], Awaitable[T | None]], *, wait: float, give_up: Callable[[], ApiError]
) -> T:
    """`attempt()`'s first answer that is not None; `give_up()` is raised once another try
    would end after `wait` seconds."""
    deadline = trio.current_time() + wait
    pause = POLL_FIRST
    while (result := await attempt()) is None:
        if trio.current_time() + pause > deadline:
            raise give_up()
        await trio.sleep(pause)
        pause = min(2 * pause, POLL_MAX)
    return result
