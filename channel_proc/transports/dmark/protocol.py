"""Dmark USSD without I/O: request fields, session bookkeeping and response bodies.

Time is always passed in, so everything here is deterministic and tested without sockets.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl

from ipc.payloads import SessionEvent, VumiMessage

#: The query or form fields of every Dmark request (vumi's DmarkUssdTransport).
EXPECTED_FIELDS: Final = (
    "transactionId",
    "msisdn",
    "ussdServiceCode",
    "transactionTime",
    "ussdRequestString",
    "creationTime",
    "response",
)
FORM_TYPE: Final = "application/x-www-form-urlencoded"
#: Bounds on in-memory bookkeeping, so a flood of transactions cannot grow memory without end.
MAX_SESSIONS: Final = 100_000
MAX_REMEMBERED: Final = 10_000


@dataclass(frozen=True, slots=True)
class DmarkRequest:
    """The fields of one Dmark call."""

    transaction_id: str
    msisdn: str
    service_code: str
    request_string: str
    transaction_time: str
    creation_time: str


def parse_fields(query: str, content_type: str, body: bytes) -> DmarkRequest | list[str]:
    """The request from the query string and (form POST) body, or the missing field names.

    A field given twice keeps its first value; the query wins over the body.
    """
    pairs = parse_qsl(query, keep_blank_values=True)
    if content_type.split(";", 1)[0].strip().lower() == FORM_TYPE:
        pairs += parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    values: dict[str, str] = {}
    for key, value in pairs:
        values.setdefault(key, value)
    missing = [name for name in EXPECTED_FIELDS if name not in values]
    if missing:
        return missing
    return DmarkRequest(
        transaction_id=values["transactionId"],
        msisdn=values["msisdn"],
        service_code=values["ussdServiceCode"],
        request_string=values["ussdRequestString"],
        transaction_time=values["transactionTime"],
        creation_time=values["creationTime"],
    )


def wrap_service_code(code: str) -> str:
    """`fix_to_addr`: '123' -> '*123#' (a code already wrapped is left alone)."""
    return f"{'' if code.startswith('*') else '*'}{code}{'' if code.endswith('#') else '#'}"


def ends_session(reply: VumiMessage) -> bool:
    """A reply that closes the session (session_event close, or continue_session false)."""
    return reply.session_event == SessionEvent.CLOSE or (
        getattr(reply, "continue_session", None) is False
    )


def response_body(reply: VumiMessage) -> bytes:
    """The JSON Dmark expects: the text, and whether the user may answer."""
    action = "end" if ends_session(reply) else "request"
    return json.dumps({"responseString": reply.content or "", "action": action}).encode()


def apology_body(text: str) -> bytes:
    """The answer when the application did not reply in time: it ends the session."""
    return json.dumps({"responseString": text, "action": "end"}).encode()


def missing_fields_body(missing: list[str]) -> bytes:
    """vumi's 400 body: the names of the fields that were not given."""
    return json.dumps({"missing_parameter": missing}).encode()


@dataclass(slots=True)
class UssdSessions:
    """Open USSD sessions by transaction id; a session lives `timeout` seconds after its
    last request."""

    timeout: float
    max_sessions: int = MAX_SESSIONS
    _expiry: OrderedDict[str, float] = field(default_factory=OrderedDict)

    def touch(self, transaction_id: str, now: float) -> SessionEvent:
        """NEW for an unknown (or expired) transaction, else RESUME; either way it is kept
        alive for another `timeout`."""
        self._expire(now)
        event = SessionEvent.RESUME if transaction_id in self._expiry else SessionEvent.NEW
        self._expiry[transaction_id] = now + self.timeout
        self._expiry.move_to_end(transaction_id)
        while len(self._expiry) > self.max_sessions:
            self._expiry.popitem(last=False)
        return event

    def close(self, transaction_id: str) -> None:
        self._expiry.pop(transaction_id, None)

    def __len__(self) -> int:
        return len(self._expiry)

    def _expire(self, now: float) -> None:
        # Entries are in last-touched order and share one timeout, so expiry is in order too.
        while self._expiry:
            transaction_id, expires = next(iter(self._expiry.items()))
            if expires > now:
                return
            del self._expiry[transaction_id]


@dataclass(frozen=True, slots=True)
class Closed:
    """Why a held request can no longer be answered (the reason a late reply is rejected)."""

    reason: str
    code: str


TIMED_OUT: Final = Closed("timeout", "timeout")
CLIENT_GONE: Final = Closed("client disconnected", "client_disconnected")
ANSWERED: Final = Closed("the request was already answered", "duplicate_reply")
STOPPED: Final = Closed("the channel stopped before the reply was sent", "request_closed")


@dataclass(slots=True)
class ClosedRequests:
    """Recently closed requests by message id, remembered for `keep_for` seconds."""

    keep_for: float
    max_entries: int = MAX_REMEMBERED
    _entries: OrderedDict[str, tuple[float, Closed]] = field(default_factory=OrderedDict)

    def add(self, message_id: str, closed: Closed, now: float) -> None:
        self._entries[message_id] = (now + self.keep_for, closed)
        self._entries.move_to_end(message_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, message_id: str, now: float) -> Closed | None:
        while self._entries:
            oldest, (expires, _) = next(iter(self._entries.items()))
            if expires > now:
                break
            del self._entries[oldest]
        entry = self._entries.get(message_id)
        return entry[1] if entry is not None else None
