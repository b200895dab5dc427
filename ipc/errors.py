"""Errors that cross process boundaries or come out of the ipc adapters.

JunebugIpcError
├── ProtocolError          a frame or message could not be decoded; the connection is closed
├── ConnectionClosedError  the peer went away mid-request
├── RemoteError            the peer answered a request with ErrorReply (boxed type + message)
└── BackendUnavailableError     a backend failed (`unreachable`: it refused the connection)
    ├── StoreUnavailableError   the state store (Redis / embedded) cannot be reached or written
    └── BrokerUnavailableError  the queue broker (RabbitMQ / embedded) cannot be reached or written
        ├── ConsumerLostError   a consumer's connection closed under it (open a new one)
        └── QueueFullError      the queue refused a message (backpressure)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


class JunebugIpcError(Exception):
    """Base of every error raised by the ipc package."""


class ProtocolError(JunebugIpcError):
    pass


class ConnectionClosedError(JunebugIpcError):
    pass


class RemoteError(JunebugIpcError):
    """The remote side failed a request; `error_type` names its exception class or error code."""

    def __init__(self, error_type: str, message: str, *, code: int = 500) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.code = code


class BackendUnavailableError(JunebugIpcError):
    """`unreachable`: the backend refused or dropped the connection (restarting, failing
    over), so the same call may well succeed a moment later; otherwise it answered with an
    error, did not answer in time, or cannot be written."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class StoreUnavailableError(BackendUnavailableError):
    pass


class BrokerUnavailableError(BackendUnavailableError):
    pass


class ConsumerLostError(BrokerUnavailableError):
    """The consumer's channel or connection closed under it while the broker may come back
    (raised only by a broker that rides out outages): its unacked deliveries go back to the
    queue, and a new consumer gets them again."""


class QueueFullError(BrokerUnavailableError):
    pass


def leaf_exceptions(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, depth first; `exc` if not a group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaf_exceptions(inner)
    else:
        yield exc
