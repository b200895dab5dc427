"""One webhook POST (mo_url, event_url, status_url): URL templates rendered, auth from the URL
and a token, delivery id and HMAC signature headers, errors mapped.

WebhookError(permanent, status)   the POST did not get a 2xx answer

Answers are streamed and read up to a limit (`webhook_max_response_bytes`), never buffered
whole: an answer past the limit is cut off and its connection closed. A 2xx answer past the
limit still counts as delivered (the receiver accepted the body; its answer is not used), and
is flagged in the result so the caller can record and log it; any other answer is a failure
whatever its size.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import httpx

from channel_proc.templates import TemplateError, check_template, is_template, render

if TYPE_CHECKING:
    from collections.abc import Mapping

#: Stable across the retries of one delivery, so receivers can de-duplicate.
DELIVERY_HEADER: Final = "X-Junebug-Delivery"
#: "sha256=<hex HMAC-SHA256 of the exact body bytes>", keyed with the signing secret (UTF-8).
SIGNATURE_HEADER: Final = "X-Junebug-Signature"
#: The default of settings.webhook_max_response_bytes, for callers without settings.
MAX_RESPONSE_BYTES: Final = 65_536
#: How much of a failed answer goes into the error reason.
SNIPPET_BYTES: Final = 200

log = logging.getLogger(__name__)


class WebhookError(Exception):
    """A POST failed; `permanent` when sending it again cannot help (e.g. a malformed URL);
    `status` is the HTTP status when there was an answer."""

    def __init__(self, reason: str, *, permanent: bool = False, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.status = status


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """A URL with its userinfo taken out (sent as Basic auth), an optional token and an optional
    signing secret."""

    url: str
    basic_auth: tuple[str, str] | None = None
    token: str | None = None
    signing_secret: str | None = None

    @classmethod
    def parse(
        cls, url: str, token: str | None = None, signing_secret: str | None = None
    ) -> WebhookTarget:
        """Raises WebhookError(permanent=True) for a URL httpx cannot use."""
        return _parse_target(url, token or None, signing_secret or None)

    @property
    def secrets(self) -> list[str]:
        """What must never be logged."""
        found = [self.token] if self.token else []
        if self.basic_auth is not None:
            found.append(self.basic_auth[1])
        if self.signing_secret:
            found.append(self.signing_secret)
        return found


@functools.lru_cache(maxsize=1024)
def _parse_target(url: str, token: str | None, signing_secret: str | None) -> WebhookTarget:
    # Cached: most deliveries go to the same few URLs, and parsing one costs ~0.2 ms, a fair
    # part of a delivery's CPU time. Targets are immutable; failures are not cached.
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise WebhookError(f"invalid URL: {exc}", permanent=True) from exc
    basic = None
    if parsed.username or parsed.password:
        basic = (parsed.username, parsed.password)
        parsed = parsed.copy_with(username=None, password=None)
    return WebhookTarget(str(parsed), basic, token, signing_secret)


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


def pool_limits(concurrency: int) -> httpx.Limits:
    """Connection-pool limits for a channel process whose forwarders each keep up to
    `concurrency` POSTs in flight per queue: no cap on connections (each delivery is bounded
    by the lane), and enough kept alive that steady traffic reuses them."""
    return httpx.Limits(max_connections=None, max_keepalive_connections=max(20, 4 * concurrency))


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
    headers = {"Content-Type": "application/json"}
    if target.token:
        headers["Authorization"] = f"Token {target.token}"
    if delivery is not None:
        headers[DELIVERY_HEADER] = delivery
    if target.signing_secret:
        headers[SIGNATURE_HEADER] = signature(target.signing_secret, content)
    # When both are set, Basic wins, as in the original (the auth flow replaces the header).
    auth = target.basic_auth or httpx.USE_CLIENT_DEFAULT
    try:
        async with http.stream(
            "POST", target.url, content=content, headers=headers, auth=auth
        ) as response:
            head, oversized = await _read(response, max_response_bytes)
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise WebhookError(f"cannot post to {target.url}: {exc}", permanent=True) from exc
    except httpx.TransportError as exc:
        detail = str(exc) or "no detail"
        raise WebhookError(f"post to {target.url} failed: {type(exc).__name__}: {detail}") from exc
    too_long = f" (answer over {max_response_bytes} bytes, not read)" if oversized else ""
    if response.is_success:
        if oversized:
            log.warning("%s answered HTTP %d%s", target.url, response.status_code, too_long)
        return PostResult(response.status_code, oversized)
    text = head.decode(response.encoding or "utf-8", errors="replace")
    raise WebhookError(
        f"{target.url} answered HTTP {response.status_code}: {text!r}{too_long}",
        status=response.status_code,
    )


async def _read(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The answer's first SNIPPET_BYTES bytes as sent (a compressed answer is not inflated),
    and whether it is longer than `limit` bytes; nothing past the limit is read.

    An answer read whole lets its connection go back to the pool; a longer one is not read
    at all when its Content-Length says so (closing the response drops the connection), and
    cut off at the limit otherwise.
    """
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return b"", True
    head = bytearray()
    seen = 0
    async for chunk in response.aiter_raw():
        seen += len(chunk)
        if len(head) < SNIPPET_BYTES:
            head += chunk[: SNIPPET_BYTES - len(head)]
        if seen > limit:
            return bytes(head), True
    return bytes(head), False
