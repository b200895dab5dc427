"""One webhook POST: delivery id and signature headers, URL templates, errors (fake receiver)."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import TYPE_CHECKING

import httpx
import pytest

from channel_proc.webhook import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    Callback,
    WebhookError,
    WebhookTarget,
    delivery_id,
    encode_body,
    post_json,
    signature,
)

if TYPE_CHECKING:
    from tests.fakes.webhook import FakeWebhook, RecordedRequest


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
    webhook: FakeWebhook,
) -> None:
    body = {"content": "héllo", "n": 1}
    target = WebhookTarget.parse(webhook.url("/hook"), token="t", signing_secret="s3cret")
    async with httpx.AsyncClient() as http:
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


async def test_post_json_error_carries_the_status(webhook: FakeWebhook) -> None:
    webhook.fail_next(1, status=502)
    async with httpx.AsyncClient() as http:
        with pytest.raises(WebhookError, match="HTTP 502") as caught:
            await post_json(http, WebhookTarget.parse(webhook.url()), {})
        assert caught.value.status == 502
        assert not caught.value.permanent
        with pytest.raises(WebhookError, match="cannot post") as unsupported:
            await post_json(http, WebhookTarget.parse("ftp://127.0.0.1/x"), {})
    assert unsupported.value.permanent
    assert unsupported.value.status is None
