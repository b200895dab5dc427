"""One webhook POST (mo_url, event_url, status_url): URL templates rendered, auth from the URL
and a token, delivery id and HMAC signature headers, errors mapped. The HTTP side (targets,
the client, reading answers) is channel_proc.webhook_client.

Answers are read up to a limit (`webhook_max_response_bytes`). A 2xx answer past the limit
still counts as delivered (the receiver accepted the body; its answer is not used), and is
flagged in the result so the caller can record and log it; any other answer is a failure
whatever its size.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import httpx

from channel_proc.templates import TemplateError, check_template, is_template, render
from channel_proc.webhook_client import WebhookClient as WebhookClient
from channel_proc.webhook_client import WebhookError as WebhookError
from channel_proc.webhook_client import WebhookTarget as WebhookTarget
from channel_proc.webhook_client import post

if TYPE_CHECKING:
    from collections.abc import Mapping

#: Stable across the retries of one delivery, so receivers can de-duplicate.
DELIVERY_HEADER: Final = "X-Junebug-Delivery"
#: "sha256=<hex HMAC-SHA256 of the exact body bytes>", keyed with the signing secret (UTF-8).
SIGNATURE_HEADER: Final = "X-Junebug-Signature"
#: The default of settings.webhook_max_response_bytes, for callers without settings.
MAX_RESPONSE_BYTES: Final = 65_536
_DELIVERY_NAME: Final = DELIVERY_HEADER.encode()
_SIGNATURE_NAME: Final = SIGNATURE_HEADER.encode()

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Callback:
    """A configured webhook: a URL or URL template (see channel_proc.templates), its token and
    the signing secret, turned into a WebhookTarget per request."""

    url: str
    token: str | None = None
    signing_secret: str | None = None

    @property
    def is_template(self) -> bool:
        return is_template(self.url)

    def check(self) -> None:
        """Raises WebhookError(permanent=True) when no request could ever use this URL: bad
        template syntax or placeholder, or a plain URL httpx cannot use. (A template may still
        render to an unusable URL for some values; `target` finds that out.)"""
        if self.is_template:
            try:
                check_template(self.url)
            except TemplateError as exc:
                raise WebhookError(f"invalid URL template: {exc.reason}", permanent=True) from exc
        else:
            WebhookTarget.parse(self.url)

    def target(self, values: Mapping[str, object]) -> WebhookTarget:
        """The URL rendered with `values` (URL-quoted), parsed.

        Raises:
            WebhookError(permanent=True): invalid template, or the result is not a usable URL.
        """
        url = self.url
        if self.is_template:
            try:
                url = render(self.url, values)
            except TemplateError as exc:
                raise WebhookError(f"invalid URL template: {exc.reason}", permanent=True) from exc
        return WebhookTarget.parse(url, self.token, self.signing_secret)


def safe_url(url: str) -> str:
    """`url` without its userinfo, for logs."""
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None))
    except httpx.InvalidURL:
        return "<invalid URL>"


def delivery_id(target: str, item_id: str) -> str:
    """The X-Junebug-Delivery of `item_id` (message or event id) to `target` (mo_url,
    event_url): the same for every retry, different per target."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{target}:{item_id}").hex


def signature(secret: str, body: bytes) -> str:
    """The X-Junebug-Signature of `body`."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def encode_body(body: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed (and signed); compact UTF-8 JSON, as httpx's `json=`."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class PostResult:
    """A 2xx answer; `oversized` when its body passed the limit (and was discarded)."""

    status: int
    oversized: bool = False


async def post_json(
    http: httpx.AsyncClient,
    target: WebhookTarget,
    body: Mapping[str, Any],
    *,
    delivery: str | None = None,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
) -> PostResult:
    """POST `body` as JSON with X-Junebug-Delivery `delivery` (when given) and, when the target
    has a signing secret, X-Junebug-Signature; read at most `max_response_bytes` of the answer.

    Raises:
        WebhookError: any other answer than a 2xx, or no answer (permanent for unusable URLs).
    """
    content = encode_body(body)
    headers: list[tuple[bytes, bytes]] = []
    if delivery is not None:
        headers.append((_DELIVERY_NAME, delivery.encode()))
    if target.signing_secret:
        headers.append((_SIGNATURE_NAME, signature(target.signing_secret, content).encode()))
    answer = await post(http, target, content, headers, max_response_bytes)
    too_long = f" (answer over {max_response_bytes} bytes, not read)" if answer.oversized else ""
    if 200 <= answer.status < 300:
        if answer.oversized:
            log.warning("%s answered HTTP %d%s", target.url, answer.status, too_long)
        return PostResult(answer.status, answer.oversized)
    text = answer.head.decode(answer.encoding, errors="replace")
    raise WebhookError(
        f"{target.url} answered HTTP {answer.status}: {text!r}{too_long}", status=answer.status
    )
