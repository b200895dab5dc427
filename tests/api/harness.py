"""API test harness: the real app (test client, or Hypercorn on a loopback port), real store and
broker, and a real IPC server standing in for the supervisor, whose handler is test code
recording what it was asked.
"""

from __future__ import annotations

from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, assert_never

import trio
from hypercorn.trio import serve

from api.app import create_app
from api.deps import EXTENSION_KEY, ApiContext
from api.main import hypercorn_config
from api.supervisor_link import SupervisorLink
from channel_proc.routers import ROUTERS, router_schemas
from ipc.errors import RemoteError
from ipc.messages import (
    CatalogReply,
    ChildrenReply,
    Drain,
    GetCatalog,
    GetStatus,
    Hello,
    ListChildren,
    Ok,
    Ping,
    RestartChannel,
    Role,
    RouterSchemas,
    StartChannel,
    StopChannel,
)
from ipc.server import serve_ipc
from ipc.state_redis import RedisStateStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from quart.typing import TestClientProtocol

    from ipc.broker import Broker
    from ipc.messages import Reply, Request
    from ipc.names import Namespace
    from ipc.settings import Settings
    from ipc.state import StateStore

JsonObject = dict[str, Any]

#: What pydantic emits for a small config model (draft 2020-12).
FAKE_CONFIG_SCHEMA: JsonObject = {
    "additionalProperties": False,
    "properties": {
        "host": {"title": "Host", "type": "string"},
        "port": {
            "default": 2775,
            "maximum": 65535,
            "minimum": 1,
            "title": "Port",
            "type": "integer",
        },
    },
    "required": ["host"],
    "title": "FakeConfig",
    "type": "object",
}
CATALOG: dict[str, JsonObject] = {"fake": FAKE_CONFIG_SCHEMA, "loose": {"type": "object"}}
#: The built-in router types, as `channel_proc describe --format 2` describes them.
ROUTER_CATALOG = {
    kind: RouterSchemas.model_validate(schemas) for kind, schemas in router_schemas(ROUTERS).items()
}


@dataclass(eq=False)
class FakeSupervisor:
    """Answers like the supervisor; scripted errors per request type, Ok otherwise."""

    requests: list[Request] = field(default_factory=list)
    peers: list[Hello] = field(default_factory=list)
    #: request type ("start_channel"...) -> errors to answer, in order, before answering Ok.
    errors: dict[str, deque[RemoteError]] = field(default_factory=dict)
    #: Set by the first Hello: a worker is ready when it connects.
    hello: trio.Event = field(default_factory=trio.Event)
    #: Set by the first Ping.
    pinged: trio.Event = field(default_factory=trio.Event)

    def fail_next(self, request_type: str, error: RemoteError) -> None:
        self.errors.setdefault(request_type, deque()).append(error)

    def lifecycle(self) -> list[tuple[str, str]]:
        """(request type, channel id) of every lifecycle request, in arrival order."""
        return [
            (request.type, request.channel_id)
            for request in self.requests
            if isinstance(request, StartChannel | StopChannel | RestartChannel)
        ]

    async def handle(self, request: Request, peer: Hello) -> Reply:
        self.requests.append(request)
        scripted = self.errors.get(request.type)
        if scripted:
            raise scripted.popleft()
        match request:
            case Ping():
                self.pinged.set()
                return Ok(id=request.id)
            case StartChannel() | StopChannel() | RestartChannel():
                return Ok(id=request.id)
            case GetCatalog():
                return CatalogReply(
                    id=request.id, config_schemas=CATALOG, router_schemas=ROUTER_CATALOG
                )
            case ListChildren():
                return ChildrenReply(id=request.id, children=[])
            case GetStatus() | Drain():
                raise RemoteError("Unsupported", f"{request.type} is for channel processes")
            case _:
                assert_never(request)

    async def connected(self, peer: Hello) -> None:
        self.peers.append(peer)
        self.hello.set()

    async def disconnected(self, peer: Hello) -> None:
        pass


@dataclass(eq=False)
class Api:
    client: TestClientProtocol
    context: ApiContext
    supervisor: FakeSupervisor

    @property
    def settings(self) -> Settings:
        return self.context.settings

    @property
    def namespace(self) -> Namespace:
        return self.context.namespace

    @property
    def store(self) -> StateStore:
        assert self.context.store is not None
        return self.context.store

    @property
    def broker(self) -> Broker:
        assert self.context.broker is not None
        return self.context.broker

    async def create_channel(self, **properties: Any) -> str:
        body: JsonObject = {"type": "fake", "config": {"host": "smsc.example"}}
        body.update(properties)
        response = await self.client.post("/channels/", json=body)
        payload = await response.get_json()
        assert response.status_code == 201, payload
        channel_id: str = payload["result"]["id"]
        return channel_id


async def _cleanup(api: Api) -> None:
    """Delete what the test left: its channels' queues, and its Redis keys."""
    for channel_id in await api.store.list_channels():
        for queue in api.namespace.channel_queues(channel_id):
            await api.broker.delete_queue(queue)
    redis = api.settings.redis
    if redis is not None:
        cleaner = await RedisStateStore.connect(redis, api.namespace)
        try:
            await cleaner.purge_namespace()
        finally:
            await cleaner.aclose()


@asynccontextmanager
async def open_api(
    settings: Settings, socket_dir: Path, *, cleanup: bool = True
) -> AsyncIterator[Api]:
    fake = FakeSupervisor()
    path = socket_dir / "sup.sock"
    link = SupervisorLink(path)
    app = create_app(settings, supervisor=link)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_ipc, path, fake, role=Role.SUPERVISOR))
        await nursery.start(link.run)
        async with app.test_app() as test_app:
            api = Api(
                client=test_app.test_client(),
                context=app.extensions[EXTENSION_KEY],
                supervisor=fake,
            )
            try:
                yield api
            finally:
                if cleanup:
                    await _cleanup(api)
        nursery.cancel_scope.cancel()


@dataclass(eq=False)
class LiveApi:
    """The app served by Hypercorn over TCP, configured as `python -m api` configures it."""

    base_url: str
    context: ApiContext
    supervisor: FakeSupervisor

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def store(self) -> StateStore:
        assert self.context.store is not None
        return self.context.store


@asynccontextmanager
async def serve_api(
    settings: Settings, socket_dir: Path, **app_options: Any
) -> AsyncIterator[LiveApi]:
    """Serve the app on 127.0.0.1:<free port>; `app_options` go to create_app."""
    fake = FakeSupervisor()
    path = socket_dir / "sup.sock"
    link = SupervisorLink(path)
    app = create_app(settings, supervisor=link, **app_options)
    config = hypercorn_config("127.0.0.1:0", settings)
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_ipc, path, fake, role=Role.SUPERVISOR))
        await nursery.start(link.run)
        # Its own nursery, so that leaving waits for Hypercorn's graceful shutdown.
        async with trio.open_nursery() as web:
            binds = await web.start(partial(serve, app, config, shutdown_trigger=stop.wait))
            try:
                yield LiveApi(
                    base_url=binds[0], context=app.extensions[EXTENSION_KEY], supervisor=fake
                )
            finally:
                stop.set()
        nursery.cancel_scope.cancel()
