"""The status actor: sole owner of the channel's component statuses.

It records each reported status, writes the latest per component to the store,
POSTs each to the channel's status_url, and answers status queries. While the store
cannot be written it reports the `store` component down, keeps the latest statuses and
writes them once the store is back.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import deque
from typing import TYPE_CHECKING, Final

import trio

from channel_proc.backoff import Backoff
from channel_proc.events import JsonObject, StatusMail, StatusQuery, StatusReported
from channel_proc.transports.base import StatusLevel
from channel_proc.webhook import Callback, WebhookError, post_json, safe_url
from ipc.errors import StoreUnavailableError

if TYPE_CHECKING:
    import httpx

    from channel_proc.counters import Counters
    from ipc.state import StateStore

log = logging.getLogger(__name__)

#: Status POSTs waiting for status_url; past this the oldest are dropped (with a log line).
POST_BACKLOG: Final = 100
POST_ATTEMPTS: Final = 3
#: The mailbox is large because `StatusReporter.report` never waits.
MAILBOX_SIZE: Final = 256
#: The component under which the actor reports the state store itself.
STORE_COMPONENT: Final = "store"
#: Longest wait between attempts to write statuses while the store is unavailable.
STORE_RETRY_CAP: Final = 5.0
#: Seconds between pings of the store (how soon a store lost while idle is reported).
STORE_CHECK_INTERVAL: Final = 2.0


class _Wakeup:
    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


def status_record(channel_id: str, report: StatusReported) -> JsonObject:
    """The 6-field status object of docs 1.8.4."""
    return {
        "component": report.component,
        "channel_id": channel_id,
        "status": report.level.value,
        "type": report.type,
        "message": report.message,
        "details": dict(report.details),
    }


class _Book:
    """The actor's state: latest status per component, what is still to store and to post,
    and whether the store is down (since when)."""

    def __init__(self, channel_id: str, posting: bool) -> None:
        self.channel_id = channel_id
        self.components: dict[str, JsonObject] = {}
        # Only the latest status of a component is stored, so store writes coalesce.
        self.unstored: dict[str, JsonObject] = {}
        self.unposted: deque[JsonObject] = deque()
        self.store_wakeup = _Wakeup()
        self.post_wakeup = _Wakeup()
        self.posting = posting
        self.store_down_since: float | None = None

    def record(self, report: StatusReported) -> None:
        entry = status_record(self.channel_id, report)
        self.components[report.component] = entry
        self.unstored[report.component] = entry
        self.store_wakeup.set()
        if self.posting:
            if len(self.unposted) >= POST_BACKLOG:
                dropped = self.unposted.popleft()
                log.warning(
                    "status_url backlog full; not posting %s status %s",
                    dropped["component"],
                    dropped["type"],
                )
            self.unposted.append(entry)
            self.post_wakeup.set()

    def store_failed(self, exc: StoreUnavailableError) -> None:
        """The store failed a write or a ping. Only a write can end this (`store_wrote`);
        until then the `store` status itself is pending, so the writer keeps trying."""
        if self.store_down_since is None:
            self.store_down_since = trio.current_time()
            log.error("the state store is unavailable: %s", exc)
            self.record(_store_down(exc))

    def store_wrote(self) -> None:
        if self.store_down_since is not None:
            outage = trio.current_time() - self.store_down_since
            self.store_down_since = None
            log.info("the state store is writable again after %.1f s", outage)
            self.record(_store_recovered(outage))


async def run_status_actor(
    mail_recv: trio.MemoryReceiveChannel[StatusMail],
    *,
    channel_id: str,
    store: StateStore,
    http: httpx.AsyncClient,
    status_url: str | None,
    store_check_interval: float = STORE_CHECK_INTERVAL,
    signing_secret: str | None = None,
    counters: Counters | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled or until every sender of `mail_recv` is closed.

    status_url may be a template (channel_proc.templates); `signing_secret` signs its POSTs;
    failed POST attempts count in `counters` (webhook_failures_total, status_url)."""
    target = _status_target(status_url, signing_secret)
    book = _Book(channel_id, posting=target is not None)

    async def write_to_store() -> None:
        retry = Backoff(initial=0.2, cap=STORE_RETRY_CAP)
        while True:
            await book.store_wakeup.wait()
            while book.unstored:
                component, entry = next(iter(book.unstored.items()))
                try:
                    await store.set_status(channel_id, component, entry)
                except StoreUnavailableError as exc:
                    book.store_failed(exc)
                    await trio.sleep(retry.next_delay())
                    continue
                retry.reset()
                # A newer status of the component may have arrived during the write.
                if book.unstored.get(component) is entry:
                    del book.unstored[component]
                book.store_wrote()

    async def check_store() -> None:
        # Statuses are rare, so a store lost while nothing is written is noticed here.
        while True:
            await trio.sleep(store_check_interval)
            try:
                await store.ping()
            except StoreUnavailableError as exc:
                book.store_failed(exc)

    async def post_to_status_url(target: Callback) -> None:
        while True:
            await book.post_wakeup.wait()
            while book.unposted:
                await _post_with_retries(http, target, book.unposted.popleft(), counters)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_to_store)
        nursery.start_soon(check_store)
        if target is not None:
            nursery.start_soon(post_to_status_url, target)
        task_status.started()
        async with mail_recv:
            async for mail in mail_recv:
                match mail:
                    case StatusReported():
                        book.record(mail)
                    case StatusQuery():
                        # The asker may have given up (cancelled) in the meantime.
                        with contextlib.suppress(trio.BrokenResourceError):
                            mail.reply.send_nowait(dict(book.components))
        nursery.cancel_scope.cancel()


def _store_down(exc: StoreUnavailableError) -> StatusReported:
    return StatusReported(
        component=STORE_COMPONENT,
        level=StatusLevel.DOWN,
        type="unavailable",
        message="The state store is unavailable; statuses are kept until it is back",
        details={"error": str(exc)},
    )


def _store_recovered(outage: float) -> StatusReported:
    return StatusReported(
        component=STORE_COMPONENT,
        level=StatusLevel.OK,
        type="recovered",
        message=f"The state store is writable again after {outage:.1f} s",
        details={"outage_seconds": round(outage, 1)},
    )


def _status_target(status_url: str | None, signing_secret: str | None) -> Callback | None:
    if not status_url:
        return None
    target = Callback(status_url, signing_secret=signing_secret)
    try:
        target.check()
        return target
    except WebhookError as exc:
        log.error(
            "status_url %s is unusable, statuses will not be posted: %s",
            safe_url(status_url),
            exc.reason,
        )
        return None


async def _post_with_retries(
    http: httpx.AsyncClient, callback: Callback, record: JsonObject, counters: Counters | None
) -> None:
    """A few bounded attempts: statuses are also in the store, so a lost POST costs little."""
    backoff = Backoff(initial=0.5, cap=5.0)
    values = {k: record.get(k) for k in ("channel_id", "component", "status")}
    # A status has no id of its own: one per POST, the same for its retries.
    delivery = uuid.uuid4().hex
    for attempt in range(1, POST_ATTEMPTS + 1):
        try:
            await post_json(http, callback.target(values), record, delivery=delivery)
        except WebhookError as exc:
            if counters is not None:
                counters.inc("webhook_failures_total", "status_url")
            if exc.permanent or attempt == POST_ATTEMPTS:
                log.warning(
                    "could not post %s status %s to status_url: %s",
                    record["component"],
                    record["type"],
                    exc.reason,
                )
                return
            await trio.sleep(backoff.next_delay())
        else:
            return
