"""The API worker's one connection to the supervisor: held for the process's life (it is the
worker's readiness signal), re-opened when it drops, and used for lifecycle requests and the
channel-type catalog.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from ipc.client import open_ipc_client
from ipc.errors import ConnectionClosedError, ProtocolError, RemoteError
from ipc.messages import (
    CatalogReply,
    GetCatalog,
    Ping,
    RestartChannel,
    Role,
    RouterSchemas,
    StartChannel,
    StopChannel,
)

if TYPE_CHECKING:
    from pathlib import Path

    from ipc.client import IpcClient
    from ipc.messages import Reply, Request

log = logging.getLogger(__name__)

#: channel type -> JSON Schema of its `config`.
Catalog = dict[str, dict[str, Any]]
#: router type -> the JSON Schemas of its `config` and of its destinations' `config`.
RouterCatalog = dict[str, RouterSchemas]


class SupervisorUnreachableError(Exception):
    """No connection to the supervisor, or it closed while a request was in flight."""


class SupervisorLink:
    """Requests to the supervisor over a connection that `run` keeps open.

    Lifecycle methods raise RemoteError when the supervisor refuses (its code and type kept)
    and SupervisorUnreachableError when there is no connection. They wait for a connection
    while `run` is re-opening one: the caller bounds them with `trio.fail_after`.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        ping_interval: float = 2.0,
        ping_timeout: float = 5.0,
        retry_delay: float = 0.2,
        max_retry_delay: float = 5.0,
    ) -> None:
        self.path = path
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._client: IpcClient | None = None
        self._connected = trio.Event()
        self._dropped = trio.Event()
        self._catalog: Catalog | None = None
        self._router_catalog: RouterCatalog | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Connect, hold the connection (pinging it), reconnect when it drops; until cancelled.

        task_status.started() is called once the first connection is up.
        """
        if self.path is None:
            task_status.started()
            await trio.sleep_forever()
        started = False
        delay = self._retry_delay
        while True:
            try:
                async with open_ipc_client(self.path, role=Role.API) as client:
                    self._attach(client)
                    delay = self._retry_delay
                    log.info("connected to the supervisor at %s", self.path)
                    if not started:
                        started = True
                        task_status.started()
                    await self._hold(client)
            except (ConnectionClosedError, ProtocolError) as exc:
                log.warning("no supervisor connection (retrying in %.1f s): %s", delay, exc)
            finally:
                self._detach()
            await trio.sleep(delay)
            delay = min(delay * 2, self._max_retry_delay)

    def _attach(self, client: IpcClient) -> None:
        self._client = client
        self._catalog = self._router_catalog = None
        self._dropped = trio.Event()
        self._connected.set()

    def _detach(self) -> None:
        self._client = None
        self._catalog = self._router_catalog = None
        self._connected = trio.Event()

    async def _hold(self, client: IpcClient) -> None:
        """Return when the connection is found dead: a failed request or a missed ping."""
        while True:
            with trio.move_on_after(self._ping_interval):
                await self._dropped.wait()
                return
            with trio.move_on_after(self._ping_timeout) as scope:
                try:
                    await client.request(Ping(id=0))
                except RemoteError as exc:
                    # It answered, so the connection is alive; an error reply is its business.
                    log.warning("supervisor answered a ping with %s", exc)
            if scope.cancelled_caught:
                log.warning("supervisor did not answer a ping within %.1f s", self._ping_timeout)
                return

    async def _request(self, msg: Request) -> Reply:
        if self.path is None:
            raise SupervisorUnreachableError("no supervisor: this API worker runs standalone")
        await self._connected.wait()
        client = self._client
        if client is None:
            raise SupervisorUnreachableError("the supervisor connection is being re-opened")
        try:
            return await client.request(msg)
        except ConnectionClosedError as exc:
            self._dropped.set()
            raise SupervisorUnreachableError(str(exc)) from exc

    async def start_channel(self, channel_id: str) -> None:
        """Start the channel from its stored properties (restart it if running)."""
        await self._request(StartChannel(id=0, channel_id=channel_id))

    async def stop_channel(self, channel_id: str) -> None:
        await self._request(StopChannel(id=0, channel_id=channel_id))

    async def restart_channel(self, channel_id: str) -> None:
        await self._request(RestartChannel(id=0, channel_id=channel_id))

    async def catalog(self) -> Catalog:
        """The channel types the supervisor can run, fetched once per connection."""
        if self._catalog is None:
            reply = await self._request(GetCatalog(id=0))
            if not isinstance(reply, CatalogReply):
                raise RemoteError("UnexpectedReply", f"expected a catalog, got {reply.type}")
            self._catalog = reply.config_schemas
            self._router_catalog = reply.router_schemas
        return self._catalog

    async def router_catalog(self) -> RouterCatalog:
        """The router types the supervisor can run, fetched with the channel types."""
        if self._router_catalog is None:
            self._catalog = None
            await self.catalog()
        assert self._router_catalog is not None
        return self._router_catalog
