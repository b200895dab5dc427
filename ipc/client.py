"""IPC client: connect to a Unix socket, exchange Hello, send requests, match replies by id."""

from __future__ import annotations

import itertools
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

import trio

from ipc.connection import Connection
from ipc.errors import ConnectionClosedError, ProtocolError, RemoteError
from ipc.messages import (
    PROTOCOL_VERSION,
    CatalogReply,
    ChildrenReply,
    ErrorReply,
    Hello,
    Ok,
    StatusReply,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.messages import Reply, Request, Role

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    reply: Reply | None = None


class IpcClient:
    """A connected client. Concurrent `request` calls from several tasks are allowed."""

    #: The server's Hello.
    peer: Hello

    def __init__(self, conn: Connection, peer: Hello) -> None:
        self.peer = peer
        self._conn = conn
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        #: Why the connection ended, once it has; new requests fail with it at once.
        self._closed_reason: str | None = None

    async def request(self, msg: Request) -> Reply:
        """Send `msg` (its `id` is replaced by a fresh one) and wait for the matching reply.

        Raises:
            RemoteError: the server answered ErrorReply (error_type, message, code kept).
            ConnectionClosedError: the connection closed before the reply arrived.
        Cancellation: safe; a late reply to a cancelled request is discarded.
        Timeouts belong to the caller (`with trio.fail_after(...)`).
        """
        if self._closed_reason is not None:
            raise self._closed_error()
        request_id = next(self._ids)
        pending = _Pending()
        # No checkpoint between the check above and this: the reader cannot end in between.
        self._pending[request_id] = pending
        try:
            await self._conn.send(msg.model_copy(update={"id": request_id}))
            await pending.done.wait()
        finally:
            self._pending.pop(request_id, None)
        reply = pending.reply
        if reply is None:
            raise self._closed_error()
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.error_type, reply.message, code=reply.code)
        return reply

    def _closed_error(self) -> ConnectionClosedError:
        return ConnectionClosedError(self._closed_reason or "connection closed")

    async def _read_replies(self) -> None:
        """Dispatch replies until the connection ends; then fail every waiting request."""
        reason = "client closed"
        try:
            while True:
                msg = await self._conn.receive()
                match msg:
                    case Ok() | ChildrenReply() | CatalogReply() | StatusReply() | ErrorReply():
                        pending = self._pending.pop(msg.id, None)
                        # None: the request was cancelled, its late reply is dropped.
                        if pending is not None:
                            pending.reply = msg
                            pending.done.set()
                    case _:
                        raise ProtocolError(f"server sent {msg.type!r}, which is not a reply")
        except ConnectionClosedError as exc:
            reason = f"connection to {self.peer.role} closed: {exc}"
        except ProtocolError as exc:
            reason = f"protocol error from {self.peer.role}: {exc}"
            log.warning("IPC %s", reason, extra={"channel_id": self.peer.channel_id})
            await self._conn.aclose()
        finally:
            self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        self._closed_reason = reason
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.done.set()


@asynccontextmanager
async def open_ipc_client(
    path: Path, *, role: Role, channel_id: str | None = None
) -> AsyncIterator[IpcClient]:
    """Connect to the server at `path`, send our Hello, check the server's Hello.

    Leaving the context closes the connection; requests still waiting then fail with
    ConnectionClosedError.

    Raises:
        ConnectionClosedError: nothing listens at `path`, or it closed during the handshake.
        ProtocolError: the server speaks another PROTOCOL_VERSION.
    """
    try:
        stream = await trio.open_unix_socket(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ConnectionClosedError(f"nothing listens at {path}") from exc
    conn = Connection(stream)
    try:
        peer = await _handshake(conn, Hello(role=role, pid=os.getpid(), channel_id=channel_id))
        client = IpcClient(conn, peer)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._read_replies)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader never raises, so the group wraps what the caller's block raised;
            # unwrap it so `except RemoteError:` around the block works.
            _raise_sole(group)
    finally:
        await conn.aclose()


async def _handshake(conn: Connection, ours: Hello) -> Hello:
    await conn.send(ours)
    try:
        theirs = await conn.receive()
    except ConnectionClosedError as exc:
        raise ConnectionClosedError(
            f"server closed the connection during handshake: {exc}"
        ) from exc
    if not isinstance(theirs, Hello):
        raise ProtocolError(f"server's first message was {theirs.type!r}, not hello")
    if theirs.protocol != PROTOCOL_VERSION:
        raise ProtocolError(
            f"server speaks IPC protocol {theirs.protocol}, we speak {PROTOCOL_VERSION}"
        )
    return theirs


def _raise_sole(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    if len(group.exceptions) != 1:
        raise group
    exc = group.exceptions[0]
    context = exc.__context__
    try:
        raise exc
    finally:
        # Keep the exception's own context instead of chaining it to the group.
        exc.__context__ = context
        del exc, context
