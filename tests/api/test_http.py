"""Routing, envelope and body validation: backend-independent HTTP behaviour (behaviour 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from unittest.mock import patch

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jsonschema import Draft4Validator

from api.errors import BodyValidationError
from api.main import MAX_REQUEST_HEAD
from api.schemas import (
    CHANNEL_CREATE_VALIDATOR,
    CHANNEL_MODIFY_VALIDATOR,
    DESTINATION_CREATE_VALIDATOR,
    DESTINATION_PATCH_VALIDATOR,
    MESSAGE_SEND_VALIDATOR,
    ROUTER_CREATE_VALIDATOR,
    ROUTER_PATCH_VALIDATOR,
    validate_body,
)
from tests.api.harness import serve_api

if TYPE_CHECKING:
    from pathlib import Path

    from ipc.settings import Settings
    from tests.api.harness import Api

JsonObject = dict[str, Any]

NOT_FOUND = (
    "The requested URL was not found on the server. If you entered the URL manually please "
    "check your spelling and try again."
)
NOT_ALLOWED = "The method is not allowed for the requested URL."


async def _call(api: Api, method: str, path: str, **kwargs: Any) -> tuple[int, JsonObject]:
    response = await api.client.open(path, method=method, **kwargs)
    assert response.headers["Content-Type"] == "application/json"
    payload: JsonObject = await response.get_json()
    assert list(payload) == ["status", "code", "description", "result"]
    assert payload["status"] == response.status_code
    return response.status_code, payload


async def test_unknown_path_is_404_in_the_envelope(http_api: Api) -> None:
    status, payload = await _call(http_api, "GET", "/nope")
    assert status == 404
    assert payload == {
        "status": 404,
        "code": "Not Found",
        "description": NOT_FOUND,
        "result": {
            "errors": [{"code": 404, "type": "Not Found", "message": f"404 Not Found: {NOT_FOUND}"}]
        },
    }


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/channels/"),
        ("PATCH", "/channels/abc"),
        ("GET", "/channels/abc/messages/"),
        ("OPTIONS", "/channels/"),
        ("POST", "/health"),
    ],
)
async def test_unrouted_method_is_405(http_api: Api, method: str, path: str) -> None:
    status, payload = await _call(http_api, method, path)
    assert status == 405
    assert payload["code"] == "Method Not Allowed"
    assert payload["description"] == NOT_ALLOWED
    assert payload["result"]["errors"] == [
        {
            "code": 405,
            "type": "Method Not Allowed",
            "message": f"405 Method Not Allowed: {NOT_ALLOWED}",
        }
    ]


@pytest.mark.parametrize(
    ("method", "path", "location"),
    [
        ("GET", "/channels", "http://localhost/channels/"),
        ("POST", "/channels?x=1", "http://localhost/channels/?x=1"),
        ("POST", "/channels/abc/messages", "http://localhost/channels/abc/messages/"),
    ],
)
async def test_collection_without_slash_redirects_308(
    http_api: Api, method: str, path: str, location: str
) -> None:
    no_body: dict[str, Any] = {}
    response = await http_api.client.open(path, method=method, **no_body)
    payload = await response.get_json()
    assert response.status_code == 308
    assert response.headers["Location"] == location
    assert payload == {
        "status": 308,
        "code": "Permanent Redirect",
        "description": None,
        "result": {
            "errors": [
                {
                    "code": 308,
                    "type": "Permanent Redirect",
                    "message": "308 Permanent Redirect: None",
                    "new_url": location,
                }
            ]
        },
    }


async def test_item_path_with_extra_slash_is_404(http_api: Api) -> None:
    status, _ = await _call(http_api, "GET", "/channels/abc/")
    assert status == 404


@pytest.mark.parametrize("path", ["/health", "/health/"])
async def test_health_both_paths(http_api: Api, path: str) -> None:
    status, payload = await _call(http_api, "GET", path)
    assert status == 200
    assert payload == {"status": 200, "code": "OK", "description": "health ok", "result": {}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        (b"", "Expecting value: line 1 column 1 (char 0)"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
    ],
)
async def test_invalid_json_is_400(http_api: Api, body: bytes, message: str) -> None:
    status, payload = await _call(http_api, "POST", "/channels/", data=body)
    assert status == 400
    assert payload["code"] == "Bad Request"
    assert payload["description"] == "json decode error"
    assert payload["result"] == {"errors": [{"type": "JsonDecodeError", "message": message}]}


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ([], [("[] is not of type 'object'", ["type"])]),
        (None, [("None is not of type 'object'", ["type"])]),
        (
            {},
            [
                ("'config' is a required property", ["required"]),
                ("'type' is a required property", ["required"]),
            ],
        ),
        (
            {"type": 5, "config": {}, "character_limit": "a", "rate_limit_count": -3},
            [
                ("'a' is not of type 'integer'", ["properties", "character_limit", "type"]),
                ("-3 is less than the minimum of 0", ["properties", "rate_limit_count", "minimum"]),
                ("5 is not of type 'string'", ["properties", "type", "type"]),
            ],
        ),
        (
            {"type": "fake", "config": {}, "character_limit": 1.0, "mo_url": None},
            [
                ("1.0 is not of type 'integer'", ["properties", "character_limit", "type"]),
                ("None is not of type 'string'", ["properties", "mo_url", "type"]),
            ],
        ),
    ],
)
async def test_create_body_schema_errors(
    http_api: Api, body: object, errors: list[tuple[str, list[str]]]
) -> None:
    status, payload = await _call(http_api, "POST", "/channels/", json=body)
    assert status == 400
    assert payload["description"] == "api usage error"
    assert payload["result"]["errors"] == [
        {"type": "invalid_body", "message": message, "schema_path": path}
        for message, path in errors
    ]


async def test_schema_is_checked_before_the_channel_lookup(http_api: Api) -> None:
    status, payload = await _call(http_api, "POST", "/channels/unknown", json={"label": 3})
    assert status == 400
    assert payload["result"]["errors"][0]["schema_path"] == ["properties", "label", "type"]


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        (
            {"to": "+27", "content": "hi", "priority": 6, "nope": 1},
            [
                ("6 is greater than the maximum of 5", ["properties", "priority", "maximum"]),
                (
                    "Additional properties are not allowed ('nope' was unexpected)",
                    ["additionalProperties"],
                ),
            ],
        ),
        (
            {"to": None, "reply_to": None},
            [
                ("'content' is a required property", ["required"]),
                ("None is not of type 'string'", ["properties", "reply_to", "type"]),
                ("None is not of type 'string'", ["properties", "to", "type"]),
            ],
        ),
        (
            {"to": "+27", "content": 5, "priority": "h"},
            [
                ("'h' does not match '^[1-5]$'", ["properties", "priority", "pattern"]),
                ("5 is not of type 'string', 'null'", ["properties", "content", "type"]),
            ],
        ),
        (
            {"to": "+27", "content": "x", "priority": True},
            [("True is not of type 'integer', 'string'", ["properties", "priority", "type"])],
        ),
        # Python's `$` matches before a final newline: the length check catches it.
        (
            {"to": "+27", "content": "x", "priority": "3\n"},
            [("'3\\n' is too long", ["properties", "priority", "maxLength"])],
        ),
        (
            {"to": "+27", "content": "x", "channel_data": {"session_event": "bye"}},
            [
                (
                    "'bye' is not one of [None, 'new', 'resume', 'close']",
                    ["properties", "channel_data", "properties", "session_event", "enum"],
                )
            ],
        ),
        (
            {"to": "+27", "content": "x", "channel_data": {"continue_session": "yes"}},
            [
                (
                    "'yes' is not of type 'boolean', 'null'",
                    ["properties", "channel_data", "properties", "continue_session", "type"],
                )
            ],
        ),
    ],
)
async def test_send_body_schema_errors(
    http_api: Api, body: JsonObject, errors: list[tuple[str, list[str]]]
) -> None:
    status, payload = await _call(http_api, "POST", "/channels/unknown/messages/", json=body)
    assert status == 400
    assert payload["result"]["errors"] == [
        {"type": "invalid_body", "message": message, "schema_path": path}
        for message, path in errors
    ]


async def test_unknown_channel_is_404_with_empty_message(http_api: Api) -> None:
    for method, path, body in [
        ("GET", "/channels/nope", None),
        ("POST", "/channels/nope", {}),
        ("DELETE", "/channels/nope", None),
        ("POST", "/channels/nope/restart", None),
        ("GET", "/channels/nope/logs", None),
        ("POST", "/channels/nope/messages/", {"to": "1", "content": "x"}),
        ("GET", "/channels/nope/messages/abc", None),
    ]:
        status, payload = await _call(http_api, method, path, json=body)
        assert status == 404, (method, path)
        assert payload["description"] == "channel not found"
        assert payload["result"] == {"errors": [{"type": "ChannelNotFound", "message": ""}]}
    assert http_api.supervisor.lifecycle() == []


async def test_invalid_channel_type_is_a_plain_string_type(http_api: Api) -> None:
    status, payload = await _call(
        http_api, "POST", "/channels/", json={"type": "foo", "config": {}}
    )
    assert status == 400
    assert payload["description"] == "invalid channel type"
    assert payload["result"]["errors"] == [
        {
            "type": "InvalidChannelType",
            "message": "Invalid channel type 'foo', must be one of: fake, loose",
        }
    ]
    assert await http_api.store.list_channels() == []


async def test_config_checked_against_the_type_schema(http_api: Api) -> None:
    body = {"type": "fake", "config": {"port": 0, "extra": True}}
    status, payload = await _call(http_api, "POST", "/channels/", json=body)
    assert status == 400
    assert payload["description"] == "api usage error"
    assert payload["result"]["errors"] == [
        {
            "type": "invalid_body",
            "message": "'host' is a required property",
            "schema_path": ["properties", "config", "required"],
        },
        {
            "type": "invalid_body",
            "message": "0 is less than the minimum of 1",
            "schema_path": ["properties", "config", "properties", "port", "minimum"],
        },
        {
            "type": "invalid_body",
            "message": "Additional properties are not allowed ('extra' was unexpected)",
            "schema_path": ["properties", "config", "additionalProperties"],
        },
    ]
    assert await http_api.store.list_channels() == []


async def test_amqp_queue_refused_on_the_embedded_broker(http_api: Api) -> None:
    body = {"type": "fake", "config": {"host": "h"}, "amqp_queue": "myapp"}
    status, payload = await _call(http_api, "POST", "/channels/", json=body)
    assert status == 400
    assert payload["description"] == "api usage error"
    [error] = payload["result"]["errors"]
    assert error["type"] == "ApiUsageError"
    assert "amqp_queue needs a RabbitMQ broker" in error["message"]
    assert await http_api.store.list_channels() == []


async def test_unhandled_error_is_500_generic(http_api: Api) -> None:
    """A stored inbound message that is not a vumi message makes the reply path fail."""
    channel_id = await http_api.create_channel(mo_url="http://example.com/mo")
    await http_api.store.put_inbound(channel_id, "in1", {"message_id": 5}, 60)
    status, payload = await _call(
        http_api,
        "POST",
        f"/channels/{channel_id}/messages/",
        json={"reply_to": "in1", "content": "x"},
    )
    assert status == 500
    assert payload["code"] == "Internal Server Error"
    assert payload["description"] == "generic error"
    [error] = payload["result"]["errors"]
    assert error["type"] == "ValidationError"


async def test_modify_to_amqp_queue_refused_on_the_embedded_broker(http_api: Api) -> None:
    channel_id = await http_api.create_channel()
    before = await http_api.store.get_channel(channel_id)
    status, payload = await _call(
        http_api, "POST", f"/channels/{channel_id}", json={"amqp_queue": "myapp"}
    )
    assert status == 400
    assert payload["result"]["errors"][0]["type"] == "ApiUsageError"
    assert await http_api.store.get_channel(channel_id) == before


# --- the send path's shortcuts (issue 4) ---------------------------------------------------------


async def test_each_response_leaves_in_one_write(
    embedded_settings: Settings, socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head and body in one write (api.asgi.CoalescingH11Protocol), on keep-alive and for
    Hypercorn's own error answers; each response arrives whole."""
    writes: list[bytes] = []
    send_all = trio.SocketStream.send_all

    async with serve_api(embedded_settings, socket_dir) as live:

        async def counting(self: trio.SocketStream, data: bytes | bytearray | memoryview) -> None:
            if data and self.socket.getsockname()[1] == live.port:
                writes.append(bytes(data))
            await send_all(self, data)

        monkeypatch.setattr(trio.SocketStream, "send_all", counting)
        async with httpx.AsyncClient(base_url=live.base_url) as client:
            for path, status in (("/health", 200), ("/nope", 404), ("/health/", 200)):
                writes.clear()
                response = await client.get(path)
                assert response.status_code == status
                assert response.json()["status"] == status
                assert len(writes) == 1
                assert writes[0].endswith(response.content)
        # A request head over the limit: Hypercorn answers 431 itself, and closes.
        writes.clear()
        stream = await trio.open_tcp_stream("127.0.0.1", live.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nx: " + b"a" * (MAX_REQUEST_HEAD + 1))
            received = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some():
                    received += chunk
        assert received.startswith(b"HTTP/1.1 431 ")
        assert writes == [received]


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=4,
)
_VALIDATORS = [
    CHANNEL_CREATE_VALIDATOR,
    CHANNEL_MODIFY_VALIDATOR,
    MESSAGE_SEND_VALIDATOR,
    ROUTER_CREATE_VALIDATOR,
    ROUTER_PATCH_VALIDATOR,
    DESTINATION_CREATE_VALIDATOR,
    DESTINATION_PATCH_VALIDATOR,
]


def _bodies(validator: Draft4Validator) -> st.SearchStrategy[object]:
    """Objects mostly of the schema's own property names (a stray one now and then)."""
    schema = validator.schema
    assert isinstance(schema, dict)
    names = st.sampled_from([*schema["properties"], "extra"])
    return st.dictionaries(names, _JSON_VALUES, max_size=6) | _JSON_VALUES


@hypothesis_settings(max_examples=1000, deadline=None)
@given(case=st.sampled_from(_VALIDATORS).flatmap(lambda v: st.tuples(st.just(v), _bodies(v))))
def test_body_shortcut_never_passes_what_the_schema_refuses(
    case: tuple[Draft4Validator, object],
) -> None:
    validator, body = case
    try:
        validate_body(validator, body)
    except BodyValidationError:
        return
    assert list(validator.iter_errors(body)) == []


def test_body_shortcut_takes_the_common_send() -> None:
    body = {"to": "+27820000001", "from": None, "content": "hi", "event_url": "http://e/"}
    with patch.object(Draft4Validator, "iter_errors", side_effect=AssertionError("slow path")):
        assert validate_body(MESSAGE_SEND_VALIDATOR, body) is body
