"""`python -m supervisor` as a user runs it, for what happens before any child starts:
channel-type and plugin loading errors, Sentry reporting, JUNEBUG_DISABLE_LOGGING."""

from __future__ import annotations

import gzip
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from ipc import exit_codes
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.fakes.webhook import RecordedRequest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = "tests.supervisor.recording_plugins"


@dataclass(frozen=True)
class Finished:
    code: int
    stdout: str
    stderr: str


async def run_jb(
    settings: Settings, *args: str, env: dict[str, str] | None = None, path: Path | None = None
) -> Finished:
    """Run `python -m supervisor` until it exits (these runs all fail at boot)."""
    pythonpath = os.pathsep.join(str(p) for p in (ROOT, path) if p is not None)
    argv = [
        sys.executable, "-m", "supervisor",
        "-i", "127.0.0.1", "-p", "0",
        "--data-dir", str(settings.data_dir),
        "--logging-path", settings.logging_path,
        "--namespace", settings.namespace,
        *args,
    ]  # fmt: skip
    inherited = {k: v for k, v in os.environ.items() if k != "JUNEBUG_DISABLE_LOGGING"}
    environ = {**inherited, "PYTHONPATH": pythonpath, **(env or {})}
    with trio.fail_after(60):
        result = await trio.run_process(
            argv, env=environ, capture_stdout=True, capture_stderr=True, check=False
        )
    return Finished(result.returncode, result.stdout.decode(), result.stderr.decode())


def error_lines(output: str) -> list[str]:
    return [line.split(" ERROR: ", 1)[1] for line in output.splitlines() if " ERROR: " in line]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["--channels", "fake:nosuch.module:Thing"],
            "channel types: channel_proc: cannot import 'nosuch.module' for "
            "'nosuch.module:Thing': No module named 'nosuch'",
        ),
        (
            ["--replace-channels", "--channels", f"x:{PLUGINS}.RecordingPlugin"],
            f"channel types: channel_proc: {PLUGINS}.RecordingPlugin is not a channel_proc "
            "Transport class",
        ),
        (
            ["--channels", "x:explodes:Thing"],
            "channel type catalog exited with code 1: RuntimeError: boom at import",
        ),
    ],
)
async def test_a_channel_class_that_cannot_be_loaded_is_one_clear_error(
    embedded_settings: Settings, tmp_path: Path, args: list[str], error: str
) -> None:
    (tmp_path / "explodes.py").write_text('raise RuntimeError("boom at import")\n')
    done = await run_jb(embedded_settings, *args, path=tmp_path)
    # A class that does not load is a configuration error; a module that blows up while
    # being imported crashes the catalog step, and still gives one line.
    expected = exit_codes.EXIT_SOFTWARE if "explodes" in args[-1] else exit_codes.EXIT_CONFIG
    assert done.code == expected, done.stdout + done.stderr
    assert error_lines(done.stdout) == [error]


async def test_a_plugin_that_cannot_be_loaded_is_one_clear_error(
    embedded_settings: Settings,
) -> None:
    done = await run_jb(embedded_settings, "--plugin", json.dumps({"type": "nosuch.Plugin"}))
    assert done.code == exit_codes.EXIT_CONFIG, done.stdout + done.stderr
    assert error_lines(done.stdout) == [
        "plugin nosuch.Plugin: cannot import 'nosuch': "
        "ModuleNotFoundError: No module named 'nosuch'"
    ]


def envelope_items(request: RecordedRequest) -> list[dict[str, Any]]:
    """The JSON items of a Sentry envelope (gzip-compressed or not)."""
    body = request.body
    if request.headers.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    items = []
    for line in body.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            items.append(value)
    return items


async def test_errors_are_reported_to_sentry(embedded_settings: Settings) -> None:
    async with open_fake_webhook() as sentry:
        dsn = f"http://key@127.0.0.1:{sentry.port}/1"
        done = await run_jb(embedded_settings, "--sentry-dsn", dsn, "--channels", "x:nosuch:Y")
        assert done.code == exit_codes.EXIT_CONFIG
        assert "errors are reported to Sentry" in done.stdout
        assert "key@" not in done.stdout + done.stderr
        [request] = sentry.on_path("/api/1/envelope/")
    assert request.method == "POST"
    assert "sentry_key=key" in request.headers["x-sentry-auth"]
    events = [item for item in envelope_items(request) if item.get("level") == "error"]
    [event] = events
    assert event["logger"] == "supervisor.run"
    assert "channel types: channel_proc: cannot import 'nosuch'" in json.dumps(event)
    assert event["tags"]["junebug.role"] == "supervisor"


async def test_disable_logging_silences_stdout_but_not_the_log_file(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    log_file = tmp_path / "jb.log"
    done = await run_jb(
        embedded_settings,
        "--log-file", str(log_file),
        "--channels", "x:nosuch:Y",
        env={"JUNEBUG_DISABLE_LOGGING": "1"},
    )  # fmt: skip
    assert done.code == exit_codes.EXIT_CONFIG
    assert done.stdout == ""
    assert error_lines(log_file.read_text()) == [
        "channel types: channel_proc: cannot import 'nosuch' for 'nosuch:Y': "
        "No module named 'nosuch'"
    ]
