"""Hostile and odd input: body size and time limits over real TCP, request-head limits,
undecodable or pathological JSON, odd query strings. Never a 500, never a hang."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from api.app import MAX_BODY_SIZE
from api.main import MAX_REQUEST_HEAD
from api.routers import LEASE_KEY
from api.routes import channels
from api.routes.channels import CREATE_LEASE
from api.schemas import MAX_NESTING
from tests.api.harness import open_api, serve_api

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.settings import Settings
    from tests.api.harness import Api, LiveApi

JsonObject = dict[str, Any]

SMALL_LIMIT = 1024
BODY_TIMEOUT = 0.5


@pytest.fixture
async def live(embedded_settings: Settings, socket_dir: Path) -> AsyncIterator[LiveApi]:
    async with serve_api(
        embedded_settings, socket_dir, max_body_size=SMALL_LIMIT, body_timeout=BODY_TIMEOUT
    ) as served:
        yield served


def _check_envelope(response: httpx.Response) -> JsonObject:
    assert response.headers["Content-Type"] == "application/json"
    payload: JsonObject = response.json()
    assert list(payload) == ["status", "code", "description", "result"]
    assert payload["status"] == response.status_code
    return payload


def _too_large(payload: JsonObject, limit: int) -> None:
    description = f"The request body is larger than the limit of {limit} bytes."
    assert payload == {
        "status": 413,
        "code": "Request Entity Too Large",
        "description": description,
        "result": {
            "errors": [
                {
                    "code": 413,
                    "type": "Request Entity Too Large",
                    "message": f"413 Request Entity Too Large: {description}",
                }
            ]
        },
    }


def _padded_channel(size: int) -> bytes:
    """A valid create body of exactly `size` bytes."""
    body = {"type": "fake", "config": {"host": "h"}, "label": ""}
    bare = len(json.dumps(body).encode())
    body["label"] = "x" * (size - bare)
    raw = json.dumps(body).encode()
    assert len(raw) == size
    return raw


async def test_body_over_the_limit_is_413(live: LiveApi) -> None:
    async with httpx.AsyncClient(base_url=live.base_url) as client:
        response = await client.post("/channels/", content=_padded_channel(SMALL_LIMIT + 1))
        _too_large(_check_envelope(response), SMALL_LIMIT)
        response = await client.post("/channels/", content=_padded_channel(SMALL_LIMIT))
        assert response.status_code == 201
    assert len(await live.store.list_channels()) == 1


async def test_chunked_body_over_the_limit_is_413(live: LiveApi) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 256

    async with httpx.AsyncClient(base_url=live.base_url) as client:
        response = await client.post("/channels/", content=chunks())
    _too_large(_check_envelope(response), SMALL_LIMIT)


async def _exchange(live: LiveApi, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read one response (status, body), and see the server close the
    connection (the rest of the request was not read); bounded, so a hang fails the test."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", live.port)
        async with stream:
            await stream.send_all(request)
            response = await read_response(stream)
            assert response is not None
            assert await stream.receive_some(65536) == b""
    return response


def _complete_response(raw: bytes) -> tuple[int, bytes] | None:
    head, separator, body = raw.partition(b"\r\n\r\n")
    if not separator:
        return None
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    length = int(headers.get(b"content-length", b"0"))
    if len(body) < length:
        return None
    return int(lines[0].split(b" ", 2)[1]), body[:length]


async def test_declared_huge_body_is_refused_before_it_is_sent(live: LiveApi) -> None:
    request = b'POST /channels/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n{"type":'
    status, body = await _exchange(live, request)
    assert status == 413
    _too_large(json.loads(body), SMALL_LIMIT)


async def test_body_that_stops_arriving_is_408(live: LiveApi) -> None:
    request = b'POST /channels/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"type":'
    status, body = await _exchange(live, request)
    assert status == 408
    payload = json.loads(body)
    assert payload["description"] == (
        "The server closed the network connection because the browser didn't finish the "
        "request within the specified time."
    )
    assert payload["result"]["errors"][0]["type"] == "Request Timeout"


async def test_request_head_over_the_limit_is_431_without_a_body(live: LiveApi) -> None:
    """Hypercorn answers this itself, before the app: the one answer not in the envelope.

    h11 checks the limit while a head is incomplete, so a head that arrives whole in one
    64 KiB read passes: this one is larger than that.
    """
    big = b"a" * (MAX_REQUEST_HEAD + 2**16)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n"
    status, body = await _exchange(live, request)
    assert status == 431
    assert body == b""


async def test_default_limit_is_one_mebibyte(http_api: Api) -> None:
    assert MAX_BODY_SIZE == 1024 * 1024
    response = await http_api.client.post("/channels/", data=_padded_channel(MAX_BODY_SIZE + 1))
    assert response.status_code == 413
    response = await http_api.client.post("/channels/", data=_padded_channel(MAX_BODY_SIZE))
    assert response.status_code == 201


def _nested(depth: int) -> bytes:
    return b'{"type": "fake", "config": {"host": "h"}, "metadata": ' + (
        b'{"a": ' * (depth - 1) + b"{}" + b"}" * (depth - 1) + b"}"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"label": "\xff"}',
            "the body is not UTF-8: 'utf-8' codec can't decode byte 0xff in position 11: "
            "invalid start byte",
        ),
        (
            '{"label": "x"}'.encode("utf-16"),
            "the body is not UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: "
            "invalid start byte",
        ),
        (b'{"label": "\\ud800"}', "the body holds a lone surrogate (\\ud800), not a character"),
        (b'{"\\udfff": 1}', "the body holds a lone surrogate (\\udfff), not a character"),
        (
            b'{"a": ["\\ud83d\\ude00", "x\\uDBFFy"]}',
            "the body holds a lone surrogate (\\udbff), not a character",
        ),
        (b'{"a": 1e400}', "number 1e400 is out of range"),
        (b'{"a": -Infinity}', "-Infinity is not valid JSON"),
        (_nested(MAX_NESTING), f"the body is nested deeper than {MAX_NESTING} levels"),
        (b"[" * 200_000 + b"]" * 200_000, f"the body is nested deeper than {MAX_NESTING} levels"),
    ],
)
async def test_undecodable_or_pathological_json_is_400(
    http_api: Api, body: bytes, message: str
) -> None:
    response = await http_api.client.post("/channels/", data=body)
    payload = await response.get_json()
    assert response.status_code == 400
    assert payload["description"] == "json decode error"
    assert payload["result"] == {"errors": [{"type": "JsonDecodeError", "message": message}]}


async def test_huge_integer_literal_is_400(http_api: Api) -> None:
    response = await http_api.client.post("/channels/", data=b'{"a": ' + b"9" * 5000 + b"}")
    payload = await response.get_json()
    assert response.status_code == 400
    assert payload["description"] == "json decode error"
    assert "Exceeds the limit (4300 digits)" in payload["result"]["errors"][0]["message"]


async def test_odd_but_valid_json_is_accepted(http_api: Api) -> None:
    bodies = [
        # The body object is one level: metadata's nesting takes the rest.
        _nested(MAX_NESTING - 1),
        # A UTF-8 byte order mark, a surrogate pair escape, a literal backslash-u.
        b'\xef\xbb\xbf{"type": "fake", "config": {"host": "h"}, "label": "\\ud83d\\ude00"}',
        b'{"type": "fake", "config": {"host": "h"}, "label": "\\\\ud800"}',
        b'{"type": "fake", "config": {"host": "h"}, "metadata": {"big": 1e300, "n": -0}}',
    ]
    for body in bodies:
        response = await http_api.client.post("/channels/", data=body)
        assert response.status_code == 201, await response.get_json()
    labels = [
        (await http_api.store.get_channel(channel_id) or {}).get("label")
        for channel_id in await http_api.store.list_channels()
    ]
    assert "\U0001f600" in labels
    assert "\\ud800" in labels


async def test_405_names_the_allowed_methods(http_api: Api) -> None:
    response = await http_api.client.put("/channels/")
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD, POST"


@pytest.mark.parametrize(
    ("query", "status", "count"),
    [
        ("?n=+5", 400, None),
        ("?n=%205", 400, None),
        ("?n=%D9%A5", 400, None),  # ARABIC-INDIC DIGIT FIVE: int() would take it
        ("?n=1.5", 400, None),
        ("?n=" + "9" * 5000, 200, 3),
        ("?n=-" + "9" * 5000, 200, 0),
    ],
)
async def test_logs_n_must_be_plain_digits(
    http_api: Api, query: str, status: int, count: int | None
) -> None:
    channel_id = await http_api.create_channel()
    logs = http_api.settings.logging_path
    trio_path = trio.Path(logs)
    await trio_path.mkdir(parents=True, exist_ok=True)
    lines = "".join(
        json.dumps({"logger": channel_id, "level": 20, "timestamp": i, "message": str(i)}) + "\n"
        for i in range(3)
    )
    await (trio_path / channel_id).write_text(lines)
    response = await http_api.client.get(f"/channels/{channel_id}/logs{query}")
    payload = await response.get_json()
    assert response.status_code == status, payload
    if count is not None:
        assert len(payload["result"]) == count
    else:
        assert payload["result"]["errors"][0]["type"] == "ApiUsageError"


@pytest.mark.parametrize(
    "head",
    [
        b"PUT /channels/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n",  # 405
        b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n",  # 404
        b"POST /channels/abc/restart HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n",
    ],
)
async def test_answer_before_the_body_arrived_never_strands_the_connection(
    live: LiveApi, head: bytes
) -> None:
    """Clients (requests, for one) send the body in a second write and reuse the connection:
    the next request must be answered, or the connection closed; never left hanging
    (api.asgi explains how it hung)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", live.port)
        async with stream:
            await stream.send_all(head)
            first = await read_response(stream)
            assert first is not None
            # The server runs in this trio run: let it finish with the answer, then the body.
            await wait_all_tasks_blocked()
            try:
                await stream.send_all(b"{}")
                await wait_all_tasks_blocked()
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            except trio.BrokenResourceError:
                return  # closed: the client opens a new connection
            second = await read_response(stream)
    assert second is None or second[0] == 200


async def read_response(stream: trio.SocketStream) -> tuple[int, bytes] | None:
    """One response, or None when the server closed the connection first."""
    received = bytearray()
    while (response := _complete_response(bytes(received))) is None:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return None
        if not chunk:
            return None
        received += chunk
    return response


# --- number of channels (max_channels) ----------------------------------------------------

CHANNEL_LIMIT = 3
FAKE_CHANNEL: JsonObject = {"type": "fake", "config": {"host": "h"}}


def limit_reached(limit: int) -> JsonObject:
    """The documented 409 body of a create refused at `limit` channels."""
    return {
        "status": 409,
        "code": "Conflict",
        "description": "too many channels",
        "result": {
            "errors": [
                {
                    "type": "ChannelLimitReached",
                    "message": f"this gateway has {limit} channels and allows at most {limit} "
                    "(max_channels): delete one, or raise --max-channels",
                }
            ]
        },
    }


async def create_into(api: Api, statuses: list[int]) -> None:
    """Create a channel; add the answer's status to `statuses`."""
    statuses.append((await api.client.post("/channels/", json=FAKE_CHANNEL)).status_code)


@pytest.fixture
async def limited(settings: Settings, socket_dir: Path) -> AsyncIterator[Api]:
    """The app on each backend, allowing CHANNEL_LIMIT channels and 2 log entries per call."""
    limits = {"max_channels": CHANNEL_LIMIT, "max_logs": 2}
    async with open_api(settings.model_copy(update=limits), socket_dir) as harness:
        yield harness


async def test_channel_past_the_limit_is_409_and_saves_nothing(limited: Api) -> None:
    created = [await limited.create_channel() for _ in range(CHANNEL_LIMIT)]
    response = await limited.client.post("/channels/", json=FAKE_CHANNEL)
    payload = await response.get_json()
    assert response.status_code == 409
    assert payload == limit_reached(CHANNEL_LIMIT)
    assert sorted(await limited.store.list_channels()) == sorted(created)
    assert len(limited.supervisor.lifecycle()) == CHANNEL_LIMIT
    # A place freed is a place taken.
    assert (await limited.client.delete(f"/channels/{created[0]}")).status_code == 200
    await limited.create_channel()
    assert len(await limited.store.list_channels()) == CHANNEL_LIMIT


async def test_concurrent_creates_never_pass_the_limit(limited: Api) -> None:
    statuses: list[int] = []
    async with trio.open_nursery() as nursery:
        for _ in range(CHANNEL_LIMIT + 7):
            nursery.start_soon(create_into, limited, statuses)
    assert sorted(statuses) == [201] * CHANNEL_LIMIT + [409] * 7
    assert len(await limited.store.list_channels()) == CHANNEL_LIMIT


async def test_create_waits_for_another_workers_create(limited: Api) -> None:
    """Creates count and save under a lease in the store that every API worker shares: while
    another worker holds it, a create waits, and goes on once it is dropped."""
    store = limited.store
    assert await store.kv_put_if_absent(CREATE_LEASE.scope, LEASE_KEY, {"token": "other"}, 60)
    statuses: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(create_into, limited, statuses)
        await trio.sleep(0.3)
        assert statuses == []
        assert await store.list_channels() == []
        assert await store.kv_delete(CREATE_LEASE.scope, LEASE_KEY)
    assert statuses == [201]
    assert await store.kv_get(CREATE_LEASE.scope, LEASE_KEY) is None


async def test_create_behind_a_lease_never_dropped_is_503(
    limited: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that died holding the lease: creates wait `wait` seconds, then 503 (the
    lease expires after its ttl)."""
    monkeypatch.setattr(channels, "CREATE_LEASE", replace(CREATE_LEASE, wait=0.2))
    assert await limited.store.kv_put_if_absent(CREATE_LEASE.scope, LEASE_KEY, {"token": "x"}, 60)
    response = await limited.client.post("/channels/", json=FAKE_CHANNEL)
    assert response.status_code == 503
    assert await response.get_json() == {
        "status": 503,
        "code": "Service Unavailable",
        "description": "channels busy",
        "result": {
            "errors": [
                {
                    "type": "ChannelsBusy",
                    "message": "Another API worker has been creating a channel for 0.2 s; "
                    "retry later",
                }
            ]
        },
    }
    assert await limited.store.list_channels() == []


async def test_modifying_a_channel_at_the_limit_is_allowed(limited: Api) -> None:
    created = [await limited.create_channel() for _ in range(CHANNEL_LIMIT)]
    response = await limited.client.post(f"/channels/{created[0]}", json={"label": "still me"})
    assert response.status_code == 200


# --- log request size (max_logs) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status", "count"),
    [
        ("", 200, 2),
        ("?n=1", 200, 1),
        ("?n=2", 200, 2),
        ("?n=3", 200, 2),
        ("?n=1000000", 200, 2),
        ("?n=" + "9" * 30, 200, 2),
        ("?n=0", 200, 0),
        ("?n=-1", 200, 0),
        ("?n=-" + "9" * 30, 200, 0),
        ("?n=abc", 400, None),
        ("?n=", 400, None),
        ("?n=1e3", 400, None),
        ("?n=0x10", 400, None),
        ("?n=abc&n=1", 400, None),
    ],
)
async def test_logs_are_capped_at_max_logs(
    limited: Api, query: str, status: int, count: int | None
) -> None:
    channel_id = await limited.create_channel()
    logs = trio.Path(limited.settings.logging_path)
    await logs.mkdir(parents=True, exist_ok=True)
    lines = "".join(
        json.dumps({"logger": channel_id, "level": 20, "timestamp": i, "message": str(i)}) + "\n"
        for i in range(5)
    )
    await (logs / channel_id).write_text(lines)
    response = await limited.client.get(f"/channels/{channel_id}/logs{query}")
    payload = await response.get_json()
    assert response.status_code == status, payload
    if count is None:
        assert payload["result"]["errors"][0]["type"] == "ApiUsageError"
        assert payload["result"]["errors"][0]["message"].startswith("n must be an integer")
    else:
        assert [entry["message"] for entry in payload["result"]] == ["4", "3"][:count]
