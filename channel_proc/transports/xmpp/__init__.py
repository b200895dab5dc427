"""The `xmpp` channel type: a client account on an XMPP server (RFC 6120/6121).

Chat messages to the account become inbound messages (from = the sender's bare JID);
outbound messages are sent as type=chat to `to`. The connection is kept up with pings and
re-established with capped backoff; its state is the `xmpp` status component.
slixmpp does the protocol on its own asyncio loop in a thread (bridge.py, client.py),
one loop per connection so that nothing a dead connection left behind outlives it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Final, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from slixmpp import JID
from slixmpp.jid import InvalidJID

from channel_proc.backoff import Backoff
from channel_proc.transports.base import SendReceipt, StatusLevel, Transport, TransportLink
from channel_proc.transports.errors import ConnectionFailed, ProviderRejected
from channel_proc.transports.xmpp.bridge import LoopClosedError, open_asyncio_thread
from channel_proc.transports.xmpp.client import (
    ChatReceived,
    ClientSettings,
    Connected,
    Ended,
    NotConnectedError,
    XmppClient,
)
from ipc.payloads import VumiMessage

if TYPE_CHECKING:
    from collections.abc import Iterator

    from channel_proc.transports.xmpp.bridge import AsyncioThread

log = logging.getLogger(__name__)

COMPONENT: Final = "xmpp"
#: Bounded cleanup of one connection (the client itself waits at most CLOSE_WAIT).
CLOSE_TIMEOUT: Final = 3.0
#: Presence "show" values (RFC 6121 4.7.2.1); null means plainly available.
Show = Literal["chat", "away", "xa", "dnd"]


def parse_jid(text: str) -> JID:
    """A JID with a domain, or ValueError."""
    try:
        jid = JID(text)
    except InvalidJID as exc:
        raise ValueError(f"{text!r} is not a valid JID: {exc}") from exc
    if not jid.domain:
        raise ValueError(f"{text!r} is not a valid JID: no domain")
    return jid


class XmppConfig(BaseModel):
    """The `config` of an xmpp channel (vumi XMPPTransport's fields, plus TLS and timing)."""

    # Unknown keys are ignored, as vumi did, so existing channel configs keep working.
    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        json_schema_extra={"anyOf": [{"required": ["jid"]}, {"required": ["username"]}]},
    )

    jid: Annotated[
        str | None, Field(description="The account, e.g. 'bot@example.org' (resource optional)")
    ] = None
    username: Annotated[str | None, Field(description="vumi's name for `jid`")] = None
    password: Annotated[SecretStr, Field(description="The account's password")]
    host: Annotated[
        str | None, Field(description="Server to connect to; default: the JID's domain")
    ] = None
    port: Annotated[int, Field(ge=1, le=65535, description="Server port")] = 5222
    tls: Annotated[
        Literal["starttls", "direct", "none"],
        Field(description="starttls: upgrade (required); direct: TLS from the start; none"),
    ] = "starttls"
    verify_tls: Annotated[
        bool, Field(description="Check the server's certificate against the JID's domain")
    ] = True
    status: Annotated[
        Show | None, Field(description="Presence show: chat, away, xa, dnd or null (available)")
    ] = None
    status_message: Annotated[str | None, Field(description="Presence status text")] = None
    ping_interval: Annotated[
        float, Field(gt=0, description="Seconds between pings; no answer within it = link lost")
    ] = 60.0
    connect_timeout: Annotated[
        float, Field(gt=0, description="Seconds to connect, log in and go online")
    ] = 10.0
    reconnect_delay: Annotated[
        float, Field(gt=0, description="First delay before reconnecting (doubles per failure)")
    ] = 1.0
    reconnect_max_delay: Annotated[
        float, Field(gt=0, description="Cap of the reconnect delay, in seconds")
    ] = 60.0
    transport_type: Annotated[str, Field(description="transport_type of inbound messages")] = "xmpp"

    @model_validator(mode="after")
    def _one_valid_jid(self) -> XmppConfig:
        if self.jid is None and self.username is None:
            raise ValueError("jid (or username) is required")
        if self.jid is not None and self.username is not None and self.jid != self.username:
            raise ValueError("jid and username differ; give one of them")
        parse_jid(self.account)
        return self

    @property
    def account(self) -> str:
        account = self.jid if self.jid is not None else self.username
        assert account is not None
        return account

    @property
    def server_host(self) -> str:
        return self.host or parse_jid(self.account).domain

    def client_settings(self) -> ClientSettings:
        return ClientSettings(
            jid=self.account,
            password=self.password.get_secret_value(),
            host=self.server_host,
            port=self.port,
            tls=self.tls,
            verify_tls=self.verify_tls,
            show=self.status,
            status_message=self.status_message,
            ping_timeout=self.ping_interval,
        )


@dataclass(frozen=True, slots=True)
class _Session:
    """A connection that is up: what `send` needs."""

    loop: AsyncioThread
    client: XmppClient


@dataclass(frozen=True, slots=True)
class _Outcome:
    reason: str
    auth_failed: bool
    was_connected: bool


class _Once:
    """Calls task_status.started() the first time it is called."""

    def __init__(self, task_status: trio.TaskStatus[None]) -> None:
        self._task_status: trio.TaskStatus[None] | None = task_status

    def __call__(self) -> None:
        if self._task_status is not None:
            self._task_status.started()
            self._task_status = None


@contextmanager
def _map_errors(to: str) -> Iterator[None]:
    """The one place send failures become SendErrors."""
    try:
        yield
    except (NotConnectedError, LoopClosedError) as exc:
        raise ConnectionFailed(f"cannot send to {to}: not connected to the XMPP server") from exc


def _quiet_library_logs() -> None:
    # slixmpp's DEBUG lines carry the raw stream, SASL exchange included.
    library = logging.getLogger("slixmpp")
    if library.getEffectiveLevel() < logging.INFO:
        library.setLevel(logging.INFO)


class XmppTransport(Transport[XmppConfig]):
    """An XMPP client account; each chat message is one inbound message."""

    kind = "xmpp"
    config_type = XmppConfig

    def __init__(self, config: XmppConfig, link: TransportLink) -> None:
        super().__init__(config, link)
        self._session: _Session | None = None
        self._address = f"{config.server_host}:{config.port}"
        self._bare_jid = parse_jid(config.account).bare

    @property
    def jid(self) -> str:
        """Our bare JID: the to_addr of inbound messages."""
        return self._bare_jid

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        _quiet_library_logs()
        ready = _Once(task_status)
        backoff = Backoff(initial=self.config.reconnect_delay, cap=self.config.reconnect_max_delay)
        while True:
            outcome = await self._connect_once(ready)
            if outcome.was_connected:
                backoff.reset()
            delay = backoff.next_delay()
            self._report_end(outcome, delay)
            ready()
            await trio.sleep(delay)

    async def send(self, msg: VumiMessage) -> SendReceipt:
        to = msg.to_addr or ""
        try:
            parse_jid(to)
        except ValueError as exc:
            raise ProviderRejected(str(exc), code="invalid_address") from exc
        if msg.content is None:
            # XMPP has no sessions to close and nothing to say: there is no stanza to send.
            return SendReceipt()
        session = self._session
        if session is None:
            raise ConnectionFailed(f"cannot send to {to}: not connected to the XMPP server")
        with _map_errors(to):
            await session.loop.call(session.client.send_message, to, msg.content, msg.message_id)
        log.info("sent message %s to %s (%d chars)", msg.message_id, to, len(msg.content))
        return SendReceipt()

    async def _connect_once(self, ready: _Once) -> _Outcome:
        """One connection from attempt to end, on an asyncio loop of its own."""
        self._status(
            StatusLevel.DOWN,
            "connecting",
            f"Connecting to {self._address} as {self.config.account}",
        )
        log.info("connecting to %s as %s (tls: %s)", self._address, self.jid, self.config.tls)
        async with open_asyncio_thread("xmpp-asyncio") as loop:
            client = XmppClient(self.config.client_settings())
            try:
                first = await self._establish(loop, client)
                if isinstance(first, Ended):
                    return _Outcome(first.reason, first.auth_failed, was_connected=False)
                self._on_connected(first, loop, client)
                ready()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_alive, loop, client)
                    ended = await self._pump(loop, client)
                    nursery.cancel_scope.cancel()
                return _Outcome(ended.reason, ended.auth_failed, was_connected=True)
            finally:
                self._session = None
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await loop.call(client.close)

    async def _establish(self, loop: AsyncioThread, client: XmppClient) -> Connected | Ended:
        timeout = self.config.connect_timeout
        with trio.move_on_after(timeout):
            await loop.call(client.open)
            first = await loop.call(client.next_event)
            # The client holds messages back until it has reported Connected.
            assert isinstance(first, Connected | Ended), first
            return first
        return Ended(f"not online within {timeout:g} s")

    def _on_connected(self, event: Connected, loop: AsyncioThread, client: XmppClient) -> None:
        self._session = _Session(loop, client)
        log.info("connected to %s as %s", self._address, event.jid)
        self._status(
            StatusLevel.OK,
            "connected",
            f"Connected to {self._address} as {event.jid}",
            {"bound_jid": event.jid, "encrypted": event.encrypted},
        )

    async def _pump(self, loop: AsyncioThread, client: XmppClient) -> Ended:
        while True:
            event = await loop.call(client.next_event)
            if isinstance(event, Ended):
                return event
            if isinstance(event, ChatReceived):
                await self._inbound(event)

    async def _inbound(self, chat: ChatReceived) -> None:
        sender = parse_jid(chat.sender).bare
        msg = VumiMessage(
            to_addr=self._bare_jid,
            from_addr=sender,
            content=chat.body,
            transport_type=self.config.transport_type,
        )
        await self.link.inbound(msg)
        log.info("received message %s from %s (%d chars)", msg.message_id, sender, len(chat.body))

    async def _keep_alive(self, loop: AsyncioThread, client: XmppClient) -> None:
        """Ping the server every ping_interval; the client ends the connection when a ping
        goes unanswered, which the pump then sees as Ended."""
        while True:
            await trio.sleep(self.config.ping_interval)
            if not await loop.call(client.ping):
                return

    def _report_end(self, outcome: _Outcome, delay: float) -> None:
        retry = f"retrying in {delay:.1f} s"
        details = {"reason": outcome.reason, "retry_in": round(delay, 3)}
        if outcome.auth_failed:
            log.error("login as %s failed: %s; %s", self.jid, outcome.reason, retry)
            message = f"Login as {self.config.account} failed: {outcome.reason}; {retry}"
            self._status(StatusLevel.DOWN, "auth_failed", message, details)
            return
        verb = "Disconnected from" if outcome.was_connected else "Cannot connect to"
        log.warning("%s %s: %s; %s", verb.lower(), self._address, outcome.reason, retry)
        message = f"{verb} {self._address}: {outcome.reason}; {retry}"
        self._status(StatusLevel.DOWN, "disconnected", message, details)

    def _status(
        self, level: StatusLevel, type_: str, message: str, details: dict[str, object] | None = None
    ) -> None:
        base: dict[str, object] = {
            "host": self.config.server_host,
            "port": self.config.port,
            "jid": self.jid,
            "tls": self.config.tls,
        }
        self.link.status(COMPONENT, level, type_, message, {**base, **(details or {})})
