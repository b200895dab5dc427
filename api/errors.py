"""The API's errors and the one mapping from every failure to the response envelope.

    ApiError                         answered with its status, description and `type` name
    ├── JsonDecodeError              400 json decode error
    ├── BodyValidationError          400 api usage error (items of type "invalid_body")
    ├── ApiUsageError                400 api usage error
    ├── InvalidChannelTypeError      400 invalid channel type
    ├── InvalidChannelConfigError    400 invalid channel config (the channel process refused it)
    ├── MessageNotFoundError         400 message not found
    ├── MessageTooLongError          400 message too long
    ├── ChannelNotFoundError         404 channel not found
    ├── ChannelLimitError            409 too many channels (max_channels)
    ├── ManagementApiError           503 the RabbitMQ management interface failed
    └── SupervisorUnavailableError   503 the supervisor did not answer

ipc's StoreUnavailableError / BrokerUnavailableError become 503 and QueueFullError 429 here, once.
The `type` clients see is the original's class name (ChannelNotFound, not ...Error).
"""

from __future__ import annotations

import http
import json
import logging
from typing import TYPE_CHECKING, Any, ClassVar

from quart import Response, request
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.routing import RequestRedirect

from ipc.errors import BrokerUnavailableError, QueueFullError, StoreUnavailableError

if TYPE_CHECKING:
    from quart import Quart
    from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]


def envelope(
    status: int,
    description: str | None,
    result: object,
    *,
    headers: dict[str, str] | None = None,
) -> Response:
    """The response shape of behaviour 1.1: {status, code, description, result}, always JSON."""
    body = {
        "status": status,
        "code": http.HTTPStatus(status).phrase,
        "description": description,
        "result": result,
    }
    return Response(
        json.dumps(body),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_envelope(
    status: int,
    description: str | None,
    errors: list[JsonObject],
    *,
    headers: dict[str, str] | None = None,
) -> Response:
    return envelope(status, description, {"errors": errors}, headers=headers)


def _error_item(error: BaseException) -> JsonObject:
    return {"type": type(error).__name__, "message": str(error)}


class ApiError(Exception):
    """An expected failure answered with `status`, `description` and one error item."""

    status: ClassVar[int] = 400
    description: ClassVar[str] = "api usage error"
    error_type: ClassVar[str] = "ApiError"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def items(self) -> list[JsonObject]:
        return [{"type": self.error_type, "message": self.message}]

    def response(self) -> Response:
        return error_envelope(self.status, self.description, self.items())


class JsonDecodeError(ApiError):
    description = "json decode error"
    error_type = "JsonDecodeError"


class BodyValidationError(ApiError):
    """Body-schema failures; `items` are already in the invalid_body shape, sorted."""

    description = "api usage error"
    error_type = "invalid_body"

    def __init__(self, items: list[JsonObject]) -> None:
        super().__init__(items[0]["message"] if items else "")
        self._items = items

    def items(self) -> list[JsonObject]:
        return self._items


class ApiUsageError(ApiError):
    description = "api usage error"
    error_type = "ApiUsageError"


class InvalidChannelTypeError(ApiError):
    description = "invalid channel type"
    error_type = "InvalidChannelType"


class InvalidChannelConfigError(ApiError):
    description = "invalid channel config"
    error_type = "InvalidChannelConfig"


class MessageNotFoundError(ApiError):
    description = "message not found"
    error_type = "MessageNotFound"


class MessageTooLongError(ApiError):
    description = "message too long"
    error_type = "MessageTooLong"


class ChannelNotFoundError(ApiError):
    status = 404
    description = "channel not found"
    error_type = "ChannelNotFound"


class ChannelLimitError(ApiError):
    status = 409
    description = "too many channels"
    error_type = "ChannelLimitReached"


class ManagementApiError(ApiError):
    status = 503
    description = "rabbitmq management interface unavailable"
    error_type = "ManagementApiError"


class SupervisorUnavailableError(ApiError):
    status = 503
    description = "supervisor unavailable"
    error_type = "SupervisorUnavailable"


def http_error_response(error: HTTPException) -> Response:
    """Routing and protocol errors (404, 405, 308 slash redirect, 408, 413...) in the envelope.

    A 405 names the allowed methods in `Allow`, as HTTP requires (the original sent none).
    """
    code = error.code or 500
    name = error.name
    if isinstance(error, RequestRedirect):
        # The original (older werkzeug) had no description on redirects: keep its texts.
        item: JsonObject = {
            "code": code,
            "type": name,
            "message": f"{code} {name}: None",
            "new_url": error.new_url,
        }
        return error_envelope(code, None, [item], headers={"Location": error.new_url})
    description = error.description
    item = {"code": code, "type": name, "message": f"{code} {name}: {description}"}
    headers = None
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        headers = {"Allow": ", ".join(sorted(error.valid_methods))}
    return error_envelope(code, description, [item], headers=headers)


def _unavailable(error: Exception) -> Response:
    if isinstance(error, QueueFullError):
        status, description = 429, "queue full"
    elif isinstance(error, StoreUnavailableError):
        status, description = 503, "state store unavailable"
    else:
        status, description = 503, "queue broker unavailable"
    log.warning("answering %d: %s: %s", status, type(error).__name__, error)
    return error_envelope(
        status, description, [{"type": type(error).__name__, "message": str(error)}]
    )


def _api_error(error: ApiError) -> Response:
    return error.response()


def _generic_error(error: Exception) -> Response:
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=error)
    return error_envelope(
        500, "generic error", [{"type": type(error).__name__, "message": str(error)}]
    )


def register_error_handlers(app: Quart) -> None:
    """Every error kind gets the envelope; HTTPException is handled by the app class itself."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(StoreUnavailableError, _unavailable)
    app.register_error_handler(BrokerUnavailableError, _unavailable)
    app.register_error_handler(Exception, _generic_error)
