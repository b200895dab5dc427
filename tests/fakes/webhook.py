"""A fake webhook receiver (mo_url / event_url / status_url) on a real 127.0.0.1 socket.

An h11 server: it records every request and answers 200, or what the test scripted
(`fail_next`, `go_down`), including dropping the connection without an answer; it can also
answer late or never (`delay_path`), hold every answer until released (`hold`), and answer
with a large body (`answer_size`).
"""

from __future__ import annotations

import json
import math
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import h11
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

#: Scripted answer: close the connection without answering (a connection error for the client).
DROP: Final = 0
MAX_BODY: Final = 1024 * 1024
#: A large answer is sent in chunks of this size (never built whole).
ANSWER_CHUNK: Final = 65536


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    #: Header names lower-cased; a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes
    #: What the fake answered (DROP: nothing).
    status: int
    #: When it arrived (trio clock).
    at: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class FakeWebhook:
    """Records requests; answers `default_status` unless a scripted answer is queued."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.default_status = 200
        self._script: deque[int] = deque()
        self._failing_paths: dict[str, int] = {}
        self._delays: dict[str, float] = {}
        self._gate = trio.Event()
        self._gate.set()
        #: Size of each answer's body; None: a small JSON body.
        self.answer_size: int | None = None
        #: Requests received and not answered yet, and the most there ever were at once.
        self.in_flight = 0
        self.max_in_flight = 0
        self._changed = trio.Event()
        self._port: int | None = None

    @property
    def port(self) -> int:
        assert self._port is not None, "the fake webhook is not serving"
        return self._port

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next `count` requests with `status` (DROP closes the connection)."""
        self._script.extend([status] * count)

    def fail_path(self, path: str, status: int = 503) -> None:
        """Answer every request on `path` with `status` (before the script) until `come_up`."""
        self._failing_paths[path] = status

    def go_down(self, status: int = 503) -> None:
        """Answer every request with `status` until `come_up`."""
        self.default_status = status

    def come_up(self) -> None:
        self.default_status = 200
        self._failing_paths.clear()

    def delay_path(self, path: str, seconds: float) -> None:
        """Answer requests on `path` only after `seconds` (math.inf: never; the request stays
        unanswered until the client gives up)."""
        self._delays[path] = seconds

    def hold(self) -> None:
        """Record requests but answer none until `release`."""
        if self._gate.is_set():
            self._gate = trio.Event()

    def release(self) -> None:
        self._gate.set()

    @property
    def delivered(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.ok]

    def on_path(self, path: str, *, delivered_only: bool = True) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path and (r.ok or not delivered_only)]

    async def wait_for_requests(
        self, n: int, *, path: str | None = None, delivered_only: bool = False
    ) -> list[RecordedRequest]:
        """Wait until `n` matching requests arrived; return the matching ones."""
        while True:
            matching = [
                r
                for r in self.requests
                if (path is None or r.path == path) and (r.ok or not delivered_only)
            ]
            if len(matching) >= n:
                return matching
            await self._changed.wait()

    def assert_script_used(self) -> None:
        assert not self._script, f"{len(self._script)} scripted answer(s) never used"

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self._port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve_connection, listeners)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            try:
                while await self._serve_one(conn, stream):
                    conn.start_next_cycle()
            except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _serve_one(self, conn: h11.Connection, stream: trio.SocketStream) -> bool:
        """Serve one request; False when the connection should end."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    return False
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return False
        assert request is not None
        path = request.target.decode()
        if path in self._failing_paths:
            status = self._failing_paths[path]
        else:
            status = self._script.popleft() if self._script else self.default_status
        self._record(request, bytes(body), status)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._gate.wait()
            delay = self._delays.get(path, 0.0)
            if delay == math.inf:
                await trio.sleep_forever()
            await trio.sleep(delay)
        finally:
            self.in_flight -= 1
        if status == DROP:
            return False
        await self._answer(conn, stream, status)
        return conn.our_state is not h11.MUST_CLOSE

    async def _answer(self, conn: h11.Connection, stream: trio.SocketStream, status: int) -> None:
        payload = b'{"ok": true}' if 200 <= status < 300 else b'{"error": "scripted"}'
        size = len(payload) if self.answer_size is None else self.answer_size
        headers = [("content-type", "application/json"), ("content-length", str(size))]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if self.answer_size is None:
            await stream.send_all(conn.send(h11.Data(data=payload)))
        else:
            chunk = b"x" * ANSWER_CHUNK
            for start in range(0, size, ANSWER_CHUNK):
                await stream.send_all(conn.send(h11.Data(data=chunk[: size - start])))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    def _record(self, request: h11.Request, body: bytes, status: int) -> None:
        headers = {name.decode().lower(): value.decode() for name, value in request.headers}
        self.requests.append(
            RecordedRequest(
                request.method.decode(),
                request.target.decode(),
                headers,
                body,
                status,
                trio.current_time(),
            )
        )
        self._changed.set()
        self._changed = trio.Event()


@asynccontextmanager
async def open_fake_webhook(*, check_script: bool = True) -> AsyncIterator[FakeWebhook]:
    """Serve a FakeWebhook for the block; afterwards check every scripted answer was used."""
    hook = FakeWebhook()
    async with trio.open_nursery() as nursery:
        await nursery.start(hook.serve)
        yield hook
        nursery.cancel_scope.cancel()
    if check_script:
        hook.assert_script_used()
