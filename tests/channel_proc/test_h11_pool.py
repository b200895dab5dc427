"""The webhook client's connection pool against a scripted HTTP/1.1 server on a real socket:
keep-alive reuse, every reason not to reuse, early answers, failures and TLS."""

from __future__ import annotations

import functools
import ssl
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h11
import pytest
import trio

from channel_proc import h11_pool
from channel_proc.h11_pool import ConnectionPool, Origin

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

TIMEOUT = 2.0
BODY = b'{"hello": "world"}'


@dataclass
class Answer:
    """What the server does with one request."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b"ok"
    #: Close the connection after answering (without saying so).
    close_after: bool = False
    #: Answer as soon as the head is in, without reading the body, then close.
    early: bool = False
    #: Close without answering; or send these raw bytes instead of an answer.
    drop: bool = False
    raw: bytes | None = None
    #: Seconds to wait before answering.
    delay: float = 0.0


@dataclass
class Server:
    """A scripted HTTP/1.1 server: `answers` are used in turn (the last one repeats)."""

    answers: list[Answer] = field(default_factory=lambda: [Answer()])
    connections: int = 0
    bodies: list[bytes] = field(default_factory=list)
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    _served: int = 0

    def next_answer(self) -> Answer:
        answer = self.answers[min(self._served, len(self.answers) - 1)]
        self._served += 1
        return answer

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                body = b""
                answer = Answer()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(bytes(data))
                        continue
                    if isinstance(event, h11.Request):
                        answer = self.next_answer()
                        if answer.early:
                            await self._answer(stream, conn, answer)
                            return
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                self.bodies.append(body)
                await trio.sleep(answer.delay)
                if answer.drop:
                    return
                if answer.raw is not None:
                    await stream.send_all(answer.raw)
                    return
                await self._answer(stream, conn, answer)
                if answer.close_after or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _answer(stream: trio.abc.Stream, conn: h11.Connection, answer: Answer) -> None:
        headers = list(answer.headers)
        if not any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in headers
        ):
            headers.append((b"Content-Length", str(len(answer.body)).encode()))
        data = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
        data += conn.send(h11.Data(data=answer.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    scripted = Server()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, scripted.handle, 0, host="127.0.0.1")
    )
    scripted.port = listeners[0].socket.getsockname()[1]
    return scripted


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    opened = ConnectionPool(ssl_context=ssl.create_default_context(), timeout=TIMEOUT, max_idle=4)
    try:
        yield opened
    finally:
        await opened.aclose()


async def post(pool: ConnectionPool, port: int, scheme: str = "http") -> tuple[int, bytes]:
    """One POST of BODY; the status and the whole answer."""
    headers = [(b"Host", f"127.0.0.1:{port}".encode()), (b"Content-Length", b"%d" % len(BODY))]
    response = await pool.post(Origin(scheme, "127.0.0.1", port), b"/x", headers, BODY)
    try:
        return response.status, b"".join([chunk async for chunk in response.body()])
    finally:
        await response.aclose()


@pytest.mark.parametrize(
    ("answers", "connections"),
    [
        pytest.param([Answer()], 1, id="kept alive: reused"),
        pytest.param([Answer(headers=[(b"Connection", b"close")])], 3, id="Connection: close"),
        pytest.param([Answer(close_after=True)], 3, id="closed by the server while idle"),
        pytest.param(
            [Answer(headers=[(b"Transfer-Encoding", b"chunked")], body=b"x" * 70000)],
            1,
            id="chunked answer read whole: reused",
        ),
    ],
)
async def test_connections_are_reused_only_when_both_sides_keep_them(
    server: Server, pool: ConnectionPool, answers: list[Answer], connections: int
) -> None:
    server.answers = answers
    for _ in range(3):
        assert (await post(pool, server.port))[0] == 200
        # Let a closing server's FIN arrive before the next request looks at the socket.
        await trio.sleep(0.05)
    assert server.connections == connections
    assert server.bodies == [BODY] * 3


async def test_an_answer_left_unread_drops_its_connection(
    server: Server, pool: ConnectionPool
) -> None:
    server.answers = [Answer(body=b"x" * 200000)]
    origin = Origin("http", "127.0.0.1", server.port)
    headers = [(b"Host", b"h"), (b"Content-Length", b"%d" % len(BODY))]
    response = await pool.post(origin, b"/", headers, BODY)
    async for _chunk in response.body():
        break
    await response.aclose()
    assert (await post(pool, server.port))[0] == 200
    assert server.connections == 2


async def test_idle_connections_expire(
    server: Server, pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(h11_pool, "KEEPALIVE_EXPIRY", 0.05)
    await post(pool, server.port)
    await trio.sleep(0.1)
    await post(pool, server.port)
    assert server.connections == 2


async def test_at_most_max_idle_connections_are_kept(server: Server) -> None:
    server.answers = [Answer(delay=0.05)]
    pool = ConnectionPool(ssl_context=ssl.create_default_context(), timeout=TIMEOUT, max_idle=1)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(post, pool, server.port)
        assert server.connections == 3
        server.answers = [Answer()]
        for _ in range(2):
            await post(pool, server.port)
        assert server.connections == 3
    finally:
        await pool.aclose()


async def test_an_early_answer_is_read_even_if_the_body_was_not_taken(
    server: Server, pool: ConnectionPool
) -> None:
    server.answers = [Answer(status=413, body=b"too large", early=True)]
    big = b"x" * 5_000_000
    origin = Origin("http", "127.0.0.1", server.port)
    headers = [(b"Host", b"h"), (b"Content-Length", b"%d" % len(big))]
    response = await pool.post(origin, b"/", headers, big)
    try:
        assert response.status == 413
    finally:
        await response.aclose()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        pytest.param(Answer(drop=True), "RemoteProtocolError", id="closed without an answer"),
        pytest.param(Answer(raw=b"SMTP ready\r\n\r\n"), "RemoteProtocolError", id="not HTTP"),
        pytest.param(
            Answer(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
            "RemoteProtocolError",
            id="answer cut short",
        ),
        pytest.param(Answer(delay=10), "ReadTimeout", id="no answer in time"),
    ],
)
async def test_failures_are_named_as_httpcore_names_them(
    server: Server, answer: Answer, error: str
) -> None:
    server.answers = [answer]
    pool = ConnectionPool(ssl_context=ssl.create_default_context(), timeout=0.3, max_idle=4)
    try:
        with pytest.raises(h11_pool.HTTPError) as caught:
            await post(pool, server.port)
        assert type(caught.value).__name__ == error
    finally:
        await pool.aclose()


async def test_nobody_listening_is_a_connect_error(pool: ConnectionPool) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(h11_pool.ConnectError):
            await post(pool, port)


async def test_an_unknown_scheme_is_refused(pool: ConnectionPool) -> None:
    with pytest.raises(h11_pool.UnsupportedProtocol, match="'ftp://'"):
        await post(pool, 21, scheme="ftp")


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_is_verified_and_kept_alive(server: Server, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.ssl_context.load_cert_chain(cert, key)
    trusting = ConnectionPool(
        ssl_context=ssl.create_default_context(cafile=str(cert)), timeout=TIMEOUT, max_idle=4
    )
    try:
        for _ in range(2):
            assert await post(trusting, server.port, scheme="https") == (200, b"ok")
        assert server.connections == 1
    finally:
        await trusting.aclose()
    # A client that does not trust the certificate refuses it at connect time.
    untrusting = ConnectionPool(
        ssl_context=ssl.create_default_context(), timeout=TIMEOUT, max_idle=4
    )
    try:
        with pytest.raises(h11_pool.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(untrusting, server.port, scheme="https")
    finally:
        await untrusting.aclose()
