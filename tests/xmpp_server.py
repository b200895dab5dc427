"""A real XMPP server for tests: its own Prosody on loopback, in a temporary directory.

c2s only (plain/STARTTLS port and a direct-TLS port), no s2s, no registration, offline
messages kept until the account logs in, two
accounts ("bot" for the channel, "human" for the person), a self-signed certificate made
for the test. Needs the `prosody` Debian package and the `openssl` command.
"""

from __future__ import annotations

import shutil
import signal
import socket
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio

from channel_proc.transports.xmpp.bridge import AsyncioThread, open_asyncio_thread
from channel_proc.transports.xmpp.client import (
    ChatReceived,
    ClientSettings,
    Connected,
    MessageType,
    XmppClient,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

INSTALL_HINT: Final = (
    "the XMPP tests need a real Prosody server: install it with "
    "`apt-get update && apt-get install -y prosody openssl`"
)
DOMAIN: Final = "localhost"
#: How long Prosody may take to start or stop.
START_TIMEOUT: Final = 20.0


@dataclass(frozen=True, slots=True)
class Account:
    user: str
    password: str

    @property
    def jid(self) -> str:
        return f"{self.user}@{DOMAIN}"


BOT: Final = Account("bot", "bot-Secret-9f4e")
HUMAN: Final = Account("human", "human-Secret-27ab")

_CONFIG = """\
-- Written by tests/xmpp_server.py for one test run.
run_as_root = true
daemonize = false
pidfile = "{root}/prosody.pid"
data_path = "{root}/data"
certificates = "{root}/certs"
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{root}/prosody.log" }} }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s_port} }}
c2s_direct_tls_ports = {{ {tls_port} }}
legacy_ssl_ports = {{ }}
s2s_ports = {{ }}
modules_enabled = {{ "roster", "saslauth", {tls_module}"disco", "ping", "offline", "posix" }}
modules_disabled = {{ "s2s" }}
allow_registration = false
authentication = "internal_plain"
storage = "internal"
c2s_require_encryption = {require_encryption}
allow_unencrypted_plain_auth = false
ssl = {{ key = "{root}/certs/{domain}.key", certificate = "{root}/certs/{domain}.crt" }}
{sasl}
VirtualHost "{domain}"
"""


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together so they differ)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def require_prosody() -> None:
    """Raise RuntimeError with the install command unless prosody and openssl are installed
    (call it from a fixture: the tests then ERROR, they are not skipped)."""
    for program in ("prosody", "prosodyctl", "openssl"):
        _require(program)


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise RuntimeError(f"`{program}` not found: {INSTALL_HINT}")
    return path


@dataclass
class ProsodyServer:
    """One Prosody instance: `start`, `stop` (and `start` again on the same ports)."""

    root: Path
    require_encryption: bool = False
    #: Without it the server offers no STARTTLS (direct TLS still works).
    starttls: bool = True
    #: Offer only SASL PLAIN (the password itself, base64, inside TLS) instead of SCRAM.
    plain_only: bool = False
    ports: list[int] = field(default_factory=lambda: free_ports(2))
    process: trio.Process | None = None

    @property
    def c2s_port(self) -> int:
        return self.ports[0]

    @property
    def tls_port(self) -> int:
        return self.ports[1]

    @property
    def config_path(self) -> Path:
        return self.root / "prosody.cfg.lua"

    def channel_config(self, account: Account = BOT, **overrides: Any) -> dict[str, Any]:
        """An xmpp channel `config` logging in as `account` (plain connection by default)."""
        config: dict[str, Any] = {
            "jid": account.jid,
            "password": account.password,
            "host": "127.0.0.1",
            "port": self.c2s_port,
            "tls": "none",
            "reconnect_delay": 0.1,
            "reconnect_max_delay": 0.5,
            "connect_timeout": 5,
        }
        if overrides.get("tls") == "direct":
            config["port"] = self.tls_port
        config.update(overrides)
        return config

    async def prepare(self) -> None:
        """Write the config and certificate and create the accounts."""
        prosodyctl = _require("prosodyctl")
        openssl = _require("openssl")
        certs = self.root / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        self.config_path.write_text(
            _CONFIG.format(
                root=self.root,
                domain=DOMAIN,
                c2s_port=self.c2s_port,
                tls_port=self.tls_port,
                require_encryption="true" if self.require_encryption else "false",
                tls_module='"tls", ' if self.starttls else "",
                sasl='disable_sasl_mechanisms = { "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS" }'
                if self.plain_only
                else "",
            )
        )
        await trio.run_process(
            [
                openssl, "req", "-x509", "-nodes", "-days", "2",
                "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-subj", f"/CN={DOMAIN}", "-addext", f"subjectAltName=DNS:{DOMAIN}",
                "-keyout", str(certs / f"{DOMAIN}.key"), "-out", str(certs / f"{DOMAIN}.crt"),
            ],
            capture_stdout=True,
            capture_stderr=True,
        )  # fmt: skip
        for account in (BOT, HUMAN):
            await trio.run_process(
                [
                    prosodyctl, "--config", str(self.config_path),
                    "register", account.user, DOMAIN, account.password,
                ],
                capture_stdout=True,
                capture_stderr=True,
            )  # fmt: skip

    async def start(self) -> None:
        """Start Prosody and return once it accepts connections on both ports."""
        assert self.process is None
        out = (self.root / "prosody.out").open("ab")
        self.process = await trio.lowlevel.open_process(
            [_require("prosody"), "--config", str(self.config_path), "-F"],
            stdout=out,
            stderr=out,
        )
        out.close()
        with trio.fail_after(START_TIMEOUT):
            for port in (self.c2s_port, self.tls_port):
                await self._wait_listening(port)

    async def _wait_listening(self, port: int) -> None:
        # Polling: Prosody has no readiness signal but its listening socket.
        while True:
            if self.process is not None and self.process.returncode is not None:
                raise RuntimeError(f"prosody exited early:\n{self.output()}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return

    async def stop(self) -> None:
        """SIGTERM (Prosody closes its streams) and wait for the exit."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(START_TIMEOUT, shield=True) as scope:
            await process.wait()
        if scope.cancelled_caught:
            process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()

    def output(self) -> str:
        parts = []
        for name in ("prosody.out", "prosody.log"):
            path = self.root / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)


@asynccontextmanager
async def running_prosody(
    root: Path,
    *,
    require_encryption: bool = False,
    starttls: bool = True,
    plain_only: bool = False,
) -> AsyncIterator[ProsodyServer]:
    """A started Prosody with BOT and HUMAN; stopped on exit.

    Raises:
        RuntimeError: prosody (or openssl) is not installed, with the install command.
    """
    server = ProsodyServer(
        root, require_encryption=require_encryption, starttls=starttls, plain_only=plain_only
    )
    await server.prepare()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --- the person at the other end -------------------------------------------------------------

#: How long a test waits for a message to arrive.
RECEIVE_TIMEOUT: Final = 10.0
#: How long the person's client waits for a ping answer.
PING_TIMEOUT: Final = 1.0


@dataclass
class XmppUser:
    """A person's XMPP client (the transport's own client code), logged in and online."""

    loop: AsyncioThread
    client: XmppClient
    full_jid: str
    sent: int = 0

    @property
    def jid(self) -> str:
        return self.full_jid.split("/", 1)[0]

    async def send(self, to: str, body: str, message_type: MessageType = "chat") -> None:
        self.sent += 1
        await self.loop.call(self.client.send_message, to, body, f"user-{self.sent}", message_type)

    async def answers_ping(self, jid: str) -> bool:
        """Whether `jid` (a full JID: a client) answers an XMPP ping within ping_timeout."""
        return await self.loop.call(self.client.ping, jid)

    async def receive(self) -> ChatReceived:
        with trio.fail_after(RECEIVE_TIMEOUT):
            event = await self.loop.call(self.client.next_event)
        assert isinstance(event, ChatReceived), event
        return event


@asynccontextmanager
async def xmpp_user(server: ProsodyServer, account: Account = HUMAN) -> AsyncIterator[XmppUser]:
    """`account` connected to `server` over a plain connection, until the block ends."""
    settings = ClientSettings(
        jid=account.jid,
        password=account.password,
        host="127.0.0.1",
        port=server.c2s_port,
        tls="none",
        verify_tls=False,
        show=None,
        status_message=None,
        ping_timeout=PING_TIMEOUT,
    )
    async with open_asyncio_thread("xmpp-test-user") as loop:
        client = XmppClient(settings)
        try:
            with trio.fail_after(RECEIVE_TIMEOUT):
                await loop.call(client.open)
                first = await loop.call(client.next_event)
            assert isinstance(first, Connected), first
            yield XmppUser(loop, client, first.jid)
        finally:
            with trio.move_on_after(3, shield=True):
                await loop.call(client.close)
