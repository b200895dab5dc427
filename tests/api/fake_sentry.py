"""A fake Sentry ingestion endpoint (the far end of `sentry_dsn`) on a real loopback socket."""

from __future__ import annotations

import gzip
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@dataclass(eq=False)
class FakeSentry:
    """Accepts POST /api/{project}/envelope/ and keeps each decompressed envelope."""

    envelopes: list[bytes] = field(default_factory=list)
    received: trio.Event = field(default_factory=trio.Event)
    dsn: str = ""

    def app(self) -> QuartTrio:
        app = QuartTrio("fake_sentry")

        @app.post("/api/<project>/envelope/")
        async def envelope(project: str) -> Response:
            body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
            encoding = request.headers.get("Content-Encoding", "")
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding:
                return Response(f"unsupported encoding {encoding}", status=415)
            self.envelopes.append(body)
            self.received.set()
            return Response("{}", content_type="application/json")

        return app


@asynccontextmanager
async def serving_sentry() -> AsyncIterator[FakeSentry]:
    """A FakeSentry on a free loopback port; its `dsn` points a Sentry client at it."""
    fake = FakeSentry()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, fake.app(), config, shutdown_trigger=stop.wait))
        fake.dsn = binds[0].replace("http://", "http://publickey@") + "/1"
        try:
            yield fake
        finally:
            stop.set()
