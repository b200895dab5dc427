"""Pure pieces: backoff, the graceful-stop request, log formatting and redaction."""

from __future__ import annotations

import json
import logging
import random
import sys
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from pydantic import SecretStr

from channel_proc.backoff import Backoff
from channel_proc.lifecycle import Shutdown
from channel_proc.logs import (
    JsonLineFormatter,
    Redactor,
    configure_logging,
    exception_class_name,
    redact_strings,
    secret_values,
)
from channel_proc.transports.errors import ConfigError
from ipc.settings import AmqpSettings, Settings

if TYPE_CHECKING:
    from pathlib import Path

# --- backoff ---------------------------------------------------------------------------------


def test_backoff_doubles_up_to_cap() -> None:
    backoff = Backoff(initial=0.5, cap=4.0)
    bases = []
    for _ in range(6):
        bases.append(backoff.base_delay())
        backoff.next_delay()
    assert bases == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_jitter_stays_within_half_to_full() -> None:
    backoff = Backoff(initial=1.0, cap=60.0, rng=random.Random(7))
    for _ in range(200):
        base = backoff.base_delay()
        assert base / 2 <= backoff.next_delay() <= base


def test_backoff_reset_and_huge_attempt_counts() -> None:
    backoff = Backoff(initial=0.5, cap=60.0, attempts=10_000)
    assert backoff.base_delay() == 60.0
    backoff.reset()
    assert backoff.base_delay() == 0.5


# --- shutdown --------------------------------------------------------------------------------


async def test_shutdown_cancels_idle_at_once_and_gives_busy_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shutdown = Shutdown(grace=5.0)
    results: dict[str, float] = {}

    async def idle() -> None:
        completed = await shutdown.sleep(100)
        results["idle"] = trio.current_time() if not completed else -1

    async def busy() -> None:
        with shutdown.busy() as scope:
            await trio.sleep(100)
        results["busy"] = trio.current_time() if scope.cancelled_caught else -1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle)
        nursery.start_soon(busy)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        shutdown.request("test")
    assert results["idle"] == start
    assert results["busy"] == start + 5.0
    assert shutdown.reason == "test"


async def test_shutdown_requested_before_entering_scopes() -> None:
    shutdown = Shutdown(grace=5.0)
    shutdown.request("early")
    assert not await shutdown.sleep(1)
    with shutdown.busy() as scope:
        assert scope.deadline <= trio.current_time() + 5.0


async def test_shutdown_hurry_cancels_busy_work() -> None:
    shutdown = Shutdown(grace=100.0)
    with shutdown.busy() as scope:
        shutdown.request("first")
        shutdown.hurry()
        await trio.sleep(10)
    assert scope.cancelled_caught


# --- logs ------------------------------------------------------------------------------------


def test_secret_values_found_under_secret_keys_recursively() -> None:
    props = {
        "mo_url_auth_token": "tok-abc",
        "config": {"password": "pw-123", "nested": {"api_key": 4567, "host": "h"}},
        "list": [{"secret": "s-1"}],
        "label": "not secret",
    }
    assert sorted(secret_values(props)) == ["4567", "pw-123", "s-1", "tok-abc"]


def test_redactor_replaces_longest_first_and_skips_tiny_values() -> None:
    redact = Redactor()
    redact.add(["abc", "abcdef", "x"])
    assert redact("abcdef abc x") == "*** *** x"


def _record(msg: str, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("t", logging.WARNING, __file__, 1, msg, (), exc_info)  # type: ignore[arg-type]


def test_json_line_formatter_shape() -> None:
    formatter = JsonLineFormatter("chan-1", Redactor())
    entry = json.loads(formatter.format(_record("hello")))
    assert set(entry) == {"logger", "level", "timestamp", "message"}
    assert (entry["logger"], entry["level"], entry["message"]) == ("chan-1", 30, "hello")
    assert isinstance(entry["timestamp"], float)


def test_json_line_formatter_exception_is_redacted() -> None:
    redact = Redactor()
    redact.add(["hunter2"])
    formatter = JsonLineFormatter("c", redact)
    try:
        raise ValueError("password hunter2 rejected")
    except ValueError:
        entry = json.loads(formatter.format(_record("failed with hunter2", sys.exc_info())))
    assert entry["message"] == "failed with ***"
    assert entry["exception"]["class"] == "ValueError"
    assert entry["exception"]["instance"] == "ValueError('password *** rejected')"
    assert "hunter2" not in json.dumps(entry)
    assert all(isinstance(line, str) for line in entry["exception"]["stack"])
    assert any("ValueError" in line for line in entry["exception"]["stack"])


@pytest.fixture
def restore_root_logger() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # configure_logging also turns off record fields the channel log does not use.
    switches = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")
    saved = {name: getattr(logging, name) for name in switches}
    yield None
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers, root.level = handlers, level
    for name, value in saved.items():
        setattr(logging, name, value)


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_logging_writes_rotated_json_lines(tmp_path: Path) -> None:
    settings = Settings(
        logging_path=str(tmp_path / "logs"),
        log_rotate_size=300,
        max_log_files=2,
        amqp=AmqpSettings(password=SecretStr("amqp-secret-pw")),
    )
    configure_logging(settings, "cid-1")
    log = logging.getLogger("channel_proc.test")
    for n in range(20):
        log.info("line %d with amqp-secret-pw", n)
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["cid-1", "cid-1.1", "cid-1.2"]
    text = "".join((tmp_path / "logs" / name).read_text() for name in files)
    assert "amqp-secret-pw" not in text
    last = json.loads((tmp_path / "logs" / "cid-1").read_text().splitlines()[-1])
    assert last["message"] == "line 19 with ***"
    assert last["logger"] == "cid-1"


def test_exception_class_names_are_short_for_builtins_and_qualified_otherwise() -> None:
    assert exception_class_name(ValueError) == "ValueError"
    assert exception_class_name(ConfigError) == "channel_proc.transports.errors.ConfigError"


def test_redact_strings_walks_nested_structures() -> None:
    redact = Redactor()
    redact.add(["tok-123"])
    event = {
        "message": "with tok-123",
        "extra": [{"v": ("tok-123", 5)}],
        "params": [ValueError("bad tok-123")],
        "level": 40,
    }
    assert redact_strings(event, redact) == {
        "message": "with ***",
        "extra": [{"v": ["***", 5]}],
        "params": ["ValueError('bad ***')"],
        "level": 40,
    }


def _write_lines(tmp_path: Path, settings: Settings, count: int) -> list[str]:
    configure_logging(settings, "cid-2")
    log = logging.getLogger("channel_proc.test")
    for n in range(count):
        log.info("entry %03d", n)
    return sorted(p.name for p in (tmp_path / "logs").iterdir())


@pytest.mark.usefixtures("restore_root_logger")
def test_max_log_files_zero_keeps_every_rotated_file(tmp_path: Path) -> None:
    settings = Settings(logging_path=str(tmp_path / "logs"), log_rotate_size=300, max_log_files=0)
    files = _write_lines(tmp_path, settings, 40)
    assert len(files) > 5
    assert set(files) == {"cid-2", *(f"cid-2.{n}" for n in range(1, len(files)))}
    # Oldest in the highest number; nothing was dropped.
    newest_first = ["cid-2", *(f"cid-2.{n}" for n in range(1, len(files)))]
    messages = [
        json.loads(line)["message"]
        for name in reversed(newest_first)
        for line in (tmp_path / "logs" / name).read_text().splitlines()
    ]
    assert messages == [f"entry {n:03d}" for n in range(40)]


@pytest.mark.usefixtures("restore_root_logger")
def test_rotation_deletes_files_beyond_max_log_files_even_left_by_a_larger_limit(
    tmp_path: Path,
) -> None:
    (tmp_path / "logs").mkdir()
    for stale in ("cid-2.3", "cid-2.4"):
        (tmp_path / "logs" / stale).write_text('{"message": "stale"}\n')
    (tmp_path / "logs" / "cid-2.1").write_text('{"message": "old"}\n')
    (tmp_path / "logs" / "cid-2.2").write_text('{"message": "older"}\n')
    settings = Settings(logging_path=str(tmp_path / "logs"), log_rotate_size=300, max_log_files=2)
    files = _write_lines(tmp_path, settings, 20)
    assert files == ["cid-2", "cid-2.1", "cid-2.2"]
    text = "".join((tmp_path / "logs" / name).read_text() for name in files)
    assert "stale" not in text


@pytest.mark.usefixtures("restore_root_logger")
def test_disable_logging_keeps_the_channel_log_but_not_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JUNEBUG_DISABLE_LOGGING", "1")
    settings = Settings(logging_path=str(tmp_path / "logs"))
    configure_logging(settings, "cid-3")
    logging.getLogger("channel_proc.test").error("something failed")
    assert capsys.readouterr().err == ""
    (entry,) = [json.loads(x) for x in (tmp_path / "logs" / "cid-3").read_text().splitlines()]
    assert (entry["message"], entry["level"]) == ("something failed", 40)
