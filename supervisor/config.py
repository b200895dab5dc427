"""The command line and YAML config file, merged into one `Settings`.

Precedence: Settings defaults < YAML file (-c) < flags actually given. Flags default to
"absent" (argparse.SUPPRESS), so an untouched flag never overrides the file (the
original's Q15), and booleans parse as booleans (Q16).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml
from pydantic import ValidationError

from ipc.settings import AmqpSettings, RedisSettings, Settings

if TYPE_CHECKING:
    from collections.abc import Sequence

log = logging.getLogger(__name__)

#: Settings accepted for compatibility whose feature is planned for a later issue
#: (setting -> issue); each one set gives a warning at startup.
NOT_IMPLEMENTED: dict[str, str] = {}

_TRUE = frozenset({"true", "yes", "y", "on", "1", "t"})
_FALSE = frozenset({"false", "no", "n", "off", "0", "f"})

# flag dest -> key inside the `redis:` / `amqp:` sections
_REDIS_FLAGS = {
    "redis_host": "host",
    "redis_port": "port",
    "redis_db": "db",
    "redis_password": "password",
}
_AMQP_FLAGS = {
    "amqp_host": "hostname",
    "amqp_vhost": "vhost",
    "amqp_port": "port",
    "amqp_user": "username",
    "amqp_password": "password",
}


class ConfigError(Exception):
    """Bad command line, config file or value; main prints it on one line and exits 78."""


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    settings: Settings
    #: Unknown keys, features not implemented yet: logged once logging is set up.
    warnings: tuple[str, ...]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/yes/no/1/0, got {text!r}")


def _mapping_item(text: str) -> tuple[str, str]:
    kind, sep, target = text.partition(":")
    if not sep or not kind.strip() or not target.strip():
        raise argparse.ArgumentTypeError(f"expected type:module:Class, got {text!r}")
    return kind.strip(), target.strip()


def _plugin(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {exc.msg}") from exc
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise argparse.ArgumentTypeError(f"a plugin must be a JSON object with a 'type': {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jb",
        description="Junebug: a messaging gateway managing text-messaging channels over HTTP.",
        argument_default=argparse.SUPPRESS,
    )
    add = p.add_argument
    add("-c", "--config", dest="config", help="YAML config file; flags given override it")
    add("-i", "--interface", help="interface to expose the API on (default localhost)")
    add("-p", "--port", type=int, help="port to expose the API on (default 8080; 0 = any)")
    add("-l", "--log-file", dest="logfile", help="also log to this file (rotated)")
    add("-sd", "--sentry-dsn", dest="sentry_dsn", help="report errors to this Sentry DSN")
    add("-redish", "--redis-host", dest="redis_host", help="Redis host; selects Redis")
    add("-redisp", "--redis-port", dest="redis_port", type=int, help="Redis port (6379)")
    add("-redisdb", "--redis-db", dest="redis_db", type=int, help="Redis database (0)")
    add("-redispass", "--redis-password", dest="redis_password", help="Redis password")
    add("-amqph", "--amqp-host", dest="amqp_host", help="RabbitMQ host; selects RabbitMQ")
    add("-amqpvh", "--amqp-vhost", dest="amqp_vhost", help="RabbitMQ vhost (/)")
    add("-amqpp", "--amqp-port", dest="amqp_port", type=int, help="RabbitMQ port (5672)")
    add("-amqpu", "--amqp-user", dest="amqp_user", help="RabbitMQ user (guest)")
    add("-amqppass", "--amqp-password", dest="amqp_password", help="RabbitMQ password")
    add(
        "-ittl",
        "--inbound-message-ttl",
        dest="inbound_message_ttl",
        type=int,
        help="seconds an inbound message can be replied to (600)",
    )
    add(
        "-ottl",
        "--outbound-message-ttl",
        dest="outbound_message_ttl",
        type=int,
        help="seconds events are accepted for a sent message (172800)",
    )
    add(
        "-aer",
        "--allow-expired-replies",
        dest="allow_expired_replies",
        type=parse_bool,
        nargs="?",
        const=True,
        metavar="BOOL",
        help="send replies to unknown/expired messages as new messages",
    )
    add(
        "-ch",
        "--channels",
        dest="channels",
        type=_mapping_item,
        action="append",
        metavar="TYPE:MODULE:CLASS",
        help="add a channel type (repeatable)",
    )
    add(
        "-rch",
        "--replace-channels",
        dest="replace_channels",
        type=parse_bool,
        nargs="?",
        const=True,
        metavar="BOOL",
        help="use only --channels / `channels`, not the built-in types",
    )
    add(
        "--routers",
        dest="routers",
        type=_mapping_item,
        action="append",
        metavar="TYPE:MODULE:CLASS",
        help="add a router type (repeatable)",
    )
    add(
        "--replace-routers",
        dest="replace_routers",
        type=parse_bool,
        nargs="?",
        const=True,
        metavar="BOOL",
        help="use only --routers / `routers`, not the built-in types",
    )
    add(
        "-pl",
        "--plugin",
        dest="plugins",
        type=_plugin,
        action="append",
        metavar="JSON",
        help="add a plugin, a JSON object with a 'type' (repeatable)",
    )
    add("-mw", "--metric-window", dest="metric_window", type=float, help="rate bucket seconds")
    add("-lp", "--logging-path", dest="logging_path", help="directory for channel logs")
    add("-lrs", "--log-rotate-size", dest="log_rotate_size", type=int, help="bytes per log")
    add("-mlf", "--max-log-files", dest="max_log_files", type=int, help="0 = unlimited")
    add("-ml", "--max-logs", dest="max_logs", type=int, help="max log entries per API call")
    add(
        "-rmi",
        "--rabbitmq-management-interface",
        dest="rabbitmq_management_interface",
        help="RabbitMQ management URL, for queue health",
    )
    # Ours.
    add("--data-dir", dest="data_dir", type=Path, help="embedded store and queue directory")
    add("--run-dir", dest="run_dir", type=Path, help="socket directory (default: a new /tmp/jb-*)")
    add("--api-workers", dest="api_workers", type=int, help="API worker processes (1)")
    add("--namespace", help="prefix for every store key and queue name ('')")
    add("--restart-intensity", dest="restart_intensity", type=int, help="restarts allowed (5)")
    add("--restart-period", dest="restart_period", type=float, help="... per seconds (30)")
    add("--shutdown-grace", dest="shutdown_grace", type=float, help="child drain seconds (10)")
    add(
        "--store-ride-through",
        dest="store_ride_through",
        type=float,
        help="seconds a channel waits out a Redis outage before restarting (5)",
    )
    add(
        "--broker-ride-through",
        dest="broker_ride_through",
        type=float,
        help="seconds a channel waits out a RabbitMQ outage before restarting (10)",
    )
    add("--webhook-max-age", dest="webhook_max_age", type=float, help="retry seconds (86400)")
    add("--webhook-timeout", dest="webhook_timeout", type=float, help="seconds per POST (10)")
    add("--max-channels", dest="max_channels", type=int, help="channels allowed (1000)")
    add(
        "--webhook-allowed-host",
        dest="webhook_allowed_hosts",
        action="append",
        help="host webhook URLs may use, or *.domain (repeatable; default: any host)",
    )
    add(
        "--webhook-concurrency",
        dest="webhook_concurrency",
        type=int,
        help="webhook POSTs in flight per queue (8; 1 is strictly ordered)",
    )
    add(
        "--webhook-max-response-bytes",
        dest="webhook_max_response_bytes",
        type=int,
        help="largest webhook answer read (65536)",
    )
    add(
        "--api-token",
        dest="api_tokens",
        action="append",
        help="bearer token the API accepts (repeatable; replaces the file's api_tokens)",
    )
    return p


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"config file {path} is not valid YAML: {detail}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping, not {type(data).__name__}")
    return data


def _section(
    name: str,
    file: dict[str, Any],
    flags: dict[str, Any],
    keys: dict[str, str],
    known: set[str],
    warnings: list[str],
) -> dict[str, Any] | None:
    """Merge one backend section per key (file then flags); None when it is not selected."""
    given = {keys[dest]: flags[dest] for dest in keys if dest in flags}
    if name not in file and not given:
        return None
    raw = file.get(name)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file: `{name}` must be a mapping")
    merged: dict[str, Any] = {}
    for key, value in raw.items():
        if key in known:
            merged[key] = value
        else:
            warnings.append(f"config file: unknown key {name}.{key} ignored")
    merged.update(given)
    return merged


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


def _check_ranges(s: Settings) -> None:
    problems = []
    if not 0 <= s.port <= 65535:
        problems.append(f"port {s.port} is not in 0-65535")
    for name, section in (("redis", s.redis), ("amqp", s.amqp)):
        if section is not None and not 1 <= section.port <= 65535:
            problems.append(f"{name}.port {section.port} is not in 1-65535")
    positive = {
        "inbound_message_ttl": s.inbound_message_ttl,
        "outbound_message_ttl": s.outbound_message_ttl,
        "metric_window": s.metric_window,
        "restart_period": s.restart_period,
        "webhook_max_age": s.webhook_max_age,
        "webhook_timeout": s.webhook_timeout,
        "api_workers": s.api_workers,
        "max_channels": s.max_channels,
        "webhook_concurrency": s.webhook_concurrency,
        "webhook_max_response_bytes": s.webhook_max_response_bytes,
    }
    problems += [f"{k} must be > 0, got {v}" for k, v in positive.items() if v <= 0]
    non_negative = {
        "restart_intensity": s.restart_intensity,
        "shutdown_grace": s.shutdown_grace,
        "store_ride_through": s.store_ride_through,
        "broker_ride_through": s.broker_ride_through,
        "max_log_files": s.max_log_files,
        "max_logs": s.max_logs,
        "log_rotate_size": s.log_rotate_size,
    }
    problems += [f"{k} must be >= 0, got {v}" for k, v in non_negative.items() if v < 0]
    for plugin in s.plugins:
        if not isinstance(plugin.get("type"), str):
            problems.append(f"plugin {json.dumps(plugin)} has no 'type'")
    if problems:
        raise ConfigError("; ".join(problems))


def load_config(argv: Sequence[str]) -> LoadedConfig:
    """Parse argv and the config file it names. Raises ConfigError (one line) on bad input."""
    flags = vars(build_parser().parse_args(list(argv)))
    warnings: list[str] = []
    config_path = flags.pop("config", None)
    file = _read_file(Path(config_path)) if config_path is not None else {}

    fields = set(Settings.model_fields)
    merged: dict[str, Any] = {}
    for key, value in file.items():
        if key in fields:
            merged[key] = value
        else:
            warnings.append(f"config file: unknown key {key!r} ignored")

    for name, keys, model in (
        ("redis", _REDIS_FLAGS, RedisSettings),
        ("amqp", _AMQP_FLAGS, AmqpSettings),
    ):
        merged.pop(name, None)
        section = _section(name, file, flags, keys, set(model.model_fields), warnings)
        if section is not None:
            merged[name] = section
        for dest in keys:
            flags.pop(dest, None)

    # Mapping flags replace the file's mapping (as the original); plugins are appended.
    for name in ("channels", "routers"):
        if name in flags:
            merged[name] = dict(flags.pop(name))
    if "plugins" in flags:
        file_plugins = merged.get("plugins") or []
        if not isinstance(file_plugins, list):
            raise ConfigError("config file: `plugins` must be a list")
        merged["plugins"] = [*file_plugins, *flags.pop("plugins")]
    merged.update(flags)

    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"invalid setting: {_one_line(exc)}") from exc
    _check_ranges(settings)

    if not settings.api_tokens and settings.interface not in _LOOPBACK:
        warnings.append(
            f"the API listens on {settings.interface} without authentication; "
            "set api_tokens (or --api-token) to require a bearer token"
        )
    for key, issue in NOT_IMPLEMENTED.items():
        if getattr(settings, key):
            warnings.append(f"{key} is accepted; not implemented yet ({issue})")
    return LoadedConfig(settings=settings, warnings=tuple(warnings))


def load_settings(argv: Sequence[str]) -> Settings:
    """`load_config` that logs its warnings; raises ConfigError on bad input."""
    loaded = load_config(argv)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    return loaded.settings
