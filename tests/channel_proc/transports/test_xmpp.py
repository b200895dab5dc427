"""Table-driven tests of the xmpp channel type against a real Prosody server on loopback.

The channel logs in as BOT; the person at the other end is HUMAN, a second account on
the same server (tests/xmpp_server.py).
"""

from __future__ import annotations

import base64
import logging
import signal
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import jsonschema
import pytest
import trio
from pydantic import ValidationError

from channel_proc.transports.base import StatusLevel
from channel_proc.transports.errors import ConnectionFailed, ProviderRejected, SendError
from channel_proc.transports.xmpp import XmppConfig, XmppTransport
from channel_proc.transports.xmpp.client import HIGH_WATER
from ipc.payloads import VumiMessage
from tests.channel_proc.transports.harness import (
    InboundCase,
    MemoryLink,
    OutboundCase,
    assert_fields,
    build,
    running_transport,
)
from tests.xmpp_server import (
    BOT,
    HUMAN,
    ProsodyServer,
    require_prosody,
    running_prosody,
    xmpp_user,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from pathlib import Path

    from channel_proc.events import StatusReported
    from channel_proc.transports.xmpp.client import MessageType
    from tests.xmpp_server import XmppUser

pytestmark = pytest.mark.slow


@pytest.fixture
def prosody_dir(tmp_path: Path) -> Path:
    """Where a test's own Prosody lives; errors (with the install command) without Prosody."""
    require_prosody()
    return tmp_path / "prosody"


@pytest.fixture
async def prosody(prosody_dir: Path) -> AsyncIterator[ProsodyServer]:
    async with running_prosody(prosody_dir) as server:
        yield server


@asynccontextmanager
async def bot(
    server: ProsodyServer, **overrides: Any
) -> AsyncIterator[tuple[XmppTransport, MemoryLink]]:
    """The channel's transport, logged in as BOT and online."""
    async with running_transport(XmppTransport, server.channel_config(**overrides)) as (t, link):
        assert isinstance(t, XmppTransport)
        await link.wait_status("connected")
        yield t, link


# --- config ----------------------------------------------------------------------------------

MINIMAL = {"jid": "bot@example.org", "password": "pw"}


def test_config_defaults() -> None:
    config = XmppConfig.model_validate({**MINIMAL, "worker_name": "ignored"})
    assert (config.port, config.tls, config.verify_tls) == (5222, "starttls", True)
    assert config.server_host == "example.org"
    assert config.account == "bot@example.org"
    assert config.transport_type == "xmpp"
    assert (config.status, config.status_message) == (None, None)
    assert (config.ping_interval, config.connect_timeout) == (60.0, 10.0)
    assert (config.reconnect_delay, config.reconnect_max_delay) == (1.0, 60.0)


def test_config_username_is_vumis_name_for_jid() -> None:
    config = XmppConfig.model_validate({"username": "bot@example.org/res", "password": "pw"})
    assert config.account == "bot@example.org/res"
    assert XmppTransport(config, MemoryLink()).jid == "bot@example.org"


INVALID_CONFIGS = [
    ("no account", {"password": "pw"}),
    ("no password", {"jid": "bot@example.org"}),
    ("jid and username differ", {**MINIMAL, "username": "other@example.org"}),
    ("invalid jid", {"jid": "bot@@example.org", "password": "pw"}),
    ("empty jid", {"jid": "", "password": "pw"}),
    ("port out of range", {**MINIMAL, "port": 70000}),
    ("unknown tls mode", {**MINIMAL, "tls": "ssl"}),
    ("unknown show", {**MINIMAL, "status": "busy"}),
    ("zero ping interval", {**MINIMAL, "ping_interval": 0}),
]


@pytest.mark.parametrize(("label", "config"), INVALID_CONFIGS, ids=[c[0] for c in INVALID_CONFIGS])
def test_config_invalid(label: str, config: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        XmppConfig.model_validate(config)


SCHEMA_CASES = [
    ("jid", MINIMAL, True),
    ("username", {"username": "bot@example.org", "password": "pw"}, True),
    ("neither", {"password": "pw"}, False),
    ("no password", {"jid": "bot@example.org"}, False),
    ("bad tls", {**MINIMAL, "tls": "ssl"}, False),
]


@pytest.mark.parametrize(
    ("label", "config", "valid"), SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES]
)
def test_config_schema_as_the_api_checks_it(
    label: str, config: dict[str, Any], valid: bool
) -> None:
    validator = jsonschema.Draft202012Validator(XmppConfig.model_json_schema())
    assert validator.is_valid(config) == valid


def test_config_never_shows_the_password() -> None:
    config = XmppConfig.model_validate({**MINIMAL, "password": "hunter2-secret"})
    assert "hunter2-secret" not in repr(config)
    assert "hunter2-secret" not in repr(config.client_settings())
    assert XmppConfig.model_json_schema()["properties"]["password"]["writeOnly"] is True


# --- connecting --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectCase:
    label: str
    config: Mapping[str, Any] = field(default_factory=dict)
    status: str
    level: StatusLevel
    encrypted: bool | None = None
    reason: str = ""


CONNECT_CASES = [
    ConnectCase(label="no tls", status="connected", level=StatusLevel.OK, encrypted=False),
    ConnectCase(
        label="starttls",
        config={"tls": "starttls", "verify_tls": False},
        status="connected",
        level=StatusLevel.OK,
        encrypted=True,
    ),
    ConnectCase(
        label="direct tls",
        config={"tls": "direct", "verify_tls": False},
        status="connected",
        level=StatusLevel.OK,
        encrypted=True,
    ),
    ConnectCase(
        label="starttls refuses a self-signed certificate",
        config={"tls": "starttls"},
        status="disconnected",
        level=StatusLevel.DOWN,
        reason="certificate verify failed",
    ),
    ConnectCase(
        label="direct tls refuses a self-signed certificate",
        config={"tls": "direct"},
        status="disconnected",
        level=StatusLevel.DOWN,
        reason="certificate verify failed",
    ),
    ConnectCase(
        label="wrong password",
        config={"password": "not-the-password"},
        status="auth_failed",
        level=StatusLevel.DOWN,
        reason="not-authorized",
    ),
    ConnectCase(
        label="unknown account",
        config={"jid": "nobody@localhost"},
        status="auth_failed",
        level=StatusLevel.DOWN,
        reason="not-authorized",
    ),
    ConnectCase(
        label="nothing listening",
        config={"port": 1},
        status="disconnected",
        level=StatusLevel.DOWN,
        reason="refused",
    ),
]


@pytest.mark.parametrize("case", CONNECT_CASES, ids=lambda c: c.label)
async def test_xmpp_connect(prosody: ProsodyServer, case: ConnectCase) -> None:
    config = prosody.channel_config(**case.config)
    async with running_transport(XmppTransport, config) as (_, link):
        connecting = await link.wait_status("connecting")
        report = await link.wait_status(case.status)
    assert connecting.level == StatusLevel.DOWN
    assert connecting.details["jid"] == config["jid"]
    assert report.component == "xmpp"
    assert report.level == case.level
    assert report.details["port"] == config["port"]
    if case.encrypted is not None:
        assert report.details["encrypted"] is case.encrypted
        assert str(report.details["bound_jid"]).startswith(f"{config['jid']}/")
    assert case.reason in str(report.details.get("reason", ""))
    if case.level == StatusLevel.DOWN:
        assert float(str(report.details["retry_in"])) > 0


async def test_xmpp_tls_none_against_a_server_that_requires_tls(prosody_dir: Path) -> None:
    async with (
        running_prosody(prosody_dir, require_encryption=True) as server,
        running_transport(XmppTransport, server.channel_config()) as (_, link),
    ):
        report = await link.wait_status("disconnected")
    assert "requires TLS" in str(report.details["reason"])


async def test_xmpp_starttls_not_offered_is_refused(prosody_dir: Path) -> None:
    """No silent downgrade: tls=starttls never logs in over a plain connection."""
    async with (
        running_prosody(prosody_dir, starttls=False) as server,
        running_transport(XmppTransport, server.channel_config(tls="starttls")) as (_, link),
    ):
        report = await link.wait_status("disconnected")
    assert "does not offer STARTTLS" in str(report.details["reason"])


async def test_xmpp_reconnects_after_the_server_restarts(prosody: ProsodyServer) -> None:
    async with bot(prosody) as (transport, link), xmpp_user(prosody) as human:
        await prosody.stop()
        lost = await link.wait_status("disconnected")
        with pytest.raises(ConnectionFailed):
            await transport.send(VumiMessage(to_addr=human.jid, content="lost"))
        await prosody.start()
        await link.wait_status("connected")
        # The person logs in again too, and messages flow both ways once more.
        async with xmpp_user(prosody) as again:
            await again.send(BOT.jid, "back?")
            assert (await link.next_inbound()).content == "back?"
            await transport.send(VumiMessage(to_addr=again.jid, content="yes"))
            assert (await again.receive()).body == "yes"
    assert lost.level == StatusLevel.DOWN
    assert lost.message.startswith("Disconnected from ")


async def test_xmpp_unanswered_ping_drops_the_connection(prosody: ProsodyServer) -> None:
    async with bot(prosody, ping_interval=0.3) as (_, link):
        assert prosody.process is not None
        prosody.process.send_signal(signal.SIGSTOP)
        try:
            lost = await link.wait_status("disconnected")
        finally:
            prosody.process.send_signal(signal.SIGCONT)
        await link.wait_status("connected")
    assert "no answer to a ping" in str(lost.details["reason"])


async def test_xmpp_auth_failure_is_retried_with_capped_backoff(prosody: ProsodyServer) -> None:
    config = prosody.channel_config(password="wrong", reconnect_delay=0.05, reconnect_max_delay=0.1)
    async with running_transport(XmppTransport, config) as (_, link):
        failures = [await link.wait_status("auth_failed") for _ in range(3)]
    assert all(float(str(f.details["retry_in"])) <= 0.1 for f in failures)


async def test_xmpp_password_never_logged(
    prosody_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With SASL PLAIN (the password itself goes over the wire, inside TLS) and DEBUG logging,
    neither the logs nor the statuses show it, in any encoding."""
    caplog.set_level(logging.DEBUG)
    wrong = "Wrong-Pass-77"
    secrets = _password_forms(BOT.jid, BOT.password) + _password_forms(BOT.jid, wrong)
    reports: list[StatusReported] = []
    async with running_prosody(prosody_dir, plain_only=True) as server:
        for password, outcome in ((BOT.password, "connected"), (wrong, "auth_failed")):
            config = server.channel_config(password=password, tls="starttls", verify_tls=False)
            async with running_transport(XmppTransport, config) as (_, link):
                reports.append(await link.wait_status("connecting"))
                reports.append(await link.wait_status(outcome))
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "login as bot@localhost failed" in logged
    shown = logged + "\n".join(f"{r.message} {r.details}" for r in reports)
    for secret in secrets:
        assert secret not in shown


def _password_forms(jid: str, password: str) -> list[str]:
    """The password as it could leak: raw, and base64 as in SASL PLAIN."""
    user = jid.split("@")[0]
    plain = f"\0{user}\0{password}".encode()
    return [
        password,
        base64.b64encode(plain).decode(),
        base64.b64encode(password.encode()).decode(),
    ]


async def test_xmpp_started_even_when_the_first_attempt_fails() -> None:
    config = {"jid": "bot@localhost", "password": "x", "host": "127.0.0.1", "port": 1}
    transport, link = build(XmppTransport, config)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(transport.run)
        assert (await link.wait_status("disconnected")).level == StatusLevel.DOWN
        nursery.cancel_scope.cancel()


# --- inbound -----------------------------------------------------------------------------------


def chat(content: str) -> dict[str, object]:
    return {
        "content": content,
        "from_addr": HUMAN.jid,
        "to_addr": BOT.jid,
        "session_event": None,
        "transport_type": "xmpp",
    }


INBOUND_CASES = [
    InboundCase(label="chat", provider_input=(b"chat:Hi there",), expected=(chat("Hi there"),)),
    InboundCase(label="normal message", provider_input=(b"normal:note",), expected=(chat("note"),)),
    InboundCase(
        label="unicode and markup",
        provider_input=("chat:h\u00e9 <b>&amp; \u2713".encode(),),
        expected=(chat("h\u00e9 <b>&amp; \u2713"),),
    ),
    InboundCase(
        label="headline and groupchat are not chat",
        provider_input=(b"headline:news", b"groupchat:room", b"chat:after"),
        expected=(chat("after"),),
    ),
    InboundCase(
        label="order kept",
        provider_input=tuple(f"chat:m{i}".encode() for i in range(30)),
        expected=tuple(chat(f"m{i}") for i in range(30)),
    ),
    InboundCase(
        label="custom transport_type",
        config={"transport_type": "chat"},
        provider_input=(b"chat:x",),
        expected=({"transport_type": "chat", "content": "x"},),
    ),
]


@pytest.mark.parametrize("case", INBOUND_CASES, ids=lambda c: c.label)
async def test_xmpp_inbound(prosody: ProsodyServer, case: InboundCase) -> None:
    async with bot(prosody, **case.config) as (_, link), xmpp_user(prosody) as human:
        for item in case.provider_input:
            kind, _, body = item.decode().partition(":")
            await human.send(BOT.jid, body, cast("MessageType", kind))
        received = [await link.next_inbound() for _ in case.expected]
        assert link.pending_inbound() == []
    for msg, expected in zip(received, case.expected, strict=True):
        assert_fields(msg, expected)


async def test_xmpp_inbound_to_our_full_jid_has_the_bare_jid(prosody: ProsodyServer) -> None:
    async with running_transport(XmppTransport, prosody.channel_config()) as (_, link):
        connected = await link.wait_status("connected")
        async with xmpp_user(prosody) as human:
            await human.send(str(connected.details["bound_jid"]), "direct")
            msg = await link.next_inbound()
    assert (msg.to_addr, msg.from_addr, msg.content) == (BOT.jid, HUMAN.jid, "direct")


async def test_xmpp_messages_kept_offline_arrive_after_login(prosody: ProsodyServer) -> None:
    """The server sends stored messages right after our presence, before we report
    connected: they are delivered, in order, after the connected status."""
    async with xmpp_user(prosody) as human:
        for text in ("while", "you were", "away"):
            await human.send(BOT.jid, text)
        # The server handled the messages (stored them) once it answers this ping.
        await human.loop.call(human.client.ping)
    async with running_transport(XmppTransport, prosody.channel_config()) as (_, link):
        await link.wait_status("connected")
        received = [(await link.next_inbound()).content for _ in range(3)]
    assert received == ["while", "you were", "away"]


class GatedLink(MemoryLink):
    """A link whose `inbound` waits until the test opens the gate (a stalled broker)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()

    async def inbound(self, msg: VumiMessage) -> None:
        await self.gate.wait()
        await super().inbound(msg)


async def test_xmpp_stalled_link_stops_reading_then_catches_up(prosody: ProsodyServer) -> None:
    """While inbound messages cannot be queued the client stops reading from the server
    (so it does not even answer pings), then reads on, losing nothing, in order."""
    link = GatedLink()
    config = XmppConfig.model_validate(prosody.channel_config())
    async with trio.open_nursery() as nursery, xmpp_user(prosody) as human:
        await nursery.start(XmppTransport(config, link).run)
        bound_jid = str((await link.wait_status("connected")).details["bound_jid"])
        assert await human.answers_ping(bound_jid)
        # More than one read's worth (asyncio reads up to 256 KiB), so some stays unread.
        count, padding = 4 * HIGH_WATER, "x" * 16_000
        for i in range(count):
            await human.send(BOT.jid, f"m{i} {padding}")
        assert not await human.answers_ping(bound_jid)
        link.gate.set()
        received = [str((await link.next_inbound()).content).split()[0] for _ in range(count)]
        assert await human.answers_ping(bound_jid)
        nursery.cancel_scope.cancel()
    assert received == [f"m{i}" for i in range(count)]


# --- outbound ----------------------------------------------------------------------------------

OUTBOUND_CASES = [
    OutboundCase(label="content", message={"content": "hello"}, provider_output=b"hello"),
    OutboundCase(
        label="unicode and markup",
        message={"content": "\u2713 <i>&"},
        provider_output="\u2713 <i>&".encode(),
    ),
    OutboundCase(label="to a full JID", message={"content": "hi", "to_addr": "FULL"}),
    OutboundCase(label="no content sends nothing", message={"content": None}),
    OutboundCase(
        label="invalid address",
        message={"content": "x", "to_addr": "not a@jid@"},
        error=ProviderRejected,
    ),
    OutboundCase(
        label="no address", message={"content": "x", "to_addr": None}, error=ProviderRejected
    ),
]


@pytest.mark.parametrize("case", OUTBOUND_CASES, ids=lambda c: c.label)
async def test_xmpp_outbound(prosody: ProsodyServer, case: OutboundCase) -> None:
    async with bot(prosody) as (transport, _), xmpp_user(prosody) as human:
        fields: dict[str, Any] = {"to_addr": human.jid, **case.message}
        if fields["to_addr"] == "FULL":
            fields["to_addr"] = human.full_jid
        msg = VumiMessage.model_validate(fields)
        if case.error is not None:
            with pytest.raises(case.error):
                await transport.send(msg)
            return
        receipt = await transport.send(msg)
        # A marker after it shows what (if anything) arrived before.
        await transport.send(VumiMessage(to_addr=human.jid, content="marker"))
        received = await _until_marker(human)
    assert receipt.provider_message_id is None
    expected = [] if msg.content is None else [msg.content]
    assert [m.body for m in received] == expected
    assert all(m.sender.startswith(f"{BOT.jid}/") for m in received)
    assert all(m.stanza_id == msg.message_id for m in received)


async def _until_marker(user: XmppUser) -> list[Any]:
    received = []
    while (chat_ := await user.receive()).body != "marker":
        received.append(chat_)
    return received


async def test_xmpp_send_before_connecting_is_retryable() -> None:
    config = {"jid": "bot@localhost", "password": "x", "host": "127.0.0.1", "port": 1}
    async with running_transport(XmppTransport, config) as (transport, _):
        with pytest.raises(SendError) as info:
            await transport.send(VumiMessage(to_addr=HUMAN.jid, content="x"))
    assert isinstance(info.value, ConnectionFailed)
    assert info.value.retryable
