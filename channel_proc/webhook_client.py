"""The HTTP side of a webhook POST: targets, the channel process's client, and answers read
up to a limit.

WebhookError(permanent, status)   the POST did not get a 2xx answer

The channel process's client is a WebhookClient: an httpx.AsyncClient whose webhook POSTs
(`post`) skip httpx's client layers (URL merging, header models, cookies, the auth flow, event
hooks: none of them used here, and a third of a POST's CPU time) and go straight to a pool of
h11 connections (channel_proc/h11_pool.py), with each target's URL, Host and auth headers
worked out once and each request sent in one write. What goes on the wire is what httpx
sends: the same headers, no redirects followed, the same timeouts and TLS trust (httpx's
certifi context, SSL_CERT_FILE/SSL_CERT_DIR). With a proxy named in the environment
(HTTP_PROXY and friends) it POSTs the way any httpx.AsyncClient does, which applies them;
`post` also takes a plain httpx.AsyncClient.

Answers are streamed and read up to a limit, never buffered whole: an answer past the limit
is cut off and its connection closed.
"""

from __future__ import annotations

import base64
import codecs
import email.message
import functools
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import httpx

from channel_proc import h11_pool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from types import TracebackType

#: How much of a failed answer goes into the error reason.
SNIPPET_BYTES: Final = 200


#: The headers an httpx.AsyncClient adds to every request (no brotli or zstandard installed),
#: sent the same by WebhookClient, so receivers see no change.
_CLIENT_HEADERS: Final = (
    (b"Accept", b"*/*"),
    (b"Accept-Encoding", b"gzip, deflate"),
    (b"Connection", b"keep-alive"),
    (b"User-Agent", f"python-httpx/{httpx.__version__}".encode("ascii")),
)


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


def pool_limits(concurrency: int) -> httpx.Limits:
    """Connection-pool limits for a channel process whose forwarders each keep up to
    `concurrency` POSTs in flight per queue: no cap on connections (each delivery is bounded
    by the lane), and enough kept alive that steady traffic reuses them."""
    return httpx.Limits(max_connections=None, max_keepalive_connections=max(20, 4 * concurrency))


class WebhookClient(httpx.AsyncClient):
    """The channel process's HTTP client: an httpx.AsyncClient (`timeout` bounds each phase:
    connect, send, wait for a connection, each read) whose webhook POSTs (post_json) go
    through its own h11 pool; `concurrency` is settings.webhook_concurrency (see
    pool_limits). With proxies in the environment, post_json uses httpx's client path, which
    applies them (and NO_PROXY) as before."""

    def __init__(self, *, timeout: float, concurrency: int) -> None:
        limits = pool_limits(concurrency)
        super().__init__(timeout=timeout, limits=limits)
        self._direct: h11_pool.ConnectionPool | None = None
        if not _environment_proxies():
            self._direct = h11_pool.ConnectionPool(
                ssl_context=httpx.create_ssl_context(),
                timeout=timeout,
                max_idle=limits.max_keepalive_connections or 1,
            )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        try:
            if self._direct is not None:
                await self._direct.aclose()
        finally:
            await super().__aexit__(exc_type, exc_value, traceback)

    async def aclose(self) -> None:
        try:
            if self._direct is not None:
                await self._direct.aclose()
        finally:
            await super().aclose()

    async def _post_webhook(
        self, target: WebhookTarget, content: bytes, headers: list[tuple[bytes, bytes]], limit: int
    ) -> Answer:
        """One POST of `content` with `headers` (besides the target's own), reading at most
        `limit` bytes of the answer.

        Raises:
            WebhookError: no answer (permanent for unusable URLs).
        """
        if self._direct is None:
            return await _post_httpx(self, target, content, headers, limit)
        origin, path, head = _wire(target.url, target.token, target.basic_auth)
        try:
            response = await self._direct.post(
                origin,
                path,
                [*head, (b"Content-Length", str(len(content)).encode()), *headers],
                content,
            )
            try:
                return await _read_answer(response, limit)
            finally:
                await response.aclose()
        except h11_pool.UnsupportedProtocol as exc:
            raise WebhookError(f"cannot post to {target.url}: {exc}", permanent=True) from exc
        except h11_pool.HTTPError as exc:
            raise _transport_error(target, exc) from exc


def _environment_proxies() -> bool:
    """Whether an httpx client would send some requests through a proxy (see
    httpx's get_environment_proxies)."""
    proxies = urllib.request.getproxies()
    if any(host.strip() == "*" for host in proxies.get("no", "").split(",")):
        return False
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


@functools.lru_cache(maxsize=1024)
def _wire(
    url: str, token: str | None, basic_auth: tuple[str, str] | None
) -> tuple[h11_pool.Origin, bytes, tuple[tuple[bytes, bytes], ...]]:
    """The origin, request target and fixed headers (Host, httpx's defaults, auth) of a
    target: cached, as working them out is a fair part of a POST's CPU time.

    Raises:
        WebhookError(permanent=True): not a URL, or one without scheme or host.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise WebhookError(f"cannot post to {url}: {exc}", permanent=True) from exc
    if parsed.is_relative_url:
        # What httpx's client says of a URL without scheme or host (it would merge it with
        # a base URL, and there is none).
        missing = "Request URL is missing an 'http://' or 'https://' protocol."
        raise WebhookError(f"cannot post to {url}: {missing}", permanent=True)
    head = [(b"Host", parsed.netloc), *_CLIENT_HEADERS, (b"Content-Type", b"application/json")]
    if basic_auth is not None:
        # When both are set, Basic wins, as in the original (httpx's auth flow replaced the
        # header).
        user, password = (part.encode("utf-8") for part in basic_auth)
        head.append((b"Authorization", b"Basic " + base64.b64encode(user + b":" + password)))
    elif token:
        head.append((b"Authorization", f"Token {token}".encode()))
    scheme = parsed.scheme
    port = parsed.port or {"http": 80, "https": 443}.get(scheme, 0)
    origin = h11_pool.Origin(scheme, parsed.raw_host.decode("ascii"), port)
    return origin, parsed.raw_path, tuple(head)


@dataclass(frozen=True, slots=True)
class Answer:
    """What a webhook POST needs of an answer: its status, first SNIPPET_BYTES bytes, whether it
    passed the size limit, and its charset."""

    status: int
    head: bytes
    oversized: bool
    encoding: str


def _transport_error(target: WebhookTarget, exc: Exception) -> WebhookError:
    # httpx's exceptions and the h11 pool's carry httpcore's names (ConnectError, ReadTimeout,
    # ...): one wording.
    detail = str(exc) or "no detail"
    return WebhookError(f"post to {target.url} failed: {type(exc).__name__}: {detail}")


async def _post_httpx(
    http: httpx.AsyncClient,
    target: WebhookTarget,
    content: bytes,
    headers: list[tuple[bytes, bytes]],
    limit: int,
) -> Answer:
    all_headers = [(b"Content-Type", b"application/json"), *headers]
    if target.token:
        all_headers.append((b"Authorization", f"Token {target.token}".encode()))
    # When both are set, Basic wins, as in the original (the auth flow replaces the header).
    auth = target.basic_auth or httpx.USE_CLIENT_DEFAULT
    try:
        async with http.stream(
            "POST", target.url, content=content, headers=all_headers, auth=auth
        ) as response:
            length = response.headers.get("content-length")
            head, oversized = await _read(length, response.aiter_raw(), limit)
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise WebhookError(f"cannot post to {target.url}: {exc}", permanent=True) from exc
    except httpx.TransportError as exc:
        raise _transport_error(target, exc) from exc
    return Answer(response.status_code, head, oversized, response.encoding or "utf-8")


async def _read_answer(response: h11_pool.Response, limit: int) -> Answer:
    # The two headers wanted (h11 gives names in lower case; a repeated header: its last).
    wanted = {b"content-length": "", b"content-type": ""}
    for name, value in response.headers:
        if name in wanted:
            wanted[name] = value.decode("latin-1")
    length, content_type = wanted[b"content-length"], wanted[b"content-type"]
    head, oversized = await _read(length, response.body(), limit)
    return Answer(response.status, head, oversized, _charset(content_type))


def _charset(content_type: str) -> str:
    """The answer's charset as httpx finds it (Content-Type, else UTF-8)."""
    if not content_type:
        return "utf-8"
    message = email.message.Message()
    message["content-type"] = content_type
    charset = message.get_content_charset(failobj=None)
    if charset is None:
        return "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        return "utf-8"
    return charset


async def _read(length: str | None, chunks: AsyncIterator[bytes], limit: int) -> tuple[bytes, bool]:
    """The answer's first SNIPPET_BYTES bytes as sent (a compressed answer is not inflated),
    and whether it is longer than `limit` bytes; nothing past the limit is read.

    An answer read whole lets its connection go back to the pool; a longer one is not read
    at all when its Content-Length says so (closing the response drops the connection), and
    cut off at the limit otherwise.
    """
    if length is not None and length.isdigit() and int(length) > limit:
        return b"", True
    head = bytearray()
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if len(head) < SNIPPET_BYTES:
            head += chunk[: SNIPPET_BYTES - len(head)]
        if seen > limit:
            return bytes(head), True
    return bytes(head), False


async def post(
    http: httpx.AsyncClient,
    target: WebhookTarget,
    content: bytes,
    headers: list[tuple[bytes, bytes]],
    limit: int,
) -> Answer:
    """POST `content` (JSON) to `target` with `headers` besides the target's own, reading at
    most `limit` bytes of the answer; through a WebhookClient's own pool when `http` is one.

    Raises:
        WebhookError: no answer (permanent for unusable URLs).
    """
    if isinstance(http, WebhookClient):
        return await http._post_webhook(target, content, headers, limit)
    return await _post_httpx(http, target, content, headers, limit)
