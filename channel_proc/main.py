"""CLI of the channel process: `run --channel-id CID` and `describe`; exceptions -> exit codes.

Also the process-wide observability: the channel log, Sentry (redacted like the log), and
the `broker` status component (channel_proc/broker_status.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from typing import TYPE_CHECKING

import trio
from pydantic import ValidationError

from channel_proc.broker_status import OutageReporter, broker_loss_reported, record_broker_up
from channel_proc.lifecycle import Shutdown
from channel_proc.logs import Redactor, configure_logging, redact_strings
from channel_proc.process import (
    ChannelMissingError,
    load_channel,
    record_config_error,
    run_channel_process,
)
from channel_proc.routers import available_routers, router_schemas
from channel_proc.routers.loading import load_routing
from channel_proc.routers.logs import attach_log_files
from channel_proc.transports import available_transports, config_schemas
from channel_proc.transports.errors import ConfigError
from channel_proc.webhook import WebhookError, WebhookTarget
from ipc.broker import open_broker
from ipc.errors import BrokerUnavailableError, StoreUnavailableError, leaf_exceptions
from ipc.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, EXIT_UNAVAILABLE
from ipc.names import Namespace
from ipc.observability import configure_sentry
from ipc.settings import Settings
from ipc.state import open_state

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sentry_sdk.types import Event, Hint


log = logging.getLogger("channel_proc")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m channel_proc")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one channel (started by junebug-supervisor)")
    run.add_argument("--channel-id", required=True)
    describe_cmd = commands.add_parser(
        "describe", help="print the config JSON Schema of every channel (and router) type"
    )
    describe_cmd.add_argument(
        "--format",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: {channel type: schema}; 2: {format: 2, channels: {...}, routers: {...}}",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except (KeyError, ValidationError) as exc:
        sys.stderr.write(f"channel_proc: bad settings: {exc}\n")
        return EXIT_CONFIG
    if args.command == "describe":
        return describe(settings, int(args.format))
    return trio.run(run_channel, settings, str(args.channel_id))


def describe(settings: Settings, output_format: int = 1) -> int:
    """Print {channel type: config JSON Schema} (format 1), or with the router types
    {"format": 2, "channels": {...}, "routers": {type: {config, destination_config}}};
    exit 78 if a custom type does not load."""
    try:
        schemas = config_schemas(available_transports(settings))
        routers = router_schemas(available_routers(settings)) if output_format == 2 else {}
    except ConfigError as exc:
        sys.stderr.write(f"channel_proc: {exc}\n")
        return EXIT_CONFIG
    if output_format == 2:
        document: dict[str, object] = {"format": 2, "channels": schemas, "routers": routers}
        sys.stdout.write(json.dumps(document) + "\n")
    else:
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
        log.error("configuration error: %s", "; ".join(map(str, leaf_exceptions(group))))
        codes.add(EXIT_CONFIG)
    except* (StoreUnavailableError, BrokerUnavailableError) as group:
        log.error(
            "state store or broker unavailable: %s", "; ".join(map(str, leaf_exceptions(group)))
        )
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
    async with (
        open_state(settings, namespace, ride_through=settings.store_ride_through) as store,
        trio.open_nursery() as nursery,
    ):
        await store.ping()
        outages = OutageReporter(store, settings, channel_id)
        nursery.start_soon(outages.run)
        async with (
            broker_loss_reported(store, settings, channel_id),
            open_broker(
                settings, ride_through=settings.broker_ride_through, on_outage=outages.note
            ) as broker,
        ):
            await broker.ping()
            await record_broker_up(store, settings, channel_id)
            try:
                spec = await load_channel(store, settings, channel_id)
                routing = await load_routing(store, settings, channel_id)
            except ChannelMissingError:
                # Writing a status would resurrect state for a deleted channel.
                raise
            except ConfigError as exc:
                await record_config_error(store, channel_id, str(exc))
                raise
            redact.add_from(spec.raw_properties)
            for key in ("mo_url", "status_url"):
                redact.add(url_secrets(spec.raw_properties.get(key)))
            if routing is not None:
                redact.add_from(routing.raw)
                for destination in routing.destinations.values():
                    redact.add_from(destination.raw)
                    redact.add(url_secrets(destination.raw.get("mo_url")))
                if routing.home:
                    attach_log_files(settings, routing, redact)
            # Startup's objects (modules, the channel type, its config) live as long as the
            # process: out of the collector's sight, a full collection no longer walks them
            # all, which took 20-35 ms of the event loop each time under load.
            gc.freeze()
            await run_channel_process(
                spec,
                settings=settings,
                namespace=namespace,
                store=store,
                broker=broker,
                shutdown=Shutdown(settings.shutdown_grace),
                routing=routing,
            )
        nursery.cancel_scope.cancel()
