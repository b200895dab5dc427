"""Table-driven tests of the dmark channel type: the sans-IO core, then real HTTP requests."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx
import pytest
import trio
from pydantic import ValidationError

from channel_proc.transports.base import StatusLevel
from channel_proc.transports.dmark import DmarkConfig, DmarkTransport
from channel_proc.transports.dmark.http import MAX_BODY_BYTES, normalise_path
from channel_proc.transports.dmark.protocol import (
    EXPECTED_FIELDS,
    TIMED_OUT,
    ClosedRequests,
    DmarkRequest,
    UssdSessions,
    parse_fields,
    response_body,
    wrap_service_code,
)
from channel_proc.transports.errors import ProviderRejected
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

LOCAL = {"web_path": "/dmark", "web_interface": "127.0.0.1"}


def dmark_fields(**overrides: str) -> dict[str, str]:
    """What Dmark sends (vumi's test values), with some fields replaced."""
    fields = {
        "transactionId": "tx-1",
        "msisdn": "+256776123456",
        "ussdServiceCode": "*180#",
        "transactionTime": "1389971940",
        "ussdRequestString": "*180#",
        "creationTime": "1389971950",
        "response": "false",
    }
    fields.update(overrides)
    return fields


def query(**overrides: str) -> bytes:
    return urlencode(dmark_fields(**overrides)).encode()


# --- sans-IO: fields ---------------------------------------------------------------------------

EXPECTED_REQUEST = DmarkRequest(
    transaction_id="tx-1",
    msisdn="+256776123456",
    service_code="*180#",
    request_string="*180#",
    transaction_time="1389971940",
    creation_time="1389971950",
)
FORM = "application/x-www-form-urlencoded"
FIELD_CASES: list[tuple[str, str, str, bytes, DmarkRequest | list[str]]] = [
    ("GET query", query().decode(), "", b"", EXPECTED_REQUEST),
    ("form POST", "", FORM, query(), EXPECTED_REQUEST),
    ("form POST with charset", "", f"{FORM}; charset=UTF-8", query(), EXPECTED_REQUEST),
    ("query wins over body", query().decode(), FORM, query(msisdn="other"), EXPECTED_REQUEST),
    ("first of repeated fields", query().decode() + "&msisdn=x", "", b"", EXPECTED_REQUEST),
    ("json body is not read", "", "application/json", query(), list(EXPECTED_FIELDS)),
    ("nothing", "", "", b"", list(EXPECTED_FIELDS)),
    (
        "some missing",
        urlencode({"transactionId": "1", "msisdn": "2", "response": "false"}),
        "",
        b"",
        ["ussdServiceCode", "transactionTime", "ussdRequestString", "creationTime"],
    ),
    (
        "blank values count as given",
        query(ussdRequestString="").decode(),
        "",
        b"",
        DmarkRequest("tx-1", "+256776123456", "*180#", "", "1389971940", "1389971950"),
    ),
    (
        "percent-encoded utf-8",
        query(ussdRequestString="caf\u00e9 1").decode(),
        "",
        b"",
        DmarkRequest("tx-1", "+256776123456", "*180#", "caf\u00e9 1", "1389971940", "1389971950"),
    ),
]


@pytest.mark.parametrize(
    ("label", "query_string", "content_type", "body", "expected"),
    FIELD_CASES,
    ids=[c[0] for c in FIELD_CASES],
)
def test_parse_fields(
    label: str,
    query_string: str,
    content_type: str,
    body: bytes,
    expected: DmarkRequest | list[str],
) -> None:
    assert parse_fields(query_string, content_type, body) == expected


@pytest.mark.parametrize(
    ("code", "fixed"),
    [("180", "*180#"), ("*180#", "*180#"), ("*180", "*180#"), ("180#", "*180#"), ("1*2", "*1*2#")],
)
def test_wrap_service_code(code: str, fixed: str) -> None:
    assert wrap_service_code(code) == fixed


@pytest.mark.parametrize(
    ("path", "normal"), [("/dmark", "/dmark"), ("dmark/", "/dmark"), ("/a/b/", "/a/b"), ("/", "/")]
)
def test_normalise_path(path: str, normal: str) -> None:
    assert normalise_path(path) == normal


RESPONSE_CASES: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    ("reply", {"content": "Menu"}, {"responseString": "Menu", "action": "request"}),
    (
        "close",
        {"content": "Bye", "session_event": "close"},
        {"responseString": "Bye", "action": "end"},
    ),
    (
        "continue_session false",
        {"content": "Bye", "continue_session": False},
        {"responseString": "Bye", "action": "end"},
    ),
    (
        "continue_session true",
        {"content": "Hi", "continue_session": True},
        {"responseString": "Hi", "action": "request"},
    ),
    ("no content", {"session_event": "close"}, {"responseString": "", "action": "end"}),
]


@pytest.mark.parametrize(
    ("label", "message", "expected"), RESPONSE_CASES, ids=[c[0] for c in RESPONSE_CASES]
)
def test_response_body(label: str, message: dict[str, Any], expected: dict[str, str]) -> None:
    assert json.loads(response_body(VumiMessage.model_validate(message))) == expected


# --- sans-IO: sessions and closed requests ----------------------------------------------------


def test_sessions_new_then_resume_then_expire() -> None:
    sessions = UssdSessions(timeout=10)
    assert sessions.touch("a", now=0) == SessionEvent.NEW
    assert sessions.touch("a", now=9) == SessionEvent.RESUME
    # Each request extends the session: 9 + 10 > 18.
    assert sessions.touch("a", now=18) == SessionEvent.RESUME
    assert sessions.touch("a", now=28) == SessionEvent.NEW


def test_sessions_close_and_independence() -> None:
    sessions = UssdSessions(timeout=10)
    sessions.touch("a", now=0)
    sessions.touch("b", now=0)
    sessions.close("a")
    sessions.close("missing")
    assert sessions.touch("a", now=1) == SessionEvent.NEW
    assert sessions.touch("b", now=1) == SessionEvent.RESUME


def test_sessions_expired_entries_are_dropped_and_size_is_capped() -> None:
    sessions = UssdSessions(timeout=10, max_sessions=3)
    for index in range(5):
        sessions.touch(str(index), now=index)
    assert len(sessions) == 3
    assert sessions.touch("0", now=5) == SessionEvent.NEW
    sessions.touch("late", now=100)
    assert len(sessions) == 1


def test_closed_requests_remember_for_a_while_and_are_capped() -> None:
    closed = ClosedRequests(keep_for=10, max_entries=2)
    closed.add("a", TIMED_OUT, now=0)
    assert closed.get("a", now=9) is TIMED_OUT
    assert closed.get("a", now=10) is None
    closed.add("b", TIMED_OUT, now=20)
    closed.add("c", TIMED_OUT, now=20)
    closed.add("d", TIMED_OUT, now=20)
    assert [closed.get(key, now=21) for key in "bcd"] == [None, TIMED_OUT, TIMED_OUT]


# --- config ----------------------------------------------------------------------------------


def test_config_defaults_and_ignores_unknown_keys() -> None:
    config = DmarkConfig.model_validate({"web_path": "/dmark", "redis_manager": {}})
    assert config.web_port == 0
    assert config.web_interface == "0.0.0.0"
    assert config.ussd_session_timeout == 600
    assert config.fix_to_addr is False
    assert config.reply_timeout == 10.0
    assert config.response_time_degraded <= config.response_time_down


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"web_path": "/a?b"},
        {"web_path": "/a b"},
        {"web_path": "/a", "web_port": 70000},
        {"web_path": "/a", "reply_timeout": 0},
        {"web_path": "/a", "ussd_session_timeout": 0},
        {"web_path": "/a", "response_time_degraded": 5, "response_time_down": 1},
        {"web_path": "/health/"},
    ],
)
def test_config_invalid(config: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DmarkConfig.model_validate(config)


# --- over HTTP -------------------------------------------------------------------------------


@asynccontextmanager
async def local_dmark(
    config: Mapping[str, object] | None = None,
) -> AsyncIterator[tuple[DmarkTransport, MemoryLink, httpx.AsyncClient]]:
    async with running_transport(DmarkTransport, {**LOCAL, **(config or {})}) as (transport, link):
        assert isinstance(transport, DmarkTransport)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{transport.port}", timeout=READ_TIMEOUT
        ) as client:
            yield transport, link, client


class Call:
    """One Dmark request in the background; `response` is set when it is answered."""

    def __init__(self) -> None:
        self.response: httpx.Response | None = None
        self.done = trio.Event()

    async def wait(self) -> httpx.Response:
        with trio.fail_after(READ_TIMEOUT):
            await self.done.wait()
        assert self.response is not None
        return self.response


def start_call(
    nursery: trio.Nursery,
    client: httpx.AsyncClient,
    params: bytes,
    *,
    method: str = "GET",
    path: str = "/dmark",
) -> Call:
    call = Call()

    async def run() -> None:
        if method == "GET":
            call.response = await client.get(f"{path}?{params.decode()}")
        else:
            call.response = await client.request(
                method, path, content=params, headers={"content-type": FORM}
            )
        call.done.set()

    nursery.start_soon(run)
    return call


def reply_to(inbound: VumiMessage, **fields: Any) -> VumiMessage:
    return VumiMessage.model_validate(
        {
            "to_addr": inbound.from_addr,
            "from_addr": inbound.to_addr,
            "in_reply_to": inbound.message_id,
            "transport_metadata": inbound.transport_metadata,
            **fields,
        }
    )


NEW: dict[str, object] = {
    "session_event": "new",
    "content": None,
    "from_addr": "+256776123456",
    "to_addr": "*180#",
    "provider": "dmark",
    "transport_type": "ussd",
    "transport_metadata": {
        "dmark_ussd": {
            "transaction_id": "tx-1",
            "transaction_time": "1389971940",
            "creation_time": "1389971950",
        }
    },
}


def resume(text: str) -> dict[str, object]:
    return {"session_event": "resume", "content": text, "from_addr": "+256776123456"}


INBOUND_CASES = [
    InboundCase(label="new session", provider_input=(query(),), expected=(NEW,)),
    InboundCase(
        label="same transaction resumes",
        provider_input=(query(), query(ussdRequestString="1", response="true")),
        expected=(NEW, resume("1")),
    ),
    InboundCase(
        label="another transaction is another session",
        provider_input=(query(), query(transactionId="tx-2", msisdn="+2")),
        expected=(NEW, {"session_event": "new", "from_addr": "+2", "content": None}),
    ),
    InboundCase(
        label="fix_to_addr",
        config={"fix_to_addr": True},
        provider_input=(query(ussdServiceCode="180"),),
        expected=({"to_addr": "*180#"},),
    ),
    InboundCase(
        label="service code kept as given",
        provider_input=(query(ussdServiceCode="180"),),
        expected=({"to_addr": "180"},),
    ),
]


@pytest.mark.parametrize("case", INBOUND_CASES, ids=lambda c: c.label)
async def test_dmark_inbound(case: InboundCase) -> None:
    received = []
    async with local_dmark(case.config) as (transport, link, client):
        for params in case.provider_input:
            async with trio.open_nursery() as nursery:
                call = start_call(nursery, client, params)
                inbound = await link.next_inbound()
                await transport.send(reply_to(inbound, content="ok"))
                assert (await call.wait()).status_code == 200
            received.append(inbound)
    for msg, expected in zip(received, case.expected, strict=True):
        assert_fields(msg, expected)


async def test_dmark_form_post_is_accepted() -> None:
    async with local_dmark() as (transport, link, client), trio.open_nursery() as nursery:
        call = start_call(nursery, client, query(ussdRequestString="x"), method="POST")
        inbound = await link.next_inbound()
        await transport.send(reply_to(inbound, content="ok"))
        assert (await call.wait()).json() == {"responseString": "ok", "action": "request"}
    assert_fields(inbound, NEW)


OUTBOUND_CASES = [
    OutboundCase(
        label="reply keeps the session open",
        message={"content": "1. Balance\n2. Exit"},
        provider_output=b'{"responseString": "1. Balance\\n2. Exit", "action": "request"}',
    ),
    OutboundCase(
        label="close ends it",
        message={"content": "Bye", "session_event": "close"},
        provider_output=b'{"responseString": "Bye", "action": "end"}',
    ),
    OutboundCase(
        label="continue_session false ends it",
        message={"content": "Bye", "continue_session": False},
        provider_output=b'{"responseString": "Bye", "action": "end"}',
    ),
    OutboundCase(
        label="unicode",
        message={"content": "Merci \u2713"},
        provider_output=b'{"responseString": "Merci \\u2713", "action": "request"}',
    ),
    OutboundCase(
        label="not a reply",
        message={"content": "x", "in_reply_to": None},
        error=ProviderRejected,
    ),
    OutboundCase(
        label="reply to an unknown request",
        message={"content": "x", "in_reply_to": "0" * 32},
        error=ProviderRejected,
    ),
]


@pytest.mark.parametrize("case", OUTBOUND_CASES, ids=lambda c: c.label)
async def test_dmark_outbound(case: OutboundCase) -> None:
    async with local_dmark(case.config) as (transport, link, client), trio.open_nursery() as n:
        call = start_call(n, client, query())
        inbound = await link.next_inbound()
        msg = reply_to(inbound, **case.message)
        if case.error is not None:
            with pytest.raises(case.error):
                await transport.send(msg)
            # The held request is still waiting and can be answered.
            await transport.send(reply_to(inbound, content="late but fine"))
            assert (await call.wait()).json()["responseString"] == "late but fine"
            return
        receipt = await transport.send(msg)
        response = await call.wait()
    assert receipt.provider_message_id is None
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.content == case.provider_output


async def test_dmark_end_closes_the_session() -> None:
    events = []
    async with local_dmark() as (transport, link, client):
        for _ in range(2):
            async with trio.open_nursery() as nursery:
                call = start_call(nursery, client, query())
                inbound = await link.next_inbound()
                await transport.send(reply_to(inbound, content="bye", session_event="close"))
                await call.wait()
            events.append(inbound.session_event)
    assert events == [SessionEvent.NEW, SessionEvent.NEW]


async def test_dmark_missing_fields_get_400_and_a_request_status() -> None:
    async with local_dmark() as (transport, link, client):
        response = await client.get("/dmark", params={"msisdn": "1", "transactionId": "2"})
        assert response.status_code == 400
        assert response.json() == {
            "missing_parameter": [
                "ussdServiceCode",
                "transactionTime",
                "ussdRequestString",
                "creationTime",
                "response",
            ]
        }
        down = await link.wait_status("invalid_inbound_fields")
        assert (down.component, down.level) == ("request", StatusLevel.DOWN)
        assert down.details == {"missing_parameter": response.json()["missing_parameter"]}
        async with trio.open_nursery() as nursery:
            call = start_call(nursery, client, query())
            await transport.send(reply_to(await link.next_inbound(), content="ok"))
            await call.wait()
        ok = await link.wait_status("request_decoded")
        assert (ok.component, ok.level) == ("request", StatusLevel.OK)
        assert link.pending_inbound() == []


@pytest.mark.slow
async def test_dmark_timeout_apologises_closes_and_rejects_the_late_reply() -> None:
    config = {"reply_timeout": 0.3, "reply_timeout_text": "Sorry!"}
    async with local_dmark(config) as (transport, link, client), trio.open_nursery() as nursery:
        call = start_call(nursery, client, query())
        inbound = await link.next_inbound()
        response = await call.wait()
        assert response.status_code == 200
        assert response.json() == {"responseString": "Sorry!", "action": "end"}
        close = await link.next_inbound()
        assert_fields(close, {"session_event": "close", "content": None, "to_addr": "*180#"})
        assert close.from_addr == inbound.from_addr
        assert close.message_id != inbound.message_id
        status = await link.wait_status("timeout")
        assert (status.component, status.level) == ("response", StatusLevel.DOWN)
        with pytest.raises(ProviderRejected, match=r"^timeout$") as rejected:
            await transport.send(reply_to(inbound, content="too late"))
        assert rejected.value.code == "timeout"
        # The session was closed: the same transaction starts a new one.
        again = start_call(nursery, client, query())
        assert (await link.next_inbound()).session_event == SessionEvent.NEW
        nursery.cancel_scope.cancel()
        assert again.response is None


async def test_dmark_hang_up_closes_the_session_and_rejects_the_reply() -> None:
    async with local_dmark() as (transport, link, _):
        stream = await trio.open_tcp_stream("127.0.0.1", transport.port)
        request = f"GET /dmark?{query().decode()} HTTP/1.1\r\nHost: x\r\n\r\n"
        await stream.send_all(request.encode())
        inbound = await link.next_inbound()
        await stream.aclose()
        close = await link.next_inbound()
        assert close.session_event == SessionEvent.CLOSE
        with pytest.raises(ProviderRejected) as rejected:
            await transport.send(reply_to(inbound, content="nobody there"))
        assert rejected.value.code == "client_disconnected"


async def test_dmark_second_reply_is_rejected() -> None:
    async with local_dmark() as (transport, link, client), trio.open_nursery() as nursery:
        call = start_call(nursery, client, query())
        inbound = await link.next_inbound()
        await transport.send(reply_to(inbound, content="first"))
        with pytest.raises(ProviderRejected) as rejected:
            await transport.send(reply_to(inbound, content="second"))
        assert rejected.value.code == "duplicate_reply"
        assert (await call.wait()).json()["responseString"] == "first"


@pytest.mark.parametrize(
    ("thresholds", "type_", "level"),
    [
        ({"response_time_degraded": 0.1, "response_time_down": 5}, "slow_response", "degraded"),
        ({"response_time_degraded": 0.05, "response_time_down": 0.1}, "very_slow_response", "down"),
    ],
)
async def test_dmark_slow_replies_are_reported(
    thresholds: dict[str, float], type_: str, level: str
) -> None:
    async with local_dmark(thresholds) as (transport, link, client):
        for delay in (0.0, 0.2, 0.0):
            async with trio.open_nursery() as nursery:
                call = start_call(nursery, client, query(transactionId=str(delay)))
                inbound = await link.next_inbound()
                # Not synchronisation: this is the application being slow.
                await trio.sleep(delay)
                await transport.send(reply_to(inbound, content="ok"))
                await call.wait()
        first = await link.wait_status("response_sent")
        slow = await link.wait_status(type_)
        recovered = await link.wait_status("response_sent")
    assert first.component == slow.component == recovered.component == "response"
    assert slow.level == level
    assert float(str(slow.details["response_time"])) >= 0.2


async def test_dmark_stopping_apologises_to_held_requests() -> None:
    config = {**LOCAL, "reply_timeout_text": "Back soon"}
    async with httpx.AsyncClient(timeout=READ_TIMEOUT) as client, trio.open_nursery() as nursery:
        async with running_transport(DmarkTransport, config) as (transport, link):
            assert isinstance(transport, DmarkTransport)
            url = f"http://127.0.0.1:{transport.port}/dmark"
            call = start_call(nursery, client, query(), path=url)
            await link.next_inbound()
            # Leaving the block cancels the transport while the request is held.
        response = await call.wait()
    assert response.json() == {"responseString": "Back soon", "action": "end"}


async def test_dmark_health_counts_pending_requests() -> None:
    async with local_dmark() as (transport, link, client), trio.open_nursery() as nursery:
        assert (await client.get("/health")).json() == {"pending_requests": 0}
        call = start_call(nursery, client, query())
        inbound = await link.next_inbound()
        assert (await client.get("/health/")).json() == {"pending_requests": 1}
        await transport.send(reply_to(inbound, content="ok"))
        await call.wait()
        assert (await client.get("/health")).json() == {"pending_requests": 0}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/elsewhere", 404), ("PUT", "/dmark", 405), ("DELETE", "/dmark", 405)],
)
async def test_dmark_other_routes(method: str, path: str, status: int) -> None:
    async with local_dmark() as (_, link, client):
        response = await client.request(method, path)
        assert response.status_code == status
        assert link.pending_inbound() == []


async def test_dmark_oversized_body_is_refused() -> None:
    async with local_dmark() as (_, link, client):
        response = await client.post(
            "/dmark", content=b"x" * (MAX_BODY_BYTES + 1), headers={"content-type": FORM}
        )
        assert response.status_code == 413
        assert link.pending_inbound() == []


async def test_dmark_garbage_gets_400() -> None:
    async with local_dmark() as (transport, _, _):
        stream = await trio.open_tcp_stream("127.0.0.1", transport.port)
        async with stream:
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            with trio.fail_after(READ_TIMEOUT):
                head = await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 400 ")


async def test_dmark_listening_status() -> None:
    async with local_dmark() as (transport, link, _):
        listening = await link.wait_status("listening")
    assert listening.component == "dmark"
    assert listening.level == StatusLevel.OK
    assert listening.details == {"interface": "127.0.0.1", "port": transport.port, "path": "/dmark"}
    assert transport.port != 0


async def test_dmark_bind_failure_is_reported_then_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    blockers = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = blockers[0].socket.getsockname()[1]
    link = MemoryLink()
    transport = DmarkTransport(DmarkConfig(**LOCAL, web_port=port), link)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        failed = await link.wait_status("bind_failed")
        assert failed.level == StatusLevel.DOWN
        for listener in blockers:
            await listener.aclose()
        listening = await link.wait_status("listening")
        assert listening.details["port"] == port
        nursery.cancel_scope.cancel()
