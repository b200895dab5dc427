"""Optional bearer-token authentication of every route but /health (settings.api_tokens).

No tokens configured means no authentication, as in Junebug. Tokens are compared in constant
time and never logged, echoed or put in an error message.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from quart import request

from api.queue_errors import UnauthorizedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from quart import Response

    from ipc.settings import Settings

#: Paths answered without a token: load balancers and the supervisor's probes use them.
OPEN_PATHS = frozenset({"/health", "/health/"})

_SCHEME = "bearer"


def token_matches(given: bytes, tokens: Sequence[bytes]) -> bool:
    """Whether `given` is one of `tokens`; every token is compared (in constant time each),
    so the time taken tells nothing about which one, or how much of one, matched."""
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token)
    return matched


def presented_token(authorization: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != _SCHEME or not token:
        return None
    return token.encode("utf-8", "surrogateescape")


def authenticator(settings: Settings) -> Callable[[], Awaitable[Response | None]] | None:
    """The app's before_request hook for `settings`, or None when no tokens are configured."""
    tokens = [token.get_secret_value().encode() for token in settings.api_tokens]
    if not tokens:
        return None

    async def require_token() -> Response | None:
        if request.path in OPEN_PATHS:
            return None
        given = presented_token(request.headers.get("Authorization"))
        if given is None:
            return UnauthorizedError(
                "This API needs an Authorization: Bearer <token> header"
            ).response()
        if not token_matches(given, tokens):
            return UnauthorizedError("The bearer token is not valid").response()
        return None

    return require_token
