"""The API errors of queue control (issue 7) that need more than api.errors gives: headers.

ApiError
├── ChannelQueueFullError    429 queue full, with Retry-After
└── UnauthorizedError        401 unauthorized, with WWW-Authenticate: Bearer
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from api.errors import ApiError, error_envelope

if TYPE_CHECKING:
    from quart import Response


class ChannelQueueFullError(ApiError):
    """The channel's outbound queue holds its queue_limit or more: try again later."""

    status = 429
    description = "queue full"
    error_type = "QueueFull"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)

    def response(self) -> Response:
        return error_envelope(
            self.status,
            self.description,
            self.items(),
            headers={"Retry-After": str(self.retry_after)},
        )


class UnauthorizedError(ApiError):
    status = 401
    description = "unauthorized"
    error_type = "Unauthorized"

    def response(self) -> Response:
        return error_envelope(
            self.status, self.description, self.items(), headers={"WWW-Authenticate": "Bearer"}
        )
