"""The channel process's IPC handler on its channel socket: Ping, GetStatus and Drain."""

from __future__ import annotations

from typing import TYPE_CHECKING, assert_never

from ipc.messages import (
    Drain,
    ErrorReply,
    GetCatalog,
    GetStatus,
    ListChildren,
    Ok,
    Ping,
    RestartChannel,
    StartChannel,
    StatusReply,
    StopChannel,
)

if TYPE_CHECKING:
    from channel_proc.events import StatusReporter
    from channel_proc.lifecycle import Shutdown
    from ipc.broker import Broker
    from ipc.messages import Hello, Reply, Request
    from ipc.names import Namespace


class ChannelControl:
    """Answers the supervisor and API workers about this channel."""

    def __init__(
        self,
        *,
        channel_id: str,
        broker: Broker,
        namespace: Namespace,
        statuses: StatusReporter,
        shutdown: Shutdown,
    ) -> None:
        self._channel_id = channel_id
        self._broker = broker
        self._ns = namespace
        self._statuses = statuses
        self._shutdown = shutdown

    async def handle(self, request: Request, peer: Hello) -> Reply:
        match request:
            case Ping():
                return Ok(id=request.id, detail="pong")
            case GetStatus():
                return await self._status(request.id)
            case Drain():
                self._shutdown.request(f"drain requested by {peer.role} (pid {peer.pid})")
                return Ok(id=request.id, detail="draining")
            case StartChannel() | StopChannel() | RestartChannel() | ListChildren() | GetCatalog():
                return ErrorReply(
                    id=request.id,
                    code=400,
                    error_type="UnsupportedRequest",
                    message=f"a channel process does not answer {request.type}",
                )
            case _:
                assert_never(request)

    async def connected(self, peer: Hello) -> None:
        """Nothing to do: any peer may ask."""

    async def disconnected(self, peer: Hello) -> None:
        """Nothing to do: no per-peer state."""

    async def _status(self, request_id: int) -> StatusReply:
        inbound, outbound, events = self._ns.channel_queues(self._channel_id)
        return StatusReply(
            id=request_id,
            channel_id=self._channel_id,
            components=await self._statuses.components(),
            queued_outbound=await self._broker.queue_length(outbound),
            queued_inbound=await self._broker.queue_length(inbound),
            queued_events=await self._broker.queue_length(events),
        )
