"""One webhook POST: delivery id and signature headers, URL templates, errors (fake receiver)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import uuid
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from channel_proc.webhook import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    Callback,
    WebhookClient,
    WebhookError,
    WebhookTarget,
    delivery_id,
    encode_body,
    post_json,
    signature,
)
from tests.fakes.webhook import DROP

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from tests.fakes.webhook import FakeWebhook, RecordedRequest

TIMEOUT = 2.0


@pytest.fixture(params=["webhook-client", "httpx-client"])
async def http(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """post_json's two clients: the channel process's WebhookClient (its h11 pool) and a
    plain httpx.AsyncClient, which behave the same."""
    client: httpx.AsyncClient
    if request.param == "webhook-client":
        client = WebhookClient(timeout=TIMEOUT, concurrency=2)
    else:
        client = httpx.AsyncClient(timeout=TIMEOUT)
    async with client:
        yield client


def verify(request: RecordedRequest, secret: str) -> bool:
    """What a receiver does: recompute the HMAC over the raw body, compare in constant time."""
    expected = hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
    header = request.headers[SIGNATURE_HEADER.lower()]
    return hmac.compare_digest(header, f"sha256={expected}")


def test_signature_is_hmac_sha256_hex() -> None:
    # RFC 4231-style known answer (the classic "quick brown fox" HMAC-SHA256 vector).
    body = b"The quick brown fox jumps over the lazy dog"
    assert signature("key", body) == (
        "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    )


def test_delivery_id_follows_the_contract() -> None:
    assert delivery_id("mo_url", "m1") == uuid.uuid5(uuid.NAMESPACE_URL, "mo_url:m1").hex
    assert delivery_id("mo_url", "m1") == delivery_id("mo_url", "m1")
    assert delivery_id("mo_url", "m1") != delivery_id("event_url", "m1")
    assert delivery_id("mo_url", "m1") != delivery_id("mo_url", "m2")


def test_encode_body_is_compact_utf8_json() -> None:
    assert encode_body({"a": "é", "b": [1, None]}) == '{"a":"é","b":[1,null]}'.encode()


def test_callback_renders_templates_with_auth_and_secret() -> None:
    callback = Callback("http://u:pw@h/{to}/x?m={message_id}", "tok", "sec")
    target = callback.target({"to": "+27 1", "message_id": "m/1"})
    assert target == WebhookTarget(
        "http://h/%2B27%201/x?m=m%2F1", ("u", "pw"), "tok", signing_secret="sec"
    )
    assert set(target.secrets) == {"tok", "pw", "sec"}
    assert Callback("http://h/plain").target({}) == WebhookTarget("http://h/plain")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("http://h/{nope}", "invalid URL template: unknown placeholder", id="unknown"),
        pytest.param("http://h/{to", "invalid URL template: bad template syntax", id="syntax"),
        pytest.param("http://h:port/", "invalid URL", id="plain-unusable"),
    ],
)
def test_callback_check_refuses_what_can_never_work(url: str, message: str) -> None:
    with pytest.raises(WebhookError, match=message) as caught:
        Callback(url).check()
    assert caught.value.permanent
    with pytest.raises(WebhookError, match=message):
        Callback(url).target({})


def test_callback_rendering_to_an_unusable_url_is_permanent() -> None:
    callback = Callback("http://h:{to}/")
    callback.check()
    with pytest.raises(WebhookError, match="invalid URL") as caught:
        callback.target({"to": "abc"})
    assert caught.value.permanent


async def test_post_json_signs_the_exact_body_and_names_the_delivery(
    webhook: FakeWebhook, http: httpx.AsyncClient
) -> None:
    body = {"content": "héllo", "n": 1}
    target = WebhookTarget.parse(webhook.url("/hook"), token="t", signing_secret="s3cret")
    status = await post_json(http, target, body, delivery="d-1")
    unsigned = await post_json(http, WebhookTarget.parse(webhook.url("/plain")), body)
    assert status.status == 200
    assert not status.oversized
    assert unsigned.status == 200
    signed, plain = webhook.requests
    assert signed.headers[DELIVERY_HEADER.lower()] == "d-1"
    assert signed.headers["authorization"] == "Token t"
    assert signed.headers["content-type"] == "application/json"
    assert verify(signed, "s3cret")
    assert not verify(signed, "other")
    assert json.loads(signed.body) == body
    assert SIGNATURE_HEADER.lower() not in plain.headers
    assert DELIVERY_HEADER.lower() not in plain.headers


async def test_post_json_error_carries_the_status(
    webhook: FakeWebhook, http: httpx.AsyncClient
) -> None:
    webhook.fail_next(1, status=502)
    with pytest.raises(WebhookError, match="HTTP 502") as caught:
        await post_json(http, WebhookTarget.parse(webhook.url()), {})
    assert caught.value.status == 502
    assert not caught.value.permanent
    assert 'answered HTTP 502: \'{"error": "scripted"}\'' in caught.value.reason


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param("ftp://127.0.0.1/x", "unsupported protocol 'ftp://'", id="scheme"),
        pytest.param("http:///x", "missing an 'http://' or 'https://'", id="no-host"),
    ],
)
async def test_post_json_to_an_unusable_url_is_a_permanent_error(
    http: httpx.AsyncClient, url: str, reason: str
) -> None:
    with pytest.raises(WebhookError, match="cannot post") as unsupported:
        await post_json(http, WebhookTarget.parse(url), {})
    assert unsupported.value.permanent
    assert unsupported.value.status is None
    assert reason in unsupported.value.reason


async def test_both_clients_send_the_same_headers(webhook: FakeWebhook) -> None:
    """Receivers see no difference: httpx's default headers, Host, Content-Length, auth."""
    target = WebhookTarget.parse(webhook.url("/h"), token="t", signing_secret="s")
    async with WebhookClient(timeout=TIMEOUT, concurrency=1) as core:
        await post_json(core, target, {"a": 1}, delivery="d")
    async with httpx.AsyncClient() as plain:
        await post_json(plain, target, {"a": 1}, delivery="d")
    ours, theirs = webhook.requests
    assert ours.headers == theirs.headers
    assert ours.body == theirs.body
    assert ours.headers["host"] == f"127.0.0.1:{webhook.port}"
    assert ours.headers["user-agent"] == f"python-httpx/{httpx.__version__}"


async def test_basic_auth_from_the_url_wins_over_the_token(
    webhook: FakeWebhook, http: httpx.AsyncClient
) -> None:
    url = webhook.url("/b").replace("http://", "http://us%C3%A9r:p%40ss@")
    await post_json(http, WebhookTarget.parse(url, token="tok"), {})
    (request,) = webhook.requests
    credentials = base64.b64encode("usér:p@ss".encode()).decode()
    assert request.headers["authorization"] == f"Basic {credentials}"


async def test_redirects_are_not_followed(webhook: FakeWebhook, http: httpx.AsyncClient) -> None:
    webhook.fail_next(1, status=307)
    with pytest.raises(WebhookError, match="HTTP 307") as caught:
        await post_json(http, WebhookTarget.parse(webhook.url()), {})
    assert caught.value.status == 307
    assert len(webhook.requests) == 1


async def test_no_answer_within_the_timeout_is_a_transient_error(
    webhook: FakeWebhook, http: httpx.AsyncClient
) -> None:
    webhook.delay_path("/slow", math.inf)
    with trio.fail_after(3 * TIMEOUT), pytest.raises(WebhookError, match="ReadTimeout") as caught:
        await post_json(http, WebhookTarget.parse(webhook.url("/slow")), {})
    assert not caught.value.permanent
    # The connection is usable again afterwards (a fresh one replaces the timed-out one).
    assert (await post_json(http, WebhookTarget.parse(webhook.url("/fast")), {})).status == 200


async def test_nobody_listening_is_a_transient_error(
    http: httpx.AsyncClient,
) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(WebhookError, match="ConnectError") as caught:
            await post_json(http, WebhookTarget.parse(f"http://127.0.0.1:{port}/"), {})
    assert not caught.value.permanent
    assert caught.value.status is None


async def test_dropped_connection_is_a_transient_error(
    webhook: FakeWebhook, http: httpx.AsyncClient
) -> None:
    webhook.fail_next(1, status=DROP)
    with pytest.raises(WebhookError, match="RemoteProtocolError") as caught:
        await post_json(http, WebhookTarget.parse(webhook.url()), {})
    assert not caught.value.permanent


async def test_webhook_client_applies_environment_proxies(
    webhook: FakeWebhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As httpx does: with HTTP_PROXY set, requests go to the proxy (here the fake, which sees
    the absolute URL as the request target)."""
    monkeypatch.setenv("HTTP_PROXY", webhook.url())
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with WebhookClient(timeout=TIMEOUT, concurrency=1) as http:
        await post_json(http, WebhookTarget.parse("http://webhook.example/p"), {})
    (request,) = webhook.requests
    assert request.path == "http://webhook.example/p"


async def test_tls_to_a_plain_http_server_is_a_transient_error(
    webhook: FakeWebhook, http: httpx.AsyncClient
) -> None:
    with pytest.raises(WebhookError, match="ConnectError") as caught:
        await post_json(http, WebhookTarget.parse(webhook.url().replace("http:", "https:")), {})
    assert not caught.value.permanent
