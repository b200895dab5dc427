"""A fake RabbitMQ management API (the far end of /health's queue report) on a real socket."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

JsonObject = dict[str, Any]


@dataclass(eq=False)
class FakeManagement:
    """GET /api/queues/{vhost}/{name}: answers `queues[name]`, or 404 like RabbitMQ."""

    queues: dict[str, JsonObject] = field(default_factory=dict)
    #: (raw request path, Authorization header) of every request.
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def app(self) -> QuartTrio:
        app = QuartTrio("fake_management")

        @app.get("/<path:rest>")
        async def queue(rest: str) -> Response:
            raw_path = request.scope["raw_path"].decode()
            self.requests.append((raw_path, request.headers.get("Authorization")))
            name = raw_path.rsplit("/", 1)[-1]
            if name in self.queues:
                return Response(json.dumps(self.queues[name]), content_type="application/json")
            body = {"error": "Object Not Found", "reason": "Not Found"}
            return Response(json.dumps(body), status=404, content_type="application/json")

        return app


@asynccontextmanager
async def serving(fake: FakeManagement) -> AsyncIterator[str]:
    """Serve `fake` on a free loopback port; yields "127.0.0.1:PORT"."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, fake.app(), config, shutdown_trigger=stop.wait))
        try:
            yield binds[0].removeprefix("http://")
        finally:
            stop.set()
