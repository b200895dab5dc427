"""One bind to the SMSC over TCP: connect, bind, keep alive, answer, reconnect; unbind on stop.

`BindLoop.run` owns the connection's tasks. Requests (`Connection.request`) wait for
their response; when the connection is lost every waiting request fails with LinkDown
and the loop reconnects after a capped backoff (slowly when the credentials are refused).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import trio

from channel_proc.backoff import Backoff
from channel_proc.transports.base import StatusLevel
from channel_proc.transports.smpp.pdu import STATUS_CODES, FramingError, status_name
from channel_proc.transports.smpp.session import (
    Answered,
    BindMode,
    PeerUnbound,
    Replied,
    Requested,
    Session,
    SessionState,
    Unreadable,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from channel_proc.transports.smpp.config import SmppConfig
    from channel_proc.transports.smpp.pdu import Pdu, PduError
    from channel_proc.transports.smpp.session import Outgoing

log = logging.getLogger(__name__)
#: One line per PDU, so an operator can follow a bind (raise its level to silence it).
pdu_log = logging.getLogger("channel_proc.transports.smpp.pdus")

RECEIVE_SIZE: Final = 65536
#: Bounded cleanup: the unbind handshake when stopping.
UNBIND_TIMEOUT: Final = 2.0
#: Reconnect delays grow to this (or to initial_reconnect_delay when that is longer).
BACKOFF_CAP: Final = 60.0
#: A refused login is retried no sooner than this: hammering a bind with a bad password
#: can get an account locked.
BAD_CREDENTIALS_DELAY: Final = 60.0
BAD_CREDENTIALS: Final = frozenset(
    STATUS_CODES[name] for name in ("ESME_RINVPASWD", "ESME_RINVSYSID", "ESME_RBINDFAIL")
)
#: deliver_sm/data_sm handled at once per connection; more waits (backpressure on the SMSC).
INBOUND_CONCURRENCY: Final = 64


class LinkDown(Exception):  # noqa: N818 — a condition, not a programming error
    """The connection is gone (or was never bound); a request may be retried on the next."""


class StatusSink(Protocol):
    def __call__(
        self, level: StatusLevel, type_: str, message: str, details: dict[str, object]
    ) -> None: ...


class RequestHandler(Protocol):
    """The transport's side of a bind: answers what the SMSC asks."""

    async def request(self, connection: Connection, pdu: Pdu) -> None: ...

    async def unreadable(self, connection: Connection, error: PduError) -> None: ...


@dataclass(eq=False, slots=True)
class Waiter:
    """The answer to one request: `response` is None when the connection was lost first.

    `on_done` runs once, when the answer (or the loss) is known, even if nobody waits any
    more: the submit window frees its slot there.
    """

    on_done: Callable[[], None] | None = None
    done: trio.Event = field(default_factory=trio.Event)
    response: Pdu | None = None

    def resolve(self, response: Pdu | None) -> None:
        if self.done.is_set():
            return
        self.response = response
        self.done.set()
        if self.on_done is not None:
            self.on_done()


class Connection:
    """A bound (or binding) session on one TCP stream."""

    def __init__(self, stream: trio.abc.Stream, session: Session, name: str) -> None:
        self.stream = stream
        self.session = session
        self.name = name
        self.scope = trio.CancelScope()
        self.lost_reason: str | None = None
        self._write_lock = trio.Lock()
        self._outbox: list[bytes] = []
        self._waiters: dict[int, Waiter] = {}

    @property
    def bound(self) -> bool:
        return self.lost_reason is None and self.session.state is SessionState.BOUND

    def lose(self, reason: str) -> None:
        """The connection is unusable: fail every waiting request and stop its tasks."""
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        waiters = list(self._waiters.values())
        self._waiters.clear()
        for waiter in waiters:
            waiter.resolve(None)
        self.scope.cancel()

    def expect(self, sequence: int, on_done: Callable[[], None] | None = None) -> Waiter:
        """Wait for the answer to request `sequence` (write it after this call)."""
        waiter = Waiter(on_done)
        if self.lost_reason is not None:
            waiter.resolve(None)
        else:
            self._waiters[sequence] = waiter
        return waiter

    async def write(self, data: bytes, pdu: Pdu, note: str = "") -> None:
        """Write one PDU (`note` is appended to its log line). Raises LinkDown when the
        stream is broken.

        PDUs written while another write is on the wire go out together in one send
        (fewer syscalls under load); each writer returns once its own bytes were sent.
        """
        if self.lost_reason is not None:
            raise LinkDown(self.lost_reason)
        if pdu_log.isEnabledFor(logging.INFO):
            pdu_log.info("%s > %s%s", self.name, pdu.summary(), note)
        outbox = self._outbox
        outbox.append(data)
        try:
            async with self._write_lock:
                if not outbox:
                    # An earlier writer sent ours with its own (or failed: then we are lost).
                    if self.lost_reason is not None:
                        raise LinkDown(self.lost_reason)
                    return
                batch = b"".join(outbox) if len(outbox) > 1 else outbox[0]
                outbox.clear()
                try:
                    await self.stream.send_all(batch)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.lose(f"write failed: {exc}")
                    raise LinkDown(f"write failed: {exc}") from exc
                except trio.Cancelled:
                    # Part of the batch may be on the wire: the PDU framing is broken.
                    self.lose("write interrupted")
                    raise
        except trio.Cancelled:
            # Still queued: not sent, and never sent later behind the caller's back.
            for index, queued in enumerate(outbox):
                if queued is data:
                    del outbox[index]
                    break
            raise

    async def request(self, outgoing: Outgoing) -> Pdu:
        """Write a request and wait for its response (the caller bounds the wait).

        Raises:
            LinkDown: the connection was lost before the response came.
        """
        sequence = outgoing.pdu.sequence
        waiter = self.expect(sequence)
        try:
            await self.write(outgoing.data, outgoing.pdu)
            await waiter.done.wait()
        finally:
            if not waiter.done.is_set():
                # Timed out or cancelled: a late answer is only logged.
                self._waiters.pop(sequence, None)
                self.session.forget(sequence)
        if waiter.response is None:
            raise LinkDown(self.lost_reason or "connection lost")
        return waiter.response

    def answered(self, event: Answered) -> None:
        waiter = self._waiters.pop(event.pdu.sequence, None)
        if waiter is None:
            # The request gave up waiting (timed out); its late answer is only logged.
            log.warning("%s: late %s", self.name, event.pdu.summary())
            return
        waiter.resolve(event.pdu)

    async def respond(self, request: Pdu | PduError, status: int = 0) -> None:
        reply, data = self.session.respond(request, status)
        await self.write(data, reply)


@dataclass(frozen=True, slots=True, kw_only=True)
class BindSettings:
    host: str
    port: int
    mode: BindMode
    bind_params: dict[str, object]
    bind_timeout: float
    enquire_interval: float
    initial_reconnect_delay: float

    @classmethod
    def from_config(cls, config: SmppConfig, mode: BindMode) -> BindSettings:
        options = config.options
        try:
            version = int(config.interface_version, 16)
        except ValueError:
            version = 0x34
        return cls(
            host=options.host,
            port=options.port,
            mode=mode,
            bind_params={
                "system_id": config.system_id,
                # SMPP passwords are at most 8 octets; longer ones are cut, as vumi did.
                "password": config.password.get_secret_value()[:8],
                "system_type": config.system_type,
                "interface_version": version,
                "addr_ton": config.source_addr_ton,
                "addr_npi": config.source_addr_npi,
                "address_range": config.address_range,
            },
            bind_timeout=config.smpp_bind_timeout,
            enquire_interval=config.smpp_enquire_link_interval,
            initial_reconnect_delay=config.initial_reconnect_delay,
        )


class BindLoop:
    """Keeps one bind up for as long as `run` runs."""

    def __init__(self, settings: BindSettings, handler: RequestHandler, status: StatusSink) -> None:
        self.settings = settings
        self.name = settings.mode.name.lower()
        self._handler = handler
        self._status = status
        self.connection: Connection | None = None
        #: Set once the first connection attempt has ended (bound or failed).
        self.attempted = trio.Event()
        self._bound = trio.Event()
        self._backoff = Backoff(
            initial=settings.initial_reconnect_delay,
            cap=max(BACKOFF_CAP, settings.initial_reconnect_delay),
        )

    @property
    def bound_connection(self) -> Connection | None:
        conn = self.connection
        return conn if conn is not None and conn.bound else None

    async def wait_bound(self) -> Connection:
        while (conn := self.bound_connection) is None:
            await self._bound.wait()
        return conn

    async def run(self) -> None:
        """Bind, serve, and rebind after any loss, until cancelled (then unbind)."""
        while True:
            delay = await self._attempt()
            self.attempted.set()
            await trio.sleep(delay)

    def _details(self, **extra: object) -> dict[str, object]:
        s = self.settings
        return {"host": s.host, "port": s.port, "bind_type": self.name, **extra}

    async def _attempt(self) -> float:
        """One connection's life; returns the delay before the next attempt."""
        s = self.settings
        self._status(StatusLevel.DOWN, "binding", "Binding", self._details())
        try:
            with trio.fail_after(s.bind_timeout):
                stream = await trio.open_tcp_stream(s.host, s.port)
        except (OSError, trio.TooSlowError) as exc:
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else exc.strerror or str(exc)
            return self._failed("connection_lost", f"Cannot connect to {s.host}:{s.port}: {reason}")
        conn = Connection(stream, Session(s.mode), f"{self.name}@{s.host}:{s.port}")
        try:
            return await self._serve(conn)
        finally:
            self.connection = None
            self._bound = trio.Event()
            with trio.move_on_after(UNBIND_TIMEOUT, shield=True):
                if conn.bound:
                    await self._unbind(conn)
                await stream.aclose()

    def _failed(self, type_: str, message: str, *, delay: float | None = None) -> float:
        wait = self._backoff.next_delay() if delay is None else delay
        log.warning("%s; retrying in %.1f s", message, wait)
        self._status(StatusLevel.DOWN, type_, message, self._details(retry_in=round(wait, 1)))
        return wait

    async def _serve(self, conn: Connection) -> float:
        s = self.settings
        with conn.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, conn)
                outgoing = conn.session.bind(s.bind_params)
                response = None
                with trio.move_on_after(s.bind_timeout) as timeout:
                    with contextlib.suppress(LinkDown):
                        response = await conn.request(outgoing)
                if response is None and not timeout.cancelled_caught:
                    return self._failed("connection_lost", f"Connection lost: {conn.lost_reason}")
                if response is None:
                    conn.lose("bind timed out")
                    return self._failed(
                        "bind_failed", f"Timed out awaiting bind ({s.bind_timeout:g} s)"
                    )
                if not response.ok:
                    conn.lose("bind refused")
                    name = status_name(response.status)
                    slow = response.status in BAD_CREDENTIALS
                    return self._failed(
                        "bind_failed",
                        f"Bind refused: {name}",
                        delay=max(BAD_CREDENTIALS_DELAY, self._backoff.cap) if slow else None,
                    )
                self._backoff.reset()
                self.connection = conn
                self._bound.set()
                log.info("bound as %s to %s:%d", self.name, s.host, s.port)
                self._status(StatusLevel.OK, "bound", "Bound", self._details())
                self.attempted.set()
                nursery.start_soon(self._keepalive, conn)
        reason = conn.lost_reason or "connection closed"
        return self._failed("connection_lost", f"Connection lost: {reason}")

    async def _pump(self, conn: Connection) -> None:
        limiter = trio.Semaphore(INBOUND_CONCURRENCY)
        # In the middle of a PDU the rest must come within the bind timeout: a peer that
        # announces more bytes than it sends would otherwise hold the bind until the
        # keep-alive notices (a steady flood always brings more, so it never trips this).
        patience = self.settings.bind_timeout
        async with trio.open_nursery() as handlers:
            while True:
                deadline = trio.current_time() + patience if conn.session.buffered else math.inf
                data = None
                try:
                    with trio.move_on_at(deadline):
                        data = await conn.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    conn.lose(f"read failed: {exc}")
                    return
                if data is None:
                    conn.lose(
                        f"unreadable stream: {conn.session.buffered} bytes of a PDU, and no more"
                        f" for {patience:g} s"
                    )
                    return
                if not data:
                    conn.lose("closed by the SMSC")
                    return
                try:
                    events = conn.session.receive_data(data)
                except FramingError as exc:
                    conn.lose(f"unreadable stream: {exc.reason}")
                    return
                for event in events:
                    await self._dispatch(conn, event, handlers, limiter)

    async def _dispatch(
        self,
        conn: Connection,
        event: Answered | Requested | Replied | Unreadable | PeerUnbound,
        handlers: trio.Nursery,
        limiter: trio.Semaphore,
    ) -> None:
        match event:
            case Answered():
                pdu_log.info("%s < %s", conn.name, event.pdu.summary())
                conn.answered(event)
            case Replied():
                if event.request is not None:
                    pdu_log.info("%s < %s", conn.name, event.request.summary())
                await self._write_or_lose(conn, event.data, event.reply)
            case Requested():
                pdu_log.info("%s < %s", conn.name, event.pdu.summary())
                await limiter.acquire()
                handlers.start_soon(self._handle, conn, event.pdu, limiter)
            case Unreadable():
                log.warning("%s: unreadable %s", conn.name, event.error.reason)
                await self._handler.unreadable(conn, event.error)
            case PeerUnbound():
                conn.lose("unbound by the SMSC")

    async def _write_or_lose(self, conn: Connection, data: bytes, pdu: Pdu) -> None:
        try:
            await conn.write(data, pdu)
        except LinkDown:
            return

    async def _handle(self, conn: Connection, pdu: Pdu, limiter: trio.Semaphore) -> None:
        try:
            await self._handler.request(conn, pdu)
        except LinkDown:
            # The answer could not be written: the SMSC will deliver this PDU again.
            return
        finally:
            limiter.release()

    async def _keepalive(self, conn: Connection) -> None:
        interval = self.settings.enquire_interval
        # The answer may take as long as a bind; never longer than the interval itself.
        patience = min(self.settings.bind_timeout, interval)
        while True:
            await trio.sleep(interval)
            try:
                outgoing = conn.session.request("enquire_link")
            except RuntimeError:
                return
            with trio.move_on_after(patience) as timeout:
                try:
                    await conn.request(outgoing)
                except LinkDown:
                    return
            if timeout.cancelled_caught:
                conn.lose(f"no enquire_link_resp within {patience:g} s")
                return

    async def _unbind(self, conn: Connection) -> None:
        """Say goodbye on a stop: unbind and read until its response (bounded by the caller)."""
        try:
            outgoing = conn.session.request("unbind")
            await conn.write(outgoing.data, outgoing.pdu)
            while conn.session.state is not SessionState.CLOSED:
                data = await conn.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                for event in conn.session.receive_data(data):
                    if isinstance(event, Answered):
                        pdu_log.info("%s < %s", conn.name, event.pdu.summary())
        except (LinkDown, FramingError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        log.info("unbound from %s:%d", self.settings.host, self.settings.port)
        self._status(StatusLevel.DOWN, "unbound", "Unbound", self._details())
