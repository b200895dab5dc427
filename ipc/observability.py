"""Process-wide observability switches every role applies the same way: Sentry and
JUNEBUG_DISABLE_LOGGING (docs 1.4)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ipc.settings import Settings

DISABLE_LOGGING_ENV = "JUNEBUG_DISABLE_LOGGING"

_FALSE = frozenset({"", "0", "false", "no", "off"})


def logging_disabled(environ: dict[str, str] | None = None) -> bool:
    """True when JUNEBUG_DISABLE_LOGGING is set to anything but a false-ish value."""
    env = os.environ if environ is None else environ
    value = env.get(DISABLE_LOGGING_ENV)
    return value is not None and value.strip().lower() not in _FALSE


def configure_sentry(settings: Settings, *, role: str, channel_id: str | None = None) -> bool:
    """Send unhandled errors (and ERROR log records) to Sentry when `sentry_dsn` is set.

    Returns whether Sentry is active. The DSN itself is never logged.
    """
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        integrations=[LoggingIntegration(level=logging.INFO, event_level=logging.ERROR)],
        # No request bodies or local variables: they may carry message content and secrets.
        send_default_pii=False,
        include_local_variables=False,
        default_integrations=True,
    )
    sentry_sdk.set_tag("junebug.role", role)
    if channel_id is not None:
        sentry_sdk.set_tag("junebug.channel_id", channel_id)
    return True
