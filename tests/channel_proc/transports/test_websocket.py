"""Table-driven tests of the websocket channel type with a real WebSocket client."""

from __future__ import annotations

import base64
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
import trio.testing
from pydantic import ValidationError
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    wrap_client_stream,
)

from channel_proc.transports.base import StatusLevel
from channel_proc.transports.errors import ProviderRejected
from channel_proc.transports.websocket import (
    MESSAGE_TOO_BIG,
    WebsocketConfig,
    WebsocketTransport,
    frame_content,
)
from ipc.payloads import SessionEvent, VumiMessage
from tests.channel_proc.transports.harness import (
    READ_TIMEOUT,
    InboundCase,
    MemoryLink,
    OutboundCase,
    assert_fields,
    running_transport,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

LOCAL = {"port": 0, "interface": "127.0.0.1"}

# --- frames (sans-IO) ------------------------------------------------------------------------

FRAME_CASES: list[tuple[str, str, str | None]] = [
    ("plain text", "hello", "hello"),
    ("json content", '{"content": "hello"}', "hello"),
    ("json null content", '{"content": null}', None),
    ("json with other keys", '{"content": "hi", "extra": 1}', "hi"),
    ("json without content is text", '{"text": "hi"}', '{"text": "hi"}'),
    ("non-string content is text", '{"content": 5}', '{"content": 5}'),
    ("broken json is text", '{"content": ', '{"content": '),
    ("json array is text", '["content"]', '["content"]'),
    ("empty", "", ""),
]


@pytest.mark.parametrize(
    ("label", "frame", "content"), FRAME_CASES, ids=[c[0] for c in FRAME_CASES]
)
def test_frame_content(label: str, frame: str, content: str | None) -> None:
    assert frame_content(frame) == content


def test_config_defaults() -> None:
    config = WebsocketConfig.model_validate({"port": 9000, "unknown": True})
    assert config.interface == "0.0.0.0"
    assert config.path == "/"
    assert config.token is None
    assert config.max_frame_bytes == 64 * 1024
    assert config.max_connections == 1000
    assert config.transport_type == "websocket"


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"port": 70000},
        {"port": 1, "path": "chat"},
        {"port": 1, "path": "/chat?x=1"},
        {"port": 1, "token": ""},
        {"port": 1, "max_frame_bytes": 0},
        {"port": 1, "max_connections": 0},
    ],
)
def test_config_invalid(config: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        WebsocketConfig.model_validate(config)


# --- over real WebSockets ----------------------------------------------------------------------


def local_websocket(config: Mapping[str, object] | None = None) -> Any:
    return running_transport(WebsocketTransport, {**LOCAL, **(config or {})})


def url_of(transport: object, path: str = "/") -> str:
    assert isinstance(transport, WebsocketTransport)
    port = int(transport.server_address.rsplit(":", 1)[1])
    return f"ws://127.0.0.1:{port}{path}"


@asynccontextmanager
async def ws_client(transport: object, path: str = "/") -> AsyncIterator[WebSocketConnection]:
    """A connected client. We own its TCP stream because trio-websocket's own client leaks
    the socket when the server closes first (a ResourceWarning, an error under pytest)."""
    assert isinstance(transport, WebsocketTransport)
    port = int(transport.server_address.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        with trio.fail_after(READ_TIMEOUT):
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", path)
        try:
            yield ws
        finally:
            with trio.move_on_after(READ_TIMEOUT, shield=True):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def refused_status(transport: object, path: str) -> int:
    """The HTTP status answering a WebSocket handshake (an upgrade request sent by hand)."""
    headers = {
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": base64.b64encode(b"0123456789abcdef").decode(),
    }
    url = url_of(transport, path).replace("ws://", "http://", 1)
    async with httpx.AsyncClient(timeout=READ_TIMEOUT) as client:
        response = await client.get(url, headers=headers)
    return response.status_code


def address_of(ws: WebSocketConnection) -> str:
    local = ws.local
    assert not isinstance(local, str)
    return f"{local.address}:{local.port}"


async def next_frame(ws: WebSocketConnection) -> str | bytes:
    with trio.fail_after(READ_TIMEOUT):
        return await ws.get_message()


async def wait_closed(ws: WebSocketConnection) -> int:
    """The close code once the server has closed the connection."""
    with trio.fail_after(READ_TIMEOUT):
        while ws.closed is None:
            with suppress(ConnectionClosed):
                await ws.get_message()
    return ws.closed.code


NEW: dict[str, object] = {"session_event": "new", "content": None, "transport_type": "websocket"}
CLOSE: dict[str, object] = {"session_event": "close", "content": None}


def resume(text: str | None) -> dict[str, object]:
    return {"session_event": "resume", "content": text}


INBOUND_CASES = [
    InboundCase(label="connect then disconnect", provider_input=(), expected=(NEW, CLOSE)),
    InboundCase(
        label="json frame",
        provider_input=(b'{"content": "Hi there"}',),
        expected=(NEW, resume("Hi there"), CLOSE),
    ),
    InboundCase(
        label="plain text frame", provider_input=(b"Hi",), expected=(NEW, resume("Hi"), CLOSE)
    ),
    InboundCase(
        label="frames in order",
        provider_input=(b"1", b'{"content": "2"}', b'{"content": null}'),
        expected=(NEW, resume("1"), resume("2"), resume(None), CLOSE),
    ),
    InboundCase(
        label="unicode",
        provider_input=('{"content": "caf\u00e9 \u2713"}'.encode(),),
        expected=(NEW, resume("caf\u00e9 \u2713"), CLOSE),
    ),
    InboundCase(
        label="custom transport_type",
        config={"transport_type": "chat"},
        provider_input=(b"x",),
        expected=({"transport_type": "chat"}, {"transport_type": "chat"}, CLOSE),
    ),
    InboundCase(
        label="to_addr override",
        config={"to_addr": "webchat"},
        provider_input=(),
        expected=({"to_addr": "webchat"}, {"to_addr": "webchat"}),
    ),
]


@pytest.mark.parametrize("case", INBOUND_CASES, ids=lambda c: c.label)
async def test_websocket_inbound(case: InboundCase) -> None:
    async with local_websocket(case.config) as (transport, link):
        async with ws_client(transport) as ws:
            for frame in case.provider_input:
                await ws.send_message(frame.decode())
            first = await link.next_inbound()
            received = [first] + [await link.next_inbound() for _ in case.expected[1:-1]]
        received.append(await link.next_inbound())
    for msg, expected in zip(received, case.expected, strict=True):
        assert_fields(msg, expected)


async def test_websocket_binary_frame_is_read_as_utf8() -> None:
    async with local_websocket() as (transport, link), ws_client(transport) as ws:
        await link.next_inbound()
        await ws.send_message('{"content": "bin \u2713"}'.encode())
        assert (await link.next_inbound()).content == "bin \u2713"


async def test_websocket_inbound_addresses() -> None:
    async with local_websocket() as (transport, link), ws_client(transport) as ws:
        msg = await link.next_inbound()
        assert msg.from_addr == address_of(ws)
    assert isinstance(transport, WebsocketTransport)
    assert msg.to_addr == transport.server_address
    assert not transport.server_address.endswith(":0")


async def test_websocket_statuses_for_listening_and_clients() -> None:
    async with local_websocket() as (transport, link):
        listening = await link.wait_status("listening")
        async with ws_client(transport) as ws:
            connected = await link.wait_status("client_connected")
            address = address_of(ws)
        disconnected = await link.wait_status("client_disconnected")
    assert (listening.component, listening.level) == ("websocket", StatusLevel.OK)
    assert listening.details["path"] == "/"
    assert connected.details == {"address": address, "clients": 1}
    assert disconnected.details == {"address": address, "clients": 0}


OUTBOUND_CASES = [
    OutboundCase(label="content", message={"content": "hello"}, provider_output=b'"hello"'),
    OutboundCase(
        label="unicode", message={"content": "\u2713 ok"}, provider_output=b'"\\u2713 ok"'
    ),
    OutboundCase(label="no content sends nothing", message={"content": None}),
    OutboundCase(
        label="close session",
        message={"content": "bye", "session_event": "close"},
        provider_output=b'"bye"',
    ),
    OutboundCase(
        label="close session without content",
        message={"content": None, "session_event": "close"},
    ),
    OutboundCase(
        label="unknown address",
        message={"content": "x", "to_addr": "10.0.0.1:1"},
        error=ProviderRejected,
    ),
]


@pytest.mark.parametrize("case", OUTBOUND_CASES, ids=lambda c: c.label)
async def test_websocket_outbound(case: OutboundCase) -> None:
    async with local_websocket(case.config) as (transport, link), ws_client(transport) as ws:
        new = await link.next_inbound()
        msg = VumiMessage.model_validate({"to_addr": new.from_addr, **case.message})
        if case.error is not None:
            with pytest.raises(case.error):
                await transport.send(msg)
            return
        receipt = await transport.send(msg)
        assert receipt.provider_message_id is None
        if case.provider_output:
            expected = '{"content": ' + case.provider_output.decode() + "}"
            assert await next_frame(ws) == expected
        if msg.session_event == SessionEvent.CLOSE:
            assert await wait_closed(ws) == 1000
        else:
            # Nothing else was sent: the next frame is the one we send now.
            await transport.send(VumiMessage(to_addr=new.from_addr, content="marker"))
            assert await next_frame(ws) == '{"content": "marker"}'


async def test_websocket_close_by_us_is_not_reported_as_inbound_close() -> None:
    async with local_websocket() as (transport, link):
        async with ws_client(transport) as ws:
            new = await link.next_inbound()
            await transport.send(
                VumiMessage(to_addr=new.from_addr, session_event=SessionEvent.CLOSE)
            )
            await wait_closed(ws)
        await link.wait_status("client_disconnected")
        assert link.pending_inbound() == []


async def test_websocket_send_to_disconnected_client_is_rejected() -> None:
    async with local_websocket() as (transport, link):
        async with ws_client(transport):
            new = await link.next_inbound()
        await link.wait_status("client_disconnected")
        with pytest.raises(ProviderRejected, match="no websocket client"):
            await transport.send(VumiMessage(to_addr=new.from_addr, content="late"))


async def test_websocket_sessions_are_independent() -> None:
    async with (
        local_websocket() as (transport, link),
        ws_client(transport) as first,
        ws_client(transport) as second,
    ):
        a = await link.next_inbound()
        b = await link.next_inbound()
        by_addr = {address_of(first): first, address_of(second): second}
        assert {a.from_addr, b.from_addr} == set(by_addr)
        for address in by_addr:
            await transport.send(VumiMessage(to_addr=address, content=f"to {address}"))
        for address, ws in by_addr.items():
            assert await next_frame(ws) == f'{{"content": "to {address}"}}'


# --- access: path, token, limits ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "path", "status"),
    [
        ({"path": "/chat"}, "/", 404),
        ({"path": "/chat"}, "/other", 404),
        ({"token": "s3cret"}, "/", 401),
        ({"token": "s3cret"}, "/?token=wrong", 401),
        ({"token": "s3cret"}, "/?tokens=s3cret", 401),
        ({"token": "s3cret", "path": "/chat"}, "/?token=s3cret", 404),
    ],
)
async def test_websocket_refused(config: dict[str, Any], path: str, status: int) -> None:
    async with local_websocket(config) as (transport, link):
        assert await refused_status(transport, path) == status
        assert link.pending_inbound() == []


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"path": "/chat"}, "/chat"),
        ({"path": "/chat"}, "/chat/"),
        ({"token": "s3cret"}, "/?token=s3cret"),
        ({"token": "a b&c"}, "/?x=1&token=a%20b%26c"),
        ({"token": "s3cret", "path": "/chat"}, "/chat?token=s3cret"),
    ],
)
async def test_websocket_accepted(config: dict[str, Any], path: str) -> None:
    async with local_websocket(config) as (transport, link), ws_client(transport, path):
        assert (await link.next_inbound()).session_event == SessionEvent.NEW


@pytest.mark.parametrize(
    ("frame", "closed"),
    [
        ("x" * 16, False),
        ("x" * 17, True),
        # Under the limit in characters but over it in UTF-8 bytes.
        ("\u2713" * 6, True),
        (b"x" * 17, True),
    ],
    ids=["at the limit", "over", "multi-byte over", "binary over"],
)
async def test_websocket_frame_size_limit(frame: str | bytes, closed: bool) -> None:
    async with (
        local_websocket({"max_frame_bytes": 16}) as (transport, link),
        ws_client(transport) as ws,
    ):
        await link.next_inbound()
        await ws.send_message(frame)
        if closed:
            assert await wait_closed(ws) == MESSAGE_TOO_BIG
            assert (await link.next_inbound()).session_event == SessionEvent.CLOSE
        else:
            assert (await link.next_inbound()).content == frame


async def test_websocket_connection_limit() -> None:
    async with local_websocket({"max_connections": 2}) as (transport, link):
        async with ws_client(transport), ws_client(transport):
            await link.next_inbound()
            await link.next_inbound()
            assert await refused_status(transport, "/") == 503
            assert await refused_status(transport, "/") == 503
            limit = await link.wait_status("connection_limit")
            assert limit.level == StatusLevel.DEGRADED
            assert limit.details == {"max_connections": 2}
        # Reported once while at the limit, not once per refusal.
        with trio.fail_after(READ_TIMEOUT):
            later = [await link.status_recv.receive() for _ in range(2)]
        assert [s.type for s in later] == ["client_disconnected", "client_disconnected"]
        # Slots are free again.
        async with ws_client(transport):
            assert (await link.next_inbound()).session_event == SessionEvent.CLOSE
            assert (await link.next_inbound()).session_event == SessionEvent.CLOSE
            assert (await link.next_inbound()).session_event == SessionEvent.NEW


@pytest.mark.slow
async def test_websocket_client_that_stops_reading_is_disconnected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that never reads must not hold up the channel's other messages for long."""
    async with local_websocket() as (transport, link):
        assert isinstance(transport, WebsocketTransport)
        port = int(transport.server_address.rsplit(":", 1)[1])
        # A handshake by hand, then silence: nothing reads what the server sends.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            key = base64.b64encode(b"0123456789abcdef").decode()
            await stream.send_all(
                (
                    "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
                ).encode()
            )
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 101 ")
            new = await link.next_inbound()
            big = VumiMessage(to_addr=new.from_addr, content="x" * (16 * 1024 * 1024))
            with pytest.raises(ProviderRejected) as rejected:
                await transport.send(big)
            assert rejected.value.code == "client_stalled"
            assert (await link.next_inbound()).session_event == SessionEvent.CLOSE


async def test_websocket_bind_failure_is_reported_then_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    blockers = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = blockers[0].socket.getsockname()[1]
    link = MemoryLink()
    transport = WebsocketTransport(WebsocketConfig(port=port, interface="127.0.0.1"), link)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        failed = await link.wait_status("bind_failed")
        assert failed.level == StatusLevel.DOWN
        assert failed.details == {"interface": "127.0.0.1", "port": port}
        for listener in blockers:
            await listener.aclose()
        listening = await link.wait_status("listening")
        assert listening.details["port"] == port
        nursery.cancel_scope.cancel()


# --- junk (fault scenario 6) -------------------------------------------------------------------

JUNK_FRAMES = [
    ("invalid utf-8", b"\xc0\xaf\xed\xa0\x80ok", "\ufffd\ufffd\ufffd\ufffd\ufffdok"),
    ("NULs and control characters", b"\x00\x07\x1b[2J\x7f", "\x00\x07\x1b[2J\x7f"),
    ("telnet IAC bytes", b"\xff\xfd\x18", "\ufffd\ufffd\x18"),
    ("half a JSON object", b'{"content": "x', '{"content": "x'),
    ("JSON with a non-string content", b'{"content": 5}', '{"content": 5}'),
]


@pytest.mark.parametrize(
    ("label", "frame", "content"), JUNK_FRAMES, ids=[case[0] for case in JUNK_FRAMES]
)
async def test_websocket_junk_frames_are_read_and_the_session_goes_on(
    label: str, frame: bytes, content: str
) -> None:
    async with local_websocket() as (transport, link), ws_client(transport) as ws:
        await link.next_inbound()
        await ws.send_message(frame)
        await ws.send_message("after")
        assert (await link.next_inbound()).content == content
        assert (await link.next_inbound()).content == "after"


RAW_JUNK = [
    ("random bytes", bytes(range(256)) * 4),
    ("NULs", b"\x00" * 4096),
    ("endless request line", b"GET /" + b"a" * 1024 * 1024),
    ("endless headers", b"GET / HTTP/1.1\r\n" + b"X-Junk: y\r\n" * 100_000),
]


@pytest.mark.parametrize(("label", "junk"), RAW_JUNK, ids=[case[0] for case in RAW_JUNK])
async def test_websocket_raw_junk_instead_of_a_handshake(label: str, junk: bytes) -> None:
    """Bytes that are no WebSocket handshake close that connection; the server goes on."""
    async with local_websocket() as (transport, link):
        assert isinstance(transport, WebsocketTransport)
        port = int(transport.server_address.rsplit(":", 1)[1])
        async with await trio.open_tcp_stream("127.0.0.1", port) as raw:
            with trio.fail_after(READ_TIMEOUT), suppress(trio.BrokenResourceError):
                await raw.send_all(junk)
                while await raw.receive_some(65536):
                    pass
        async with ws_client(transport) as ws:
            assert (await link.next_inbound()).session_event == SessionEvent.NEW
            await ws.send_message("fine")
            assert (await link.next_inbound()).content == "fine"
