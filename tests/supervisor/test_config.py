"""Command line + YAML file -> Settings: every flag, precedence, backend selection, errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ipc import exit_codes
from ipc.settings import AmqpSettings, RedisSettings, Settings
from supervisor.config import ConfigError, load_config, load_settings
from supervisor.main import describe_backend, main

if TYPE_CHECKING:
    from collections.abc import Callable


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def _get(settings: Settings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


RMI = "http://rabbit:15672"

# (short, long, value given, settings attribute, expected)
FLAGS: list[tuple[str, str, str, str, Any]] = [
    ("-i", "--interface", "0.0.0.0", "interface", "0.0.0.0"),
    ("-p", "--port", "9000", "port", 9000),
    ("-l", "--log-file", "/var/log/jb.log", "logfile", "/var/log/jb.log"),
    ("-sd", "--sentry-dsn", "https://k@sentry/1", "sentry_dsn", "https://k@sentry/1"),
    ("-redish", "--redis-host", "redis.local", "redis.host", "redis.local"),
    ("-redisp", "--redis-port", "6380", "redis.port", 6380),
    ("-redisdb", "--redis-db", "3", "redis.db", 3),
    ("-amqph", "--amqp-host", "rabbit.local", "amqp.hostname", "rabbit.local"),
    ("-amqpvh", "--amqp-vhost", "/jb", "amqp.vhost", "/jb"),
    ("-amqpp", "--amqp-port", "5673", "amqp.port", 5673),
    ("-amqpu", "--amqp-user", "junebug", "amqp.username", "junebug"),
    ("-ittl", "--inbound-message-ttl", "60", "inbound_message_ttl", 60),
    ("-ottl", "--outbound-message-ttl", "120", "outbound_message_ttl", 120),
    ("-aer", "--allow-expired-replies", "yes", "allow_expired_replies", True),
    ("-ch", "--channels", "sms:my.mod:SmsTransport", "channels", {"sms": "my.mod:SmsTransport"}),
    ("-rch", "--replace-channels", "true", "replace_channels", True),
    ("--routers", "--routers", "kw:my.routers.Keyword", "routers", {"kw": "my.routers.Keyword"}),
    ("--replace-routers", "--replace-routers", "1", "replace_routers", True),
    ("-pl", "--plugin", '{"type": "my.P", "a": 1}', "plugins", [{"type": "my.P", "a": 1}]),
    ("-mw", "--metric-window", "2.5", "metric_window", 2.5),
    ("-lp", "--logging-path", "/tmp/jblogs", "logging_path", "/tmp/jblogs"),
    ("-lrs", "--log-rotate-size", "2048", "log_rotate_size", 2048),
    ("-mlf", "--max-log-files", "0", "max_log_files", 0),
    ("-ml", "--max-logs", "7", "max_logs", 7),
    ("-rmi", "--rabbitmq-management-interface", RMI, "rabbitmq_management_interface", RMI),
    ("--data-dir", "--data-dir", "/srv/jb", "data_dir", Path("/srv/jb")),
    ("--run-dir", "--run-dir", "/tmp/jbrun", "run_dir", Path("/tmp/jbrun")),
    ("--api-workers", "--api-workers", "3", "api_workers", 3),
    ("--namespace", "--namespace", "gw2", "namespace", "gw2"),
    ("--restart-intensity", "--restart-intensity", "2", "restart_intensity", 2),
    ("--restart-period", "--restart-period", "5", "restart_period", 5.0),
    ("--shutdown-grace", "--shutdown-grace", "3", "shutdown_grace", 3.0),
    ("--store-ride-through", "--store-ride-through", "0", "store_ride_through", 0.0),
    ("--broker-ride-through", "--broker-ride-through", "2.5", "broker_ride_through", 2.5),
    ("--webhook-max-age", "--webhook-max-age", "60", "webhook_max_age", 60.0),
    ("--webhook-timeout", "--webhook-timeout", "2", "webhook_timeout", 2.0),
]


@pytest.mark.parametrize("form", ["short", "long"])
@pytest.mark.parametrize(("short", "long", "given", "attr", "expected"), FLAGS, ids=lambda v: v)
def test_config_every_flag(
    form: str, short: str, long: str, given: str, attr: str, expected: object
) -> None:
    flag = short if form == "short" else long
    assert _get(load_settings([flag, given]), attr) == expected


@pytest.mark.parametrize("flag", ["-redispass", "--redis-password"])
def test_config_redis_password_flag(flag: str) -> None:
    redis = load_settings([flag, "s3cret"]).redis
    assert redis is not None
    assert redis.password is not None
    assert redis.password.get_secret_value() == "s3cret"


@pytest.mark.parametrize("flag", ["-amqppass", "--amqp-password"])
def test_config_amqp_password_flag(flag: str) -> None:
    amqp = load_settings([flag, "s3cret"]).amqp
    assert amqp is not None
    assert amqp.password.get_secret_value() == "s3cret"


def test_config_defaults_are_the_settings_defaults() -> None:
    assert load_settings([]) == Settings()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-rch", "false"], False),
        (["--replace-channels", "no"], False),
        (["-rch", "0"], False),
        (["-rch", "FALSE"], False),
        (["-rch", "yes"], True),
        (["-rch"], True),
        ([], False),
    ],
)
def test_config_replace_channels_is_a_real_boolean(argv: list[str], expected: bool) -> None:
    assert load_settings(argv).replace_channels is expected


def test_config_bare_allow_expired_replies_flag_is_true() -> None:
    assert load_settings(["-aer"]).allow_expired_replies is True


def test_config_file_allow_expired_replies_kept_without_the_flag(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "allow_expired_replies: true\n")
    assert load_settings(["-c", path]).allow_expired_replies is True
    assert load_settings(["-c", path, "-aer", "false"]).allow_expired_replies is False


def test_config_flags_override_file_and_file_overrides_defaults(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "port: 9001\ninterface: 0.0.0.0\nmetric_window: 3\n")
    settings = load_settings(["--config", path, "-p", "9002"])
    assert settings.port == 9002
    assert settings.interface == "0.0.0.0"
    assert settings.metric_window == 3.0
    assert settings.inbound_message_ttl == 600


def test_config_redis_merged_per_key(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "redis:\n  host: r1\n  port: 1234\n  db: 2\n  key_prefix: jb\n")
    settings = load_settings(["-c", path, "-redisp", "5555"])
    assert settings.redis == RedisSettings(host="r1", port=5555, db=2, key_prefix="jb")


def test_config_amqp_merged_per_key(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "amqp:\n  hostname: q1\n  vhost: /v\n  username: u\n")
    amqp = load_settings(["-c", path, "-amqpu", "other", "-amqpp", "5999"]).amqp
    assert amqp == AmqpSettings(hostname="q1", vhost="/v", username="other", port=5999)


@pytest.mark.parametrize(
    ("file", "argv", "backend"),
    [
        ("", [], "embedded"),
        ("redis:\n", [], "redis+embedded-queue"),
        ("redis: {host: h}\n", [], "redis+embedded-queue"),
        ("", ["-redisdb", "1"], "redis+embedded-queue"),
        ("amqp: {}\n", [], "embedded-store+rabbitmq"),
        ("", ["-amqpvh", "/x"], "embedded-store+rabbitmq"),
        ("redis: {}\n", ["-amqph", "q"], "redis+rabbitmq"),
        ("port: 1\n", [], "embedded"),
    ],
)
def test_config_backend_selection(tmp_path: Path, file: str, argv: list[str], backend: str) -> None:
    path = _yaml(tmp_path, file)
    assert load_settings(["-c", path, *argv]).backend_name == backend


def test_config_channels_flags_replace_the_file_mapping(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "channels:\n  a: m.A\n  b: m.B\n")
    assert load_settings(["-c", path]).channels == {"a": "m.A", "b": "m.B"}
    settings = load_settings(["-c", path, "-ch", "c:m:C", "-ch", "d:n.D"])
    assert settings.channels == {"c": "m:C", "d": "n.D"}


def test_config_plugin_flags_append_to_the_file_list(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "plugins:\n  - type: p.One\n")
    settings = load_settings(["-c", path, "-pl", '{"type": "p.Two"}'])
    assert settings.plugins == [{"type": "p.One"}, {"type": "p.Two"}]


def test_config_unknown_keys_warn_and_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _yaml(tmp_path, "port: 9003\nfrobnicate: 1\nredis:\n  host: h\n  colour: red\n")
    with caplog.at_level(logging.WARNING):
        settings = load_settings(["-c", path])
    assert settings.port == 9003
    assert settings.redis == RedisSettings(host="h")
    assert "unknown key 'frobnicate' ignored" in caplog.text
    assert "unknown key redis.colour ignored" in caplog.text


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--routers", "a:b.C"], "routers"),
        (["--replace-routers"], "replace_routers"),
    ],
)
def test_config_router_options_are_implemented(argv: list[str], key: str) -> None:
    loaded = load_config(argv)
    assert getattr(loaded.settings, key)
    assert loaded.warnings == ()


def test_config_no_warnings_for_a_plain_config() -> None:
    assert load_config(["-p", "1234", "-rmi", "http://r:15672"]).warnings == ()


def test_config_plugins_and_sentry_are_implemented() -> None:
    argv = ["-sd", "https://k@s/1", "-pl", '{"type": "x.Y"}']
    assert load_config(argv).warnings == ()


@pytest.mark.parametrize(
    ("make_argv", "message"),
    [
        (lambda p: ["-p", "abc"], "argument -p/--port: invalid int value: 'abc'"),
        (lambda p: ["-redisp", "x"], "invalid int value"),
        (lambda p: ["-p", "70000"], "port 70000 is not in 0-65535"),
        (lambda p: ["--api-workers", "0"], "api_workers must be > 0"),
        (lambda p: ["--store-ride-through", "-1"], "store_ride_through must be >= 0"),
        (lambda p: ["--broker-ride-through", "-1"], "broker_ride_through must be >= 0"),
        (lambda p: ["-pl", "{bad"], "invalid JSON"),
        (lambda p: ["-pl", "[1]"], "must be a JSON object with a 'type'"),
        (lambda p: ["-ch", "nocolon"], "expected type:module:Class"),
        (lambda p: ["-rch", "maybe"], "expected true/false/yes/no/1/0"),
        (lambda p: ["--bogus"], "unrecognized arguments: --bogus"),
        (lambda p: ["-c", str(p / "missing.yaml")], "cannot read config file"),
        (lambda p: ["-c", _yaml(p, "port: [1\n")], "is not valid YAML"),
        (lambda p: ["-c", _yaml(p, "- 1\n- 2\n")], "must be a mapping, not list"),
        (lambda p: ["-c", _yaml(p, "port: eighty\n")], "invalid setting: port:"),
        (lambda p: ["-c", _yaml(p, "redis: [1]\n")], "`redis` must be a mapping"),
        (lambda p: ["-c", _yaml(p, "plugins:\n  - {name: x}\n")], "has no 'type'"),
    ],
)
def test_config_bad_input_is_one_clear_line(
    tmp_path: Path, make_argv: Callable[[Path], list[str]], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(make_argv(tmp_path))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_main_bad_config_exits_78_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-p", "abc"]) == exit_codes.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err == "jb: error: argument -p/--port: invalid int value: 'abc'\n"


def test_backend_description_never_shows_passwords(tmp_path: Path) -> None:
    settings = load_settings(
        ["-redispass", "r3dis-pw", "-amqppass", "amqp-pw", "-redish", "rh", "-amqph", "qh"]
    )
    text = "\n".join(describe_backend(settings))
    assert "rh:6379 db 0" in text
    assert "qh:5672" in text
    assert "r3dis-pw" not in text
    assert "amqp-pw" not in text


def test_backend_description_embedded_names_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings(["--data-dir", str(tmp_path)])
    assert f"embedded store in {tmp_path}" in "\n".join(describe_backend(settings))
