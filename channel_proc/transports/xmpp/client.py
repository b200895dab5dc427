"""The asyncio side of the xmpp transport: one slixmpp client for one connection, turned into
an ordered queue of plain events (Connected, ChatReceived, Ended) that trio pulls.

Everything here runs on the bridge's asyncio loop; nothing here knows about trio.
"""

from __future__ import annotations

# slixmpp is asyncio-only; this module runs on the bridge's private loop (see bridge.py).
import asyncio  # noqa: TID251
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.stanza import StreamFeatures

if TYPE_CHECKING:
    from slixmpp.stanza import Message

log = logging.getLogger(__name__)

TlsMode = Literal["starttls", "direct", "none"]
MessageType = Literal["chat", "normal", "headline", "groupchat"]

#: Reading from the server pauses while this many messages wait for trio, and resumes at
#: LOW_WATER: the broker's pace reaches the server through TCP.
HIGH_WATER: Final = 16
LOW_WATER: Final = 4
#: How long `close` waits for the server to close its stream before dropping the connection.
CLOSE_WAIT: Final = 1.0
#: Message types that carry a person's text (RFC 6121 5.2.2); groupchat and headline do not.
CHAT_TYPES: Final = frozenset({"chat", "normal"})


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What one connection needs, as plain values."""

    jid: str
    password: str = field(repr=False)
    host: str
    port: int
    tls: TlsMode
    verify_tls: bool
    show: str | None
    status_message: str | None
    #: How long the server may take to answer a ping.
    ping_timeout: float


@dataclass(frozen=True, slots=True)
class Connected:
    """Logged in, bound, presence sent and acknowledged: messages can flow."""

    jid: str
    encrypted: bool


@dataclass(frozen=True, slots=True)
class ChatReceived:
    #: The full JID of who wrote.
    sender: str
    body: str
    stanza_id: str | None


@dataclass(frozen=True, slots=True)
class Ended:
    """The connection is over (or never came up). Always the last event of a client."""

    reason: str
    auth_failed: bool = False


XmppEvent = Connected | ChatReceived | Ended


class NotConnectedError(Exception):
    """No session to send on."""


class XmppClient:
    """One connection to the server. Create, `open`, pull `next_event` until Ended, `close`."""

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._events: asyncio.Queue[XmppEvent] = asyncio.Queue()
        self._client: slixmpp.ClientXMPP | None = None
        self._connected = False
        self._ended = False
        self._paused = False
        #: Messages that arrive before Connected is reported (offline messages follow the
        #: initial presence at once); they are queued right after it.
        self._early: list[ChatReceived] = []
        self._auth_failure: str | None = None
        self._stream_error: str | None = None

    async def open(self) -> None:
        """Start connecting; the outcome arrives as Connected or Ended."""
        s = self._settings
        client = slixmpp.ClientXMPP(
            s.jid,
            s.password,
            # SCRAM never sends the password, so it may run without TLS; PLAIN may not.
            plugin_config={"feature_mechanisms": {"unencrypted_scram": s.tls == "none"}},
        )
        client.register_plugin("xep_0199")
        client.enable_direct_tls = s.tls == "direct"
        client.enable_starttls = s.tls == "starttls"
        client.enable_plaintext = s.tls == "none"
        if not s.verify_tls:
            client.ssl_context.check_hostname = False
            client.ssl_context.verify_mode = ssl.CERT_NONE
        client.add_filter("in", self._check_features)
        client.add_event_handler("session_start", self._on_session_start)
        client.add_event_handler("message", self._on_message)
        client.add_event_handler("connection_failed", self._on_connection_failed)
        client.add_event_handler("failed_auth", self._on_failed_auth)
        client.add_event_handler("failed_all_auth", self._on_failed_all_auth)
        client.add_event_handler("stream_error", self._on_stream_error)
        client.add_event_handler("ssl_invalid_chain", self._on_tls_failed)
        client.add_event_handler("disconnected", self._on_disconnected)
        self._client = client
        client.connect(s.host, s.port)

    async def next_event(self) -> XmppEvent:
        event = await self._events.get()
        if self._paused and self._events.qsize() <= LOW_WATER:
            self._set_reading(paused=False)
        return event

    async def send_message(
        self, to: str, body: str, stanza_id: str, message_type: MessageType = "chat"
    ) -> None:
        """Queue one message on the connection (the transport sends only chat).

        Raises:
            NotConnectedError: there is no session.
        """
        client = self._client
        if client is None or not self._connected or self._ended or client.transport is None:
            raise NotConnectedError("not connected to the XMPP server")
        message = client.make_message(mto=to, mbody=body, mtype=message_type)
        message["id"] = stanza_id
        message.send()

    async def ping(self, jid: str | None = None) -> bool:
        """Ping our server (or `jid`); True when it answered within ping_timeout (an error reply
        is an answer). Our server not answering ends the connection."""
        client = self._client
        if client is None or self._ended:
            return False
        timeout = self._settings.ping_timeout
        target = slixmpp.JID(jid) if jid is not None else None
        try:
            await client.plugin["xep_0199"].ping(jid=target, timeout=timeout)
        except IqError:
            return True
        except IqTimeout:
            if jid is None:
                self._end(f"no answer to a ping within {timeout:g} s")
                client.abort()
            return False
        return True

    async def close(self) -> None:
        """End the stream politely, bounded by CLOSE_WAIT, and forget further events."""
        client = self._client
        self._end("closed by us")
        if client is None:
            return
        client.cancel_connection_attempt()
        if client.transport is not None:
            await client.disconnect(wait=CLOSE_WAIT, reason="channel stopping")

    # --- slixmpp callbacks ---------------------------------------------------------------

    def _end(self, reason: str, *, auth_failed: bool = False) -> None:
        if not self._ended:
            self._ended = True
            self._connected = False
            self._events.put_nowait(Ended(reason, auth_failed))

    def _encrypted(self) -> bool:
        transport = self._client.transport if self._client is not None else None
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    def _check_features(self, stanza: Any) -> Any:
        """Refuse to log in without TLS when it is configured, and explain a server that will
        not let us log in without it."""
        client = self._client
        if not isinstance(stanza, StreamFeatures) or client is None or client.authenticated:
            return stanza
        if self._encrypted():
            return stanza
        offered = set(stanza["features"])
        reason = None
        if self._settings.tls == "starttls" and "starttls" not in offered:
            reason = "the server does not offer STARTTLS"
        elif self._settings.tls == "none" and "mechanisms" not in offered:
            reason = "the server requires TLS before login (set tls to starttls or direct)"
        if reason is None:
            return stanza
        self._end(reason)
        client.abort()
        return None

    async def _on_session_start(self, _: object) -> None:
        client = self._client
        assert client is not None
        client.send_presence(pshow=self._settings.show, pstatus=self._settings.status_message)
        # The server handles a connection's stanzas in order: once it answers this ping it has
        # seen our presence, so messages to our bare JID reach us from now on.
        try:
            await client.plugin["xep_0199"].ping(timeout=self._settings.ping_timeout)
        except IqTimeout:
            self._end("the server did not answer after login")
            client.abort()
            return
        except IqError:
            pass  # an error reply is an answer too
        if not self._ended:
            self._connected = True
            self._events.put_nowait(Connected(str(client.boundjid), self._encrypted()))
            for early in self._early:
                self._events.put_nowait(early)
            self._early.clear()

    def _on_message(self, message: Message) -> None:
        kind = message["type"]
        if kind == "error":
            error = message["error"]
            log.warning(
                "message %s to %s bounced: %s",
                message["id"],
                message["from"],
                error["condition"] or "error",
            )
            return
        body = message["body"]
        if kind not in CHAT_TYPES or not body or self._ended:
            return
        chat = ChatReceived(str(message["from"]), body, message["id"] or None)
        if self._connected:
            self._events.put_nowait(chat)
        else:
            self._early.append(chat)
        if not self._paused and self._events.qsize() + len(self._early) >= HIGH_WATER:
            self._set_reading(paused=True)

    def _set_reading(self, *, paused: bool) -> None:
        transport = self._client.transport if self._client is not None else None
        if transport is None:
            return
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()
        self._paused = paused

    def _on_connection_failed(self, error: object) -> None:
        self._end(describe_error(error))
        if self._client is not None:
            # slixmpp would retry on its own schedule; the trio side owns the backoff.
            self._client.cancel_connection_attempt()

    def _on_failed_auth(self, failure: Any) -> None:
        condition = failure["condition"] or "not-authorized"
        text = failure["text"].rstrip(".")
        self._auth_failure = f"{condition}: {text}" if text else condition

    def _on_failed_all_auth(self, _: object) -> None:
        reason = self._auth_failure or "the server offers no login mechanism we can use"
        self._end(reason, auth_failed=True)

    def _on_stream_error(self, error: Any) -> None:
        condition = error["condition"] or "undefined-condition"
        text = error["text"]
        self._stream_error = f"stream error {condition}" + (f": {text}" if text else "")

    def _on_tls_failed(self, error: object) -> None:
        self._end(f"TLS failed: {describe_error(error)}")
        if self._client is not None:
            self._client.abort()

    def _on_disconnected(self, reason: object) -> None:
        self._end(self._stream_error or describe_error(reason) or "connection closed")


def describe_error(error: object) -> str:
    """A short human text for what slixmpp hands its failure events."""
    if isinstance(error, OSError) and not isinstance(error, ssl.SSLError) and error.errno:
        # asyncio's "Connect call failed (...)" hides the reason the errno gives.
        return os.strerror(error.errno)
    if isinstance(error, BaseException):
        return str(error) or type(error).__name__
    if isinstance(error, str):
        return error
    return ""
