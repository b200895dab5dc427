"""CLI of the channel process: `run --channel-id CID` and `describe`; exceptions -> exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

import trio
from pydantic import ValidationError

from channel_proc.lifecycle import Shutdown
from channel_proc.logs import configure_logging
from channel_proc.process import (
    ChannelMissingError,
    load_channel,
    record_config_error,
    run_channel_process,
)
from channel_proc.transports import available_transports, config_schemas
from channel_proc.transports.errors import ConfigError
from ipc.broker import open_broker
from ipc.errors import BrokerUnavailableError, StoreUnavailableError
from ipc.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, EXIT_UNAVAILABLE
from ipc.names import Namespace
from ipc.settings import Settings
from ipc.state import open_state

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

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
    codes: set[int] = set()
    try:
        await _run(settings, channel_id, redact.add_from)
    except* ConfigError as group:
        log.error("configuration error: %s", "; ".join(map(str, group.exceptions)))
        codes.add(EXIT_CONFIG)
    except* (StoreUnavailableError, BrokerUnavailableError) as group:
        log.error("state store or broker unavailable: %s", "; ".join(map(str, group.exceptions)))
        codes.add(EXIT_UNAVAILABLE)
    except* Exception as group:
        log.error("crashed", exc_info=group)
        codes.add(EXIT_SOFTWARE)
    for code in (EXIT_SOFTWARE, EXIT_CONFIG, EXIT_UNAVAILABLE):
        if code in codes:
            return code
    return EXIT_OK


async def _run(settings: Settings, channel_id: str, add_secrets: Callable[[object], None]) -> None:
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
            add_secrets(spec.raw_properties)
            await run_channel_process(
                spec,
                settings=settings,
                namespace=namespace,
                store=store,
                broker=broker,
                shutdown=Shutdown(settings.shutdown_grace),
            )
