"""Table-driven tests of the telnet channel type over real TCP sockets."""

from __future__ import annotations

from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from pydantic import ValidationError

from channel_proc.transports.base import StatusLevel
from channel_proc.transports.errors import ProviderRejected
from channel_proc.transports.telnet import (
    MAX_LINE_BYTES,
    LineReader,
    TcpEndpoint,
    TelnetConfig,
    TelnetTransport,
    parse_endpoint,
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
    from collections.abc import AsyncIterator

LOCAL = {"twisted_endpoint": "tcp:port=0:interface=127.0.0.1"}

# --- endpoint parsing ---------------------------------------------------------------------

VALID_ENDPOINTS = [
    ("tcp:9001", TcpEndpoint("0.0.0.0", 9001)),
    ("tcp:port=9001", TcpEndpoint("0.0.0.0", 9001)),
    ("tcp:port=9001:interface=127.0.0.1", TcpEndpoint("127.0.0.1", 9001)),
    ("tcp:9001:interface=0.0.0.0", TcpEndpoint("0.0.0.0", 9001)),
    ("tcp:interface=localhost:port=0", TcpEndpoint("localhost", 0)),
    ("tcp:9001:backlog=10", TcpEndpoint("0.0.0.0", 9001, 10)),
]

INVALID_ENDPOINTS = [
    "9001",
    "tcp:",
    "udp:9001",
    "tcp:port=70000",
    "tcp:interface=127.0.0.1",
    "tcp:9001:port=9002",
    "tcp:9001:9002",
    "tcp:port=9001:interface=",
    "tcp:port=abc",
    "unix:/tmp/x.sock",
    "tcp:9001:interface=127.0.0.1:interface=0.0.0.0",
]


@pytest.mark.parametrize(("text", "expected"), VALID_ENDPOINTS, ids=[v[0] for v in VALID_ENDPOINTS])
def test_endpoint_parses(text: str, expected: TcpEndpoint) -> None:
    assert parse_endpoint(text) == expected
    assert TelnetConfig(twisted_endpoint=text).endpoint == expected


@pytest.mark.parametrize("text", INVALID_ENDPOINTS)
def test_endpoint_invalid_is_rejected(text: str) -> None:
    with pytest.raises(ValidationError):
        TelnetConfig(twisted_endpoint=text)


@pytest.mark.parametrize("text", [v[0] for v in VALID_ENDPOINTS])
def test_endpoint_schema_pattern_accepts_valid(text: str) -> None:
    import re

    pattern = TelnetConfig.model_json_schema()["properties"]["twisted_endpoint"]["pattern"]
    assert re.match(pattern, text)


@pytest.mark.parametrize("text", ["9001", "udp:9001", "tcp:port=abc", "unix:/tmp/x.sock"])
def test_endpoint_schema_pattern_rejects_malformed(text: str) -> None:
    import re

    pattern = TelnetConfig.model_json_schema()["properties"]["twisted_endpoint"]["pattern"]
    assert not re.match(pattern, text)


def test_config_defaults_and_ignores_unknown_keys() -> None:
    config = TelnetConfig.model_validate({"twisted_endpoint": "tcp:9001", "worker_name": "x"})
    assert config.transport_type == "telnet"
    assert config.to_addr is None


def test_config_requires_endpoint() -> None:
    with pytest.raises(ValidationError):
        TelnetConfig.model_validate({})


# --- line reader (sans-IO) -------------------------------------------------------------------

LINE_CASES = [
    ("crlf", [b"hi\r\n"], ["hi"]),
    ("lf", [b"hi\n"], ["hi"]),
    ("two lines one chunk", [b"a\r\nb\r\n"], ["a", "b"]),
    ("split across chunks", [b"he", b"llo\r", b"\n"], ["hello"]),
    ("empty line", [b"\r\n"], [""]),
    ("utf-8", ["héllo ✓\r\n".encode()], ["héllo ✓"]),
    ("invalid utf-8 replaced", [b"a\xffb\xfe\r\n"[:1] + b"\xc3\r\n"], ["a\ufffd"]),
    ("telnet negotiation dropped", [b"\xff\xfd\x01\xff\xfb\x03hi\r\n"], ["hi"]),
    ("negotiation split", [b"\xff", b"\xfd", b"\x01ok\n"], ["ok"]),
    ("subnegotiation dropped", [b"\xff\xfa\x18\x01\xff\xf0x\n"], ["x"]),
    ("escaped 0xff is data", [b"\xff\xffz\n"], ["\ufffdz"]),
    ("NUL and control characters kept", [b"a\x00b\x07\x1b[2J\n"], ["a\x00b\x07\x1b[2J"]),
    ("lone CR is data", [b"a\rb\n"], ["a\rb"]),
    ("bare IAC command dropped", [b"\xff\xf1a\xff\xf3b\n"], ["ab"]),
    ("IAC at the end of a chunk", [b"x\xff", b"\xfb\x01y\n"], ["xy"]),
    ("unterminated subnegotiation eats the rest", [b"a\xff\xfa\x18junk\nmore\n"], []),
    ("invalid utf-8 sequences", [b"\xc0\xaf\xed\xa0\x80\xf8\x88\x80\x80\x80\n"], ["\ufffd" * 10]),
]


@pytest.mark.parametrize(("label", "chunks", "lines"), LINE_CASES, ids=[c[0] for c in LINE_CASES])
def test_line_reader(label: str, chunks: list[bytes], lines: list[str]) -> None:
    reader = LineReader()
    got = [line for chunk in chunks for line in reader.feed(chunk)]
    assert got == lines
    assert not reader.overflowed


OVERFLOW_CASES = [
    ("one long chunk", [b"0123456789abcdef"], []),
    ("lines before the long one are kept", [b"ok\n0123456789abcdef\nnext\n"], ["ok"]),
    ("grows across chunks", [b"0123", b"4567", b"8"], []),
    ("CR counts", [b"01234567\r\n"], []),
    ("escaped 0xff counts", [b"\xff\xff" * 9], []),
    ("nothing after the overflow", [b"0123456789", b"\nlater\n"], []),
]


@pytest.mark.parametrize(
    ("label", "chunks", "lines"), OVERFLOW_CASES, ids=[c[0] for c in OVERFLOW_CASES]
)
def test_line_reader_overflow(label: str, chunks: list[bytes], lines: list[str]) -> None:
    reader = LineReader(max_line=8)
    got = [line for chunk in chunks for line in reader.feed(chunk)]
    assert got == lines
    assert reader.overflowed
    assert reader.flush() is None


def test_line_reader_at_the_limit_is_a_line() -> None:
    reader = LineReader(max_line=8)
    assert reader.feed(b"0123456\r\n01234567") == ["0123456"]
    assert reader.flush() == "01234567"
    assert not reader.overflowed


def test_line_reader_memory_is_bounded_by_the_limit() -> None:
    reader = LineReader(max_line=1024)
    for _ in range(100):
        reader.feed(b"\x00" * 100)
    assert reader.overflowed
    assert len(reader._line) == 0


def test_line_reader_flush_returns_partial_line() -> None:
    reader = LineReader()
    assert reader.feed(b"partial") == []
    assert reader.flush() == "partial"
    assert reader.flush() is None


# --- inbound over TCP ------------------------------------------------------------------------

NEW: dict[str, object] = {"session_event": "new", "content": None, "transport_type": "telnet"}
CLOSE: dict[str, object] = {"session_event": "close", "content": None}


def resume(text: str) -> dict[str, object]:
    return {"session_event": "resume", "content": text}


INBOUND_CASES = [
    InboundCase(label="connect then disconnect", provider_input=(), expected=(NEW, CLOSE)),
    InboundCase(
        label="one line",
        provider_input=(b"Hi there\r\n",),
        expected=(NEW, resume("Hi there"), CLOSE),
    ),
    InboundCase(
        label="lines in pieces",
        provider_input=(b"a\r\nb", b"c\r\n"),
        expected=(NEW, resume("a"), resume("bc"), CLOSE),
    ),
    InboundCase(
        label="unfinished last line is delivered",
        provider_input=(b"bye",),
        expected=(NEW, resume("bye"), CLOSE),
    ),
    InboundCase(
        label="overlong line disconnects",
        provider_input=(b"ok\n" + b"x" * (MAX_LINE_BYTES + 10) + b"\r\nlater\r\n",),
        expected=(NEW, resume("ok"), CLOSE),
    ),
    InboundCase(
        label="configured line limit",
        config={"max_line_bytes": 16},
        provider_input=(b"0123456789\n", b"0123456789abcdefg"),
        expected=(NEW, resume("0123456789"), CLOSE),
    ),
    InboundCase(
        label="binary junk",
        provider_input=(b"\x00\x01\xfe\xc3(\x7f\n", b"\xff\xfd\x18\xff\xff\x00\r\n"),
        expected=(NEW, resume("\x00\x01\ufffd\ufffd(\x7f"), resume("\ufffd\x00"), CLOSE),
    ),
    InboundCase(
        label="custom transport_type",
        config={"transport_type": "ussd"},
        provider_input=(b"1\n",),
        expected=({"transport_type": "ussd"}, {"transport_type": "ussd", "content": "1"}, CLOSE),
    ),
    InboundCase(
        label="to_addr override",
        config={"to_addr": "*120#"},
        provider_input=(),
        expected=({"to_addr": "*120#"}, {"to_addr": "*120#"}),
    ),
]


@asynccontextmanager
async def telnet_client(transport: TelnetTransport) -> AsyncIterator[trio.SocketStream]:
    port = int(transport.server_address.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        yield stream


def local_telnet(config: dict[str, Any]) -> Any:
    return running_transport(TelnetTransport, {**LOCAL, **config})


@pytest.mark.parametrize("case", INBOUND_CASES, ids=lambda c: c.label)
async def test_telnet_inbound(case: InboundCase) -> None:
    async with local_telnet(dict(case.config)) as (transport, link):
        async with telnet_client(transport) as client:
            for chunk in case.provider_input:
                await client.send_all(chunk)
            first = await link.next_inbound()
        received = [first] + [await link.next_inbound() for _ in case.expected[1:]]
    for msg, expected in zip(received, case.expected, strict=True):
        assert_fields(msg, expected)


async def test_telnet_overlong_line_is_refused_with_a_notice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with local_telnet({"max_line_bytes": 100}) as (transport, link):
        async with telnet_client(transport) as client, trio.open_nursery() as nursery:
            await link.next_inbound()

            async def keep_sending() -> None:
                # A client that never stops: the notice must still reach it.
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    for _ in range(1000):
                        await client.send_all(b"y" * 4096)

            nursery.start_soon(keep_sending)
            received, closed = b"", False
            with trio.fail_after(READ_TIMEOUT):
                while chunk := await client.receive_some(4096):
                    received += chunk
                closed = True
            nursery.cancel_scope.cancel()
        close = await link.next_inbound()
    assert received == b"Error: line longer than 100 bytes; disconnecting.\r\n"
    assert closed
    assert close.session_event == SessionEvent.CLOSE
    assert "longer than 100 bytes; disconnected" in caplog.text


async def test_telnet_junk_client_does_not_disturb_another() -> None:
    async with (
        local_telnet({"max_line_bytes": 1000}) as (transport, link),
        telnet_client(transport) as good,
    ):
        good_addr = "{}:{}".format(*good.socket.getsockname()[:2])
        await link.next_inbound()
        async with telnet_client(transport) as bad:
            await link.next_inbound()
            # Every byte but newline and IAC, past the limit: no line ever ends.
            await bad.send_all(bytes(b for b in range(256) if b not in (10, 255)) * 8)
            await good.send_all(b"still here\r\n")
            got = [await link.next_inbound() for _ in range(2)]
    by_addr = {msg.from_addr: msg for msg in got}
    assert by_addr[good_addr].content == "still here"
    assert [m.session_event for m in got if m.from_addr != good_addr] == [SessionEvent.CLOSE]


async def test_telnet_inbound_addresses() -> None:
    async with local_telnet({}) as (transport, link), telnet_client(transport) as client:
        msg = await link.next_inbound()
        host, port = client.socket.getsockname()[:2]
    assert msg.from_addr == f"{host}:{port}"
    assert msg.to_addr == transport.server_address
    assert transport.server_address.startswith("127.0.0.1:")
    assert not transport.server_address.endswith(":0")


async def test_telnet_statuses_for_listening_and_clients() -> None:
    async with local_telnet({}) as (transport, link):
        listening = await link.wait_status("listening")
        async with telnet_client(transport) as client:
            connected = await link.wait_status("client_connected")
            address = "{}:{}".format(*client.socket.getsockname()[:2])
        disconnected = await link.wait_status("client_disconnected")
    assert listening.component == "telnet"
    assert listening.level == StatusLevel.OK
    assert listening.details["port"] == int(transport.server_address.rsplit(":", 1)[1])
    assert connected.details["address"] == address
    assert disconnected.details["address"] == address
    assert connected.level == disconnected.level == StatusLevel.OK


# --- outbound --------------------------------------------------------------------------------

OUTBOUND_CASES = [
    OutboundCase(label="content", message={"content": "hello"}, provider_output=b"hello\r\n"),
    OutboundCase(label="unicode", message={"content": "✓ ok"}, provider_output="✓ ok\r\n".encode()),
    OutboundCase(label="no content writes nothing", message={"content": None}),
    OutboundCase(
        label="close session",
        message={"content": "bye", "session_event": "close"},
        provider_output=b"bye\r\n",
    ),
    OutboundCase(
        label="unknown address",
        message={"content": "x", "to_addr": "10.0.0.1:1"},
        error=ProviderRejected,
    ),
]


async def read_until_eof_or_quiet(stream: trio.SocketStream) -> tuple[bytes, bool]:
    """What the client received, and whether the server closed the connection."""
    data = b""
    while True:
        with trio.move_on_after(0.2):
            chunk = await stream.receive_some(4096)
            if not chunk:
                return data, True
            data += chunk
            continue
        return data, False


@pytest.mark.parametrize("case", OUTBOUND_CASES, ids=lambda c: c.label)
async def test_telnet_outbound(case: OutboundCase) -> None:
    async with (
        local_telnet(dict(case.config)) as (transport, link),
        telnet_client(transport) as client,
    ):
        new = await link.next_inbound()
        msg = VumiMessage.model_validate({"to_addr": new.from_addr, **case.message})
        if case.error is not None:
            with pytest.raises(case.error):
                await transport.send(msg)
            return
        receipt = await transport.send(msg)
        received, closed = await read_until_eof_or_quiet(client)
    assert receipt.provider_message_id is None
    assert received == case.provider_output
    assert closed == (msg.session_event == SessionEvent.CLOSE)


async def test_telnet_close_by_us_is_not_reported_as_inbound_close() -> None:
    async with local_telnet({}) as (transport, link):
        async with telnet_client(transport) as client:
            new = await link.next_inbound()
            await transport.send(
                VumiMessage(to_addr=new.from_addr, session_event=SessionEvent.CLOSE)
            )
            await read_until_eof_or_quiet(client)
        await link.wait_status("client_disconnected")
        assert link.pending_inbound() == []


async def test_telnet_send_to_disconnected_client_is_rejected() -> None:
    async with local_telnet({}) as (transport, link):
        async with telnet_client(transport):
            new = await link.next_inbound()
        await link.wait_status("client_disconnected")
        with pytest.raises(ProviderRejected, match="no telnet client"):
            await transport.send(VumiMessage(to_addr=new.from_addr, content="late"))


async def test_telnet_sessions_are_independent() -> None:
    async with (
        local_telnet({}) as (transport, link),
        telnet_client(transport) as first,
        telnet_client(transport) as second,
    ):
        a = await link.next_inbound()
        b = await link.next_inbound()
        by_addr = {a.from_addr: first, b.from_addr: second}
        assert len(by_addr) == 2
        for address in by_addr:
            await transport.send(VumiMessage(to_addr=address, content=f"to {address}"))
        for address, stream in by_addr.items():
            with trio.fail_after(READ_TIMEOUT):
                assert await stream.receive_some(4096) == f"to {address}\r\n".encode()


# --- binding ---------------------------------------------------------------------------------


async def test_telnet_bind_failure_is_reported_then_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    blockers = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = blockers[0].socket.getsockname()[1]
    link = MemoryLink()
    config = TelnetConfig(twisted_endpoint=f"tcp:port={port}:interface=127.0.0.1")
    transport = TelnetTransport(config, link)
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
