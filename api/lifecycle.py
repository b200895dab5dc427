"""Channel lifecycle requests to the supervisor, bounded in time and mapped to API errors."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import trio

from api.errors import (
    InvalidChannelConfigError,
    InvalidChannelTypeError,
    SupervisorUnavailableError,
)
from api.schemas import validate_channel_config
from api.supervisor_link import SupervisorUnreachableError
from ipc.errors import RemoteError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from api.supervisor_link import Catalog, SupervisorLink
    from ipc.settings import Settings

#: The supervisor gives a channel 15 s to become ready before it answers 503.
START_TIMEOUT = 20.0
CATALOG_TIMEOUT = 5.0
#: Beyond the shutdown grace, time for SIGKILL and the reply.
STOP_MARGIN = 10.0


@contextmanager
def _supervisor_errors(
    action: str, channel_id: str, seconds: float, *, missing_ok: bool = False
) -> Iterator[None]:
    """Bound a request; map failures to InvalidChannelConfigError (the channel refused its
    config) or SupervisorUnavailableError. With missing_ok, "unknown channel" is success."""
    try:
        with trio.fail_after(seconds):
            yield
    except RemoteError as exc:
        if missing_ok and exc.code == 404:
            return
        if exc.code == 400:
            raise InvalidChannelConfigError(exc.message) from exc
        raise SupervisorUnavailableError(
            f"could not {action} channel {channel_id}: {exc.error_type}: {exc.message}"
        ) from exc
    except SupervisorUnreachableError as exc:
        raise SupervisorUnavailableError(f"could not {action} channel {channel_id}: {exc}") from exc
    except trio.TooSlowError as exc:
        raise SupervisorUnavailableError(
            f"could not {action} channel {channel_id}: no answer within {seconds:.0f} s"
        ) from exc


async def start_channel(link: SupervisorLink, channel_id: str) -> None:
    """Start the channel, or restart it with its stored properties if it runs."""
    with _supervisor_errors("start", channel_id, START_TIMEOUT):
        await link.start_channel(channel_id)


async def stop_channel(link: SupervisorLink, settings: Settings, channel_id: str) -> None:
    # A channel the supervisor does not know is as stopped as it gets.
    seconds = settings.shutdown_grace + STOP_MARGIN
    with _supervisor_errors("stop", channel_id, seconds, missing_ok=True):
        await link.stop_channel(channel_id)


async def restart_channel(link: SupervisorLink, settings: Settings, channel_id: str) -> None:
    seconds = settings.shutdown_grace + STOP_MARGIN + START_TIMEOUT
    with _supervisor_errors("restart", channel_id, seconds):
        await link.restart_channel(channel_id)


async def catalog(link: SupervisorLink) -> Catalog:
    try:
        with trio.fail_after(CATALOG_TIMEOUT):
            return await link.catalog()
    except (RemoteError, SupervisorUnreachableError) as exc:
        raise SupervisorUnavailableError(f"could not get the channel types: {exc}") from exc
    except trio.TooSlowError as exc:
        raise SupervisorUnavailableError(
            f"could not get the channel types: no answer within {CATALOG_TIMEOUT:.0f} s"
        ) from exc


def check_type_and_config(known: Catalog, channel_type: object, config: object) -> None:
    """400 unless `channel_type` is in the catalog and `config` fits that type's schema."""
    if not isinstance(channel_type, str) or channel_type not in known:
        choices = ", ".join(sorted(known))
        raise InvalidChannelTypeError(
            f"Invalid channel type {channel_type!r}, must be one of: {choices}"
        )
    validate_channel_config(known[channel_type], config)
