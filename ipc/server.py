"""IPC server: accept Unix-socket connections, exchange Hello, dispatch requests to a handler."""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import TYPE_CHECKING, Final, NoReturn, Protocol

import trio

from ipc.connection import Connection
from ipc.errors import ConnectionClosedError, ProtocolError, RemoteError
from ipc.messages import (
    PROTOCOL_VERSION,
    Drain,
    ErrorReply,
    GetCatalog,
    GetStatus,
    Hello,
    ListChildren,
    Ping,
    RestartChannel,
    StartChannel,
    StopChannel,
)

if TYPE_CHECKING:
    from pathlib import Path

    from ipc.messages import Reply, Request, Role

log = logging.getLogger(__name__)

#: A peer that connects must say Hello within this time, so idle sockets cannot pile up.
HANDSHAKE_TIMEOUT: Final = 10.0
#: How long `disconnected` may run once the connection has ended (it runs shielded).
DISCONNECT_GRACE: Final = 2.0
_BACKLOG: Final = 128
#: accept() errors that mean "out of resources": wait and retry, as trio.serve_listeners does.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_ACCEPT_CAPACITY_SLEEP: Final = 0.1


class IpcHandler(Protocol):
    """What a server delegates to. Each request runs in its own task."""

    async def handle(self, request: Request, peer: Hello) -> Reply:
        """Answer one request. An exception becomes ErrorReply (code 500, its class name)
        except RemoteError, which is passed on with its own code and type."""
        ...

    async def connected(self, peer: Hello) -> None:
        """Called after the handshake (a channel child's Hello means it is ready)."""
        ...

    async def disconnected(self, peer: Hello) -> None:
        """Called when the peer's connection closes, for whatever reason."""
        ...


async def serve_ipc(
    path: Path,
    handler: IpcHandler,
    *,
    role: Role,
    channel_id: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Listen on `path` (replacing a stale socket file), call task_status.started() once
    listening, and serve until cancelled. The socket file is removed on exit.

    Per connection: the peer's first frame must be a Hello; we answer with ours, and a
    protocol mismatch then closes the connection. After the handshake `handler.connected`
    runs, and when the connection ends for any reason `handler.disconnected` runs exactly
    once (shielded, for at most DISCONNECT_GRACE s). Requests still running when the peer
    goes away are cancelled. Errors on one connection never stop the server; an exception
    from `connected`/`disconnected` is a handler bug and does propagate.

    Raises:
        FileExistsError: `path` exists and is not a socket.
        OSError(EADDRINUSE): a live server already listens on `path`.
        OSError: the socket cannot be bound (e.g. path too long for AF_UNIX).
    """
    ours = Hello(role=role, pid=os.getpid(), channel_id=channel_id)
    listener, inode = await _bind(path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await _accept(listener)
                nursery.start_soon(_serve_connection, stream, handler, ours)
    finally:
        with trio.move_on_after(DISCONNECT_GRACE, shield=True):
            await listener.aclose()
        _unlink_if_ours(path, inode)


async def _bind(path: Path) -> tuple[trio.SocketListener, int]:
    if _socket_file_exists(path):
        if await _is_live(path):
            raise OSError(errno.EADDRINUSE, "another server is listening", str(path))
        # A socket file left by a process that died without cleaning up.
        path.unlink(missing_ok=True)  # noqa: ASYNC240 — one metadata op on a local directory
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        # Before listen(): nobody can connect while the file still has umask permissions.
        inode = _restrict(path)
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock), inode


def _socket_file_exists(path: Path) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "not a socket; refusing to replace it", str(path))
    return True


def _restrict(path: Path) -> int:
    """Make the socket owner-only; return its inode, to recognise it on exit."""
    os.chmod(path, 0o600)
    return path.lstat().st_ino


async def _is_live(path: Path) -> bool:
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError:
        return False
    await stream.aclose()
    return True


async def _accept(listener: trio.SocketListener) -> trio.SocketStream:
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            log.error("IPC accept failed (%s); retrying shortly", os.strerror(exc.errno))
            await trio.sleep(_ACCEPT_CAPACITY_SLEEP)


def _unlink_if_ours(path: Path, inode: int) -> None:
    # Another server may have replaced the file since; leave its socket alone.
    try:
        if path.lstat().st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


async def _serve_connection(stream: trio.SocketStream, handler: IpcHandler, ours: Hello) -> None:
    conn = Connection(stream)
    try:
        peer = await _handshake(conn, ours)
        if peer is None:
            return
        try:
            await handler.connected(peer)
            async with trio.open_nursery() as nursery:
                await _read_requests(conn, handler, peer, nursery)
                # The peer is gone: nobody will read the answers to its pending requests.
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(DISCONNECT_GRACE, shield=True):
                await handler.disconnected(peer)
    finally:
        await conn.aclose()


async def _handshake(conn: Connection, ours: Hello) -> Hello | None:
    """The peer's Hello, or None (logged) if the connection must close."""
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        try:
            first = await conn.receive()
        except ConnectionClosedError:
            log.debug("IPC peer left before saying Hello")
            return None
        except ProtocolError as exc:
            log.warning("IPC peer sent a bad first frame: %s", exc)
            return None
        if not isinstance(first, Hello):
            log.warning("IPC peer's first message was %r, not hello", first.type)
            return None
        try:
            # Sent even on a version mismatch, so the peer can report what we speak.
            await conn.send(ours)
        except ConnectionClosedError:
            return None
        if first.protocol != PROTOCOL_VERSION:
            log.warning(
                "IPC peer %s pid %d speaks protocol %d, we speak %d; closing",
                first.role,
                first.pid,
                first.protocol,
                PROTOCOL_VERSION,
                extra={"channel_id": first.channel_id},
            )
            return None
        return first
    log.warning("IPC peer did not say Hello within %s s; closing", HANDSHAKE_TIMEOUT)
    return None


async def _read_requests(
    conn: Connection, handler: IpcHandler, peer: Hello, nursery: trio.Nursery
) -> None:
    """Start a task per request until the connection ends (returns; never raises)."""
    while True:
        try:
            msg = await conn.receive()
        except ConnectionClosedError:
            return
        except ProtocolError as exc:
            log.warning("IPC protocol error from %s: %s", peer.role, exc, extra=_extra(peer))
            return
        match msg:
            case (
                StartChannel()
                | StopChannel()
                | RestartChannel()
                | ListChildren()
                | GetCatalog()
                | GetStatus()
                | Drain()
                | Ping()
            ):
                nursery.start_soon(_answer, conn, handler, msg, peer)
            case _:
                log.warning(
                    "IPC peer %s sent %r, which is not a request; closing",
                    peer.role,
                    msg.type,
                    extra=_extra(peer),
                )
                return


async def _answer(conn: Connection, handler: IpcHandler, request: Request, peer: Hello) -> None:
    reply: Reply
    try:
        reply = await handler.handle(request, peer)
    except RemoteError as exc:
        reply = _error(request, exc.code, exc.error_type, exc.message)
    except Exception as exc:  # the peer gets an ErrorReply; the traceback stays in our log
        log.exception("IPC request %s failed", request.type, extra=_extra(peer))
        reply = _error(request, 500, type(exc).__name__, str(exc))
    else:
        # The client matches replies by id, so a wrong id would leave it waiting forever.
        if reply.id != request.id:
            reply = reply.model_copy(update={"id": request.id})
    try:
        try:
            await conn.send(reply)
        except ProtocolError as exc:
            # Too large to send: nothing was written, so the peer can still get an answer.
            log.error("IPC reply to %s not sendable: %s", request.type, exc, extra=_extra(peer))
            await conn.send(_error(request, 500, "ProtocolError", str(exc)))
    except ConnectionClosedError:
        log.debug("IPC peer left before the reply to %s", request.type, extra=_extra(peer))


def _error(request: Request, code: int, error_type: str, message: str) -> ErrorReply:
    return ErrorReply(id=request.id, code=code, error_type=error_type, message=message)


def _extra(peer: Hello) -> dict[str, str | None]:
    return {"channel_id": peer.channel_id}
