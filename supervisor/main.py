"""The `junebug-supervisor` / `jb` command: parse config, set up logging, run the supervisor."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from typing import TYPE_CHECKING, Final

import trio

from ipc import exit_codes
from ipc.observability import configure_sentry, logging_disabled
from supervisor.config import ConfigError, load_config
from supervisor.run import run_supervisor

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ipc.settings import Settings

log = logging.getLogger("supervisor")

LOG_FORMAT: Final = "%(asctime)s [%(name)s] %(levelname)s: %(message)s"
#: As the original: the log file rotates at 1 MiB and keeps 5 old files.
LOG_FILE_BYTES: Final = 1024 * 1024
LOG_FILE_BACKUPS: Final = 5
#: Exit status after Ctrl-C before the signal handlers were installed (128 + SIGINT).
_EXIT_INTERRUPTED: Final = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    try:
        loaded = load_config(sys.argv[1:] if argv is None else argv)
        configure_logging(loaded.settings)
    except ConfigError as exc:
        sys.stderr.write(f"jb: error: {exc}\n")
        return exit_codes.EXIT_CONFIG
    if configure_sentry(loaded.settings, role="supervisor"):
        log.info("errors are reported to Sentry")
    for warning in loaded.warnings:
        log.warning("%s", warning)
    for line in describe_backend(loaded.settings):
        log.info("%s", line)
    try:
        return trio.run(run_supervisor, loaded.settings)
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED
    except Exception:  # process boundary: log the crash, exit 70
        log.critical("supervisor crashed", exc_info=True)
        return exit_codes.EXIT_SOFTWARE


def configure_logging(settings: Settings) -> None:
    """INFO to stdout (unless JUNEBUG_DISABLE_LOGGING is set) and to --log-file, rotated."""
    formatter = logging.Formatter(LOG_FORMAT)
    handlers: list[logging.Handler] = []
    if not logging_disabled():
        handlers.append(logging.StreamHandler(sys.stdout))
    if settings.logfile:
        try:
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    settings.logfile, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS
                )
            )
        except OSError as exc:
            raise ConfigError(f"cannot open log file {settings.logfile}: {exc.strerror}") from exc
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def describe_backend(settings: Settings) -> list[str]:
    """Where state and queues live, for the startup log; never includes a password."""
    lines = []
    if settings.redis is None:
        lines.append(f"state: embedded store in {settings.data_dir}")
    else:
        r = settings.redis
        prefix = f", key prefix {r.key_prefix!r}" if r.key_prefix else ""
        lines.append(f"state: Redis at {r.host}:{r.port} db {r.db}{prefix}")
    if settings.amqp is None:
        lines.append(f"queues: embedded, one file per channel in {settings.data_dir / 'queues'}")
    else:
        a = settings.amqp
        lines.append(f"queues: RabbitMQ at {a.hostname}:{a.port} vhost {a.vhost!r} as {a.username}")
    if settings.namespace:
        lines.append(f"namespace: {settings.namespace!r}")
    return lines
