"""The supervisor's IPC handler: channel lifecycle requests, child listing, the type catalog.

It also feeds every Hello on the supervisor socket to the HelloBoard, which is how a
starting child is known to be ready.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, assert_never

from ipc import exit_codes
from ipc.errors import StoreUnavailableError
from ipc.messages import (
    CatalogReply,
    ChildrenReply,
    Drain,
    ErrorReply,
    GetCatalog,
    GetStatus,
    Hello,
    ListChildren,
    Ok,
    Ping,
    Reply,
    Request,
    RestartChannel,
    StartChannel,
    StopChannel,
)
from supervisor.spec import channel_spec
from supervisor.tree import ShuttingDownError

if TYPE_CHECKING:
    from ipc.messages import RouterSchemas
    from ipc.settings import Settings
    from ipc.state import StateStore
    from supervisor.child import HelloBoard
    from supervisor.spec import Commands, RestartPolicy
    from supervisor.tree import ChildTree

log = logging.getLogger(__name__)


class ControlHandler:
    """Answers requests on the supervisor socket (ipc.server.IpcHandler)."""

    def __init__(
        self,
        *,
        tree: ChildTree,
        store: StateStore,
        board: HelloBoard,
        settings: Settings,
        commands: Commands,
        policy: RestartPolicy,
        catalog: dict[str, dict[str, Any]],
        router_catalog: dict[str, RouterSchemas] | None = None,
    ) -> None:
        self._tree = tree
        self._store = store
        self._board = board
        self._settings = settings
        self._commands = commands
        self._policy = policy
        self._catalog = catalog
        self._router_catalog = router_catalog or {}

    async def connected(self, peer: Hello) -> None:
        self._board.arrived(peer)

    async def disconnected(self, peer: Hello) -> None:
        self._board.left(peer)

    async def handle(self, request: Request, peer: Hello) -> Reply:
        match request:
            case StartChannel(channel_id=cid) | RestartChannel(channel_id=cid):
                # Start from the stored properties; a running child is replaced.
                return await self.start_channel(request.id, cid)
            case StopChannel(channel_id=cid):
                stopped = await self._tree.stop(cid)
                log.info("channel %s stopped on request", cid, extra={"channel_id": cid})
                return Ok(id=request.id, detail="stopped" if stopped else "not running")
            case ListChildren():
                return ChildrenReply(id=request.id, children=self._tree.children())
            case GetCatalog():
                return CatalogReply(
                    id=request.id,
                    config_schemas=self._catalog,
                    router_schemas=self._router_catalog,
                )
            case Ping():
                return Ok(id=request.id)
            case GetStatus() | Drain():
                return ErrorReply(
                    id=request.id,
                    code=400,
                    error_type="UnsupportedRequest",
                    message=f"{request.type} is answered by channel processes, not the supervisor",
                )
            case _:
                assert_never(request)

    async def start_channel(self, request_id: int, cid: str) -> Reply:
        try:
            stored = await self._store.get_channel(cid)
        except StoreUnavailableError as exc:
            return ErrorReply(
                id=request_id, code=503, error_type="StoreUnavailableError", message=str(exc)
            )
        if stored is None:
            return ErrorReply(
                id=request_id,
                code=404,
                error_type="ChannelNotFound",
                message=f"channel {cid} is not stored",
            )
        try:
            spec = channel_spec(self._commands, self._settings, self._policy, cid)
            exit = await self._tree.start(spec)
        except ShuttingDownError as exc:
            return ErrorReply(id=request_id, code=503, error_type="ShuttingDown", message=str(exc))
        if exit is None:
            return Ok(id=request_id, detail="running")
        if exit.code == exit_codes.EXIT_CONFIG and not exit.timed_out:
            return ErrorReply(
                id=request_id, code=400, error_type="ChannelConfigError", message=exit.reason
            )
        if exit.timed_out:
            return ErrorReply(
                id=request_id, code=503, error_type="ChannelStartTimeout", message=exit.reason
            )
        # It keeps being restarted by policy; the caller learns the first attempt failed.
        return ErrorReply(
            id=request_id, code=503, error_type="ChannelStartFailed", message=exit.reason
        )
