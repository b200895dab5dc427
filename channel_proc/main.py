"""CLI of the channel process: `run --channel-id CID` and `describe`; exceptions -> exit codes.

Also the process-wide observability: the channel log, Sentry (redacted like the log).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

import trio
from pydantic import ValidationError

from channel_proc.lifecycle import Shutdown
from channel_proc.logs import Redactor, configure_logging, redact_strings
from channel_proc.process import (
    ChannelMissingError,
    load_channel,
    record_config_error,
    run_channel_process,
)
from channel_proc.transports import available_transports, config_schemas
from channel_proc.transports.errors import ConfigError
from channel_proc.webhook import WebhookError, WebhookTarget
from ipc.broker import open_broker
from ipc.errors import BrokerUnavailableError, StoreUnavailableError
from ipc.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, EXIT_UNAVAILABLE
from ipc.names import Namespace
from ipc.observability import configure_sentry
from ipc.settings import Settings
from ipc.state import open_state

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from sentry_sdk.types import Event, Hint

log = logging.getLogger("channel_proc")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m channel_proc")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one channel (started by junebug-supervisor)")
    run.add_argument("--channel-id", required=True)
    commands.add_parser("describe", help="print the config JSON Schema of every channel type")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except (KeyError, ValidationError) as exc:
        sys.stderr.write(f"channel_proc: bad settings: {exc}\n")
        return EXIT_CONFIG
    if args.command == "describe":
        return describe(settings)
    return trio.run(run_channel, settings, str(args.channel_id))


def describe(settings: Settings) -> int:
    """Print {channel type: config JSON Schema}; exit 78 if a custom type does not load."""
    try:
        schemas = config_schemas(available_transports(settings))
    except ConfigError as exc:
        sys.stderr.write(f"channel_proc: {exc}\n")
        return EXIT_CONFIG
    sys.stdout.write(json.dumps(schemas) + "\n")
    return EXIT_OK


async def run_channel(settings: Settings, channel_id: str) -> int:
    """Run the channel until asked to stop; the exit code says why it ended."""
    try:
        redact = configure_logging(settings, channel_id)
    except OSError as exc:
        sys.stderr.write(f"channel_proc: cannot open the channel log: {exc}\n")
        return EXIT_CONFIG
    _start_sentry(settings, channel_id, redact)
    codes: set[int] = set()
    try:
        await _run(settings, channel_id, redact)
    except* ConfigError as group:
        log.error("configuration error: %s", "; ".join(map(str, group.exceptions)))
        codes.add(EXIT_CONFIG)
    except* (StoreUnavailableError, BrokerUnavailableError) as group:
        log.error("state store or broker unavailable: %s", "; ".join(map(str, group.exceptions)))
        codes.add(EXIT_UNAVAILABLE)
    except* Exception as group:
        # One entry per error, so that each shows its own class and traceback in the logs.
        for error in leaf_exceptions(group):
            log.error("crashed: %s: %s", type(error).__name__, error, exc_info=error)
        codes.add(EXIT_SOFTWARE)
    for code in (EXIT_SOFTWARE, EXIT_CONFIG, EXIT_UNAVAILABLE):
        if code in codes:
            return code
    return EXIT_OK


def leaf_exceptions(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, depth first."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaf_exceptions(inner)
    else:
        yield exc


def _start_sentry(settings: Settings, channel_id: str, redact: Redactor) -> None:
    """Report errors to Sentry when `sentry_dsn` is set, redacted like the channel log."""
    if not configure_sentry(settings, role="channel", channel_id=channel_id):
        return
    import sentry_sdk

    def scrub(event: Event, hint: Hint) -> Event:
        scrubbed: Event = redact_strings(event, redact)
        return scrubbed

    sentry_sdk.get_global_scope().add_event_processor(scrub)


def url_secrets(url: object) -> list[str]:
    """The password in a URL's userinfo (sent as Basic auth, never to be logged)."""
    if not isinstance(url, str) or not url:
        return []
    try:
        return WebhookTarget.parse(url).secrets
    except WebhookError:
        return []


async def _run(settings: Settings, channel_id: str, redact: Redactor) -> None:
    namespace = Namespace(settings.namespace)
    async with open_state(settings, namespace) as store:
        await store.ping()
        async with open_broker(settings) as broker:
            await broker.ping()
            try:
                spec = await load_channel(store, settings, channel_id)
            except ChannelMissingError:
                # Writing a status would resurrect state for a deleted channel.
                raise
            except ConfigError as exc:
                await record_config_error(store, channel_id, str(exc))
                raise
            redact.add_from(spec.raw_properties)
            for key in ("mo_url", "status_url"):
                redact.add(url_secrets(spec.raw_properties.get(key)))
            await run_channel_process(
                spec,
                settings=settings,
                namespace=namespace,
                store=store,
                broker=broker,
                shutdown=Shutdown(settings.shutdown_grace),
            )
