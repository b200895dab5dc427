"""Optional bearer-token authentication (issue 7): with api_tokens, every path but /health
needs `Authorization: Bearer <token>`; a missing or wrong one gets 401 in the envelope with
WWW-Authenticate: Bearer. Tokens never appear in answers or logs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import SecretStr

from api.auth import presented_token, token_matches
from tests.api.harness import open_api

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.settings import Settings
    from tests.api.harness import Api

JsonObject = dict[str, Any]

TOKEN = "s3cret-token-one"
OTHER = "another-token-2"


@pytest.fixture
async def secured(embedded_settings: Settings, socket_dir: Path) -> AsyncIterator[Api]:
    settings = embedded_settings.model_copy(
        update={"api_tokens": [SecretStr(TOKEN), SecretStr(OTHER)]}
    )
    async with open_api(settings, socket_dir) as api:
        yield api


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def request(
    api: Api, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, JsonObject | None, Any]:
    options: JsonObject = {"headers": headers or {}}
    response = await api.client.open(path, method=method, **options)
    payload: JsonObject | None = await response.get_json(silent=True)
    return response.status_code, payload, response.headers


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer(TOKEN[:-1]),
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
    ],
)
async def test_without_a_valid_token_every_route_is_401(
    secured: Api, headers: dict[str, str]
) -> None:
    cid = await secured.store.list_channels()
    assert cid == []
    for method, path in (
        ("GET", "/channels/"),
        ("POST", "/channels/"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("POST", "/channels/c1/pause"),
        # Unknown paths and methods too: no answer tells which routes exist.
        ("GET", "/nothing-here"),
        ("PUT", "/channels/"),
    ):
        status, payload, answer_headers = await request(secured, method, path, headers)
        assert status == 401, (method, path)
        assert answer_headers["WWW-Authenticate"] == "Bearer"
        assert payload is not None
        assert payload["code"] == "Unauthorized"
        assert payload["description"] == "unauthorized"
        [item] = payload["result"]["errors"]
        assert item["type"] == "Unauthorized"
        assert TOKEN not in item["message"]
        assert OTHER not in item["message"]


async def test_any_configured_token_is_accepted(secured: Api) -> None:
    for headers in (bearer(TOKEN), bearer(OTHER), {"Authorization": f"bearer   {TOKEN} "}):
        status, payload, _ = await request(secured, "GET", "/channels/", headers)
        assert (status, payload) == (
            200,
            {"status": 200, "code": "OK", "description": "channels listed", "result": []},
        )
    status, _, _ = await request(secured, "GET", "/nothing-here", bearer(TOKEN))
    assert status == 404
    status, _, headers = await request(secured, "GET", "/metrics", bearer(TOKEN))
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")


async def test_health_needs_no_token(secured: Api) -> None:
    for path in ("/health", "/health/"):
        status, payload, _ = await request(secured, "GET", path)
        assert status == 200
        assert payload is not None
        assert payload["description"] == "health ok"


async def test_without_tokens_nothing_is_asked(http_api: Api) -> None:
    for path in ("/channels/", "/metrics", "/openapi.json"):
        assert (await request(http_api, "GET", path))[0] == 200


async def test_tokens_are_not_logged(secured: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await request(secured, "GET", "/channels/", bearer("wrong-token-value"))
    await request(secured, "GET", "/channels/", bearer(TOKEN))
    await request(secured, "POST", "/channels/", bearer(TOKEN))
    text = "\n".join(
        f"{record.getMessage()} {record.__dict__}" for record in caplog.records
    ) + repr(secured.settings)
    assert TOKEN not in text
    assert OTHER not in text
    assert "wrong-token-value" not in text


def test_token_parsing_and_comparison() -> None:
    tokens = [b"abc", b"defg"]
    assert token_matches(b"abc", tokens)
    assert token_matches(b"defg", tokens)
    assert not token_matches(b"ab", tokens)
    assert not token_matches(b"abcd", tokens)
    assert not token_matches(b"abc", [])
    assert presented_token("Bearer abc") == b"abc"
    assert presented_token("BEARER  abc ") == b"abc"
    assert presented_token("Token abc") is None
    assert presented_token("Bearer") is None
    assert presented_token(None) is None
