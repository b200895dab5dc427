"""One webhook POST (mo_url, event_url, status_url): auth from the URL and a token, errors mapped.

WebhookError(permanent)   the POST did not get a 2xx answer
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from collections.abc import Mapping


class WebhookError(Exception):
    """A POST failed; `permanent` when sending it again cannot help (e.g. a malformed URL)."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """A URL with its userinfo taken out (sent as Basic auth) plus an optional token."""

    url: str
    basic_auth: tuple[str, str] | None = None
    token: str | None = None

    @classmethod
    def parse(cls, url: str, token: str | None = None) -> WebhookTarget:
        """Raises WebhookError(permanent=True) for a URL httpx cannot use."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise WebhookError(f"invalid URL: {exc}", permanent=True) from exc
        basic = None
        if parsed.username or parsed.password:
            basic = (parsed.username, parsed.password)
            parsed = parsed.copy_with(username=None, password=None)
        return cls(str(parsed), basic, token or None)

    @property
    def secrets(self) -> list[str]:
        """What must never be logged."""
        found = [self.token] if self.token else []
        if self.basic_auth is not None:
            found.append(self.basic_auth[1])
        return found


def safe_url(url: str) -> str:
    """`url` without its userinfo, for logs."""
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None))
    except httpx.InvalidURL:
        return "<invalid URL>"


async def post_json(
    http: httpx.AsyncClient, target: WebhookTarget, body: Mapping[str, Any]
) -> None:
    """POST `body` as JSON; return on a 2xx answer.

    Raises:
        WebhookError: any other answer, or no answer (permanent for unusable URLs).
    """
    headers = {"Authorization": f"Token {target.token}"} if target.token else {}
    # When both are set, Basic wins, as in the original (the auth flow replaces the header).
    auth = target.basic_auth or httpx.USE_CLIENT_DEFAULT
    try:
        response = await http.post(target.url, json=body, headers=headers, auth=auth)
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise WebhookError(f"cannot post to {target.url}: {exc}", permanent=True) from exc
    except httpx.TransportError as exc:
        detail = str(exc) or "no detail"
        raise WebhookError(f"post to {target.url} failed: {type(exc).__name__}: {detail}") from exc
    if not response.is_success:
        snippet = response.text[:200]
        raise WebhookError(f"{target.url} answered HTTP {response.status_code}: {snippet!r}")
