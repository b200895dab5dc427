"""Errors a transport raises: SendError for one message, ConfigError for the whole channel.

TransportError
├── SendError(retryable, code)   one outbound message could not be handed to the provider
│   ├── ProviderRejected         the provider (or the transport) refused it for good
│   ├── ProviderThrottled        the provider asked us to slow down; retry later
│   ├── ConnectionFailed         the link to the provider is down; retry later
│   └── ResponseUnparseable      the provider answered something we cannot read
└── ConfigError                  the channel's configuration is unusable; a restart cannot help
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every error a transport raises on purpose."""


class SendError(TransportError):
    """One message was not sent. `retryable` says whether sending it again later may work."""

    retryable: bool = False

    def __init__(
        self, reason: str, *, code: str = "send_failed", retryable: bool | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        if retryable is not None:
            self.retryable = retryable


class ProviderRejected(SendError):  # noqa: N818 — names fixed by the transport contract
    retryable = False

    def __init__(self, reason: str, *, code: str = "rejected") -> None:
        super().__init__(reason, code=code)


class ProviderThrottled(SendError):  # noqa: N818 — names fixed by the transport contract
    retryable = True

    def __init__(self, reason: str, *, code: str = "throttled") -> None:
        super().__init__(reason, code=code)


class ConnectionFailed(SendError):  # noqa: N818 — names fixed by the transport contract
    retryable = True

    def __init__(self, reason: str, *, code: str = "connection_failed") -> None:
        super().__init__(reason, code=code)


class ResponseUnparseable(SendError):  # noqa: N818 — names fixed by the transport contract
    retryable = False

    def __init__(self, reason: str, *, code: str = "unparseable_response") -> None:
        super().__init__(reason, code=code)


class ConfigError(TransportError):
    """The channel cannot run as configured (bad config, unknown type, class that will not load)."""
