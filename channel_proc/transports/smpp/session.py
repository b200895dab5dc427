"""One ESME session as a state machine (sans-IO): bytes in, events and bytes out.

The session numbers our requests, matches responses to them, answers what needs no
decision (enquire_link, unbind, unknown commands) and refuses requests that do not
belong to its state. It never touches a socket or a clock; `bind.py` drives it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Final

from channel_proc.transports.smpp.pdu import (
    MAX_SEQUENCE,
    STATUS_CODES,
    Pdu,
    PduError,
    PduReader,
    decode,
    encode,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

log = logging.getLogger(__name__)

ESME_RINVCMDID: Final = STATUS_CODES["ESME_RINVCMDID"]
ESME_RINVBNDSTS: Final = STATUS_CODES["ESME_RINVBNDSTS"]
ESME_RSYSERR: Final = STATUS_CODES["ESME_RSYSERR"]

#: Requests an SMSC may send us that the application answers itself.
APPLICATION_REQUESTS: Final = frozenset({"deliver_sm", "data_sm"})


class BindMode(StrEnum):
    TRANSCEIVER = "bind_transceiver"
    TRANSMITTER = "bind_transmitter"
    RECEIVER = "bind_receiver"

    @property
    def sends(self) -> bool:
        return self is not BindMode.RECEIVER

    @property
    def receives(self) -> bool:
        return self is not BindMode.TRANSMITTER


class SessionState(Enum):
    OPEN = "open"
    BINDING = "binding"
    BOUND = "bound"
    UNBINDING = "unbinding"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A request to write: its PDU (for logs and matching) and its bytes."""

    pdu: Pdu
    data: bytes


@dataclass(frozen=True, slots=True)
class Answered:
    """The peer answered our request `request` (a generic_nack counts as an answer)."""

    pdu: Pdu
    request: str


@dataclass(frozen=True, slots=True)
class Requested:
    """The peer sent a request the application must answer (with `Session.respond`)."""

    pdu: Pdu


@dataclass(frozen=True, slots=True)
class Replied:
    """The session answered a request by itself; write `data` now."""

    request: Pdu | None
    reply: Pdu
    data: bytes


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A request we could not decode; the application decides the error status to answer."""

    error: PduError


@dataclass(frozen=True, slots=True)
class PeerUnbound:
    """The peer unbound (its unbind was answered) or answered our unbind: the session is over."""


Event = Answered | Requested | Replied | Unreadable | PeerUnbound


@dataclass(slots=True)
class Session:
    mode: BindMode
    state: SessionState = SessionState.OPEN
    _last_sequence: int = 0
    _outstanding: dict[int, str] = field(default_factory=dict)
    _reader: PduReader = field(default_factory=PduReader)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    @property
    def buffered(self) -> int:
        """Bytes of a PDU begun but not yet complete."""
        return self._reader.buffered

    def next_sequence(self) -> int:
        self._last_sequence = self._last_sequence % MAX_SEQUENCE + 1
        return self._last_sequence

    def bind(self, params: Mapping[str, object]) -> Outgoing:
        if self.state is not SessionState.OPEN:
            raise RuntimeError(f"cannot bind in state {self.state.value}")
        self.state = SessionState.BINDING
        return self._request(self.mode.value, params)

    def request(self, command: str, params: Mapping[str, object] | None = None) -> Outgoing:
        """A request in the bound state (enquire_link is allowed while binding too).

        Raises:
            RuntimeError: not bound.
            ValueError: parameters this command cannot carry.
        """
        allowed = (SessionState.BOUND, SessionState.BINDING)
        if self.state is not SessionState.BOUND and not (
            command == "enquire_link" and self.state in allowed
        ):
            raise RuntimeError(f"cannot send {command} in state {self.state.value}")
        if command == "unbind":
            self.state = SessionState.UNBINDING
        return self._request(command, params or {})

    def _request(self, command: str, params: Mapping[str, object]) -> Outgoing:
        pdu = Pdu(command, self.next_sequence(), params=params)
        data = encode(pdu)
        self._outstanding[pdu.sequence] = command
        return Outgoing(pdu, data)

    def forget(self, sequence: int) -> None:
        """Stop waiting for the answer to `sequence` (it timed out)."""
        self._outstanding.pop(sequence, None)

    def respond(
        self, request: Pdu | PduError, status: int = 0, params: Mapping[str, object] | None = None
    ) -> tuple[Pdu, bytes]:
        """The response to a peer's request (a decoded PDU, or one that did not decode)."""
        command = request.command
        if command is None or command.endswith("_resp") or command == "generic_nack":
            reply = Pdu("generic_nack", request.sequence, status or ESME_RSYSERR)
            return reply, encode(reply)
        reply = Pdu(f"{command}_resp", request.sequence, status, params or {})
        try:
            return reply, encode(reply)
        except ValueError:
            # A response we cannot build must still be answered, never crash the bind.
            reply = Pdu("generic_nack", request.sequence, status or ESME_RSYSERR)
            return reply, encode(reply)

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes from the peer.

        Raises:
            FramingError: the stream cannot be read any more; close the connection.
        """
        events: list[Event] = []
        for frame in self._reader.feed(data):
            try:
                pdu = decode(frame)
            except PduError as exc:
                events.append(self._unreadable(exc))
                continue
            self._receive(pdu, events)
        return events

    def _unreadable(self, exc: PduError) -> Event:
        command = exc.command
        if command is None:
            reply = Pdu("generic_nack", exc.sequence, ESME_RINVCMDID)
            return Replied(None, reply, encode(reply))
        if command.endswith("_resp") or command == "generic_nack":
            request = self._outstanding.pop(exc.sequence, None)
            failed = Pdu(command, exc.sequence, ESME_RSYSERR)
            if request is None:
                log.warning("unreadable %s seq=%d ignored: %s", command, exc.sequence, exc.reason)
            return Answered(failed, request or command.removesuffix("_resp"))
        return Unreadable(exc)

    def _receive(self, pdu: Pdu, events: list[Event]) -> None:
        if pdu.is_response or pdu.command == "generic_nack":
            request = self._outstanding.pop(pdu.sequence, None)
            if request is None:
                log.warning("%s answers no request of ours; ignored", pdu.summary())
                return
            if request == self.mode.value:
                self.state = SessionState.BOUND if pdu.ok else SessionState.OPEN
            elif request == "unbind":
                self.state = SessionState.CLOSED
            events.append(Answered(pdu, request))
            if request == "unbind":
                events.append(PeerUnbound())
            return
        if pdu.command == "enquire_link":
            reply, data = self.respond(pdu)
            events.append(Replied(pdu, reply, data))
        elif pdu.command == "unbind":
            reply, data = self.respond(pdu)
            self.state = SessionState.CLOSED
            events.extend((Replied(pdu, reply, data), PeerUnbound()))
        elif pdu.command == "alert_notification":
            # The one request without a response in SMPP 3.4; nothing here uses it.
            log.info("ignored %s", pdu.summary())
        elif pdu.command in APPLICATION_REQUESTS:
            if self.state is not SessionState.BOUND or not self.mode.receives:
                reply, data = self.respond(pdu, ESME_RINVBNDSTS)
                events.append(Replied(pdu, reply, data))
            else:
                events.append(Requested(pdu))
        else:
            reply, data = self.respond(pdu, ESME_RINVCMDID)
            events.append(Replied(pdu, reply, data))
