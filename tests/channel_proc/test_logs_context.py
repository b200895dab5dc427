"""The channel log's message context (`message_id` on every line written inside it) and the
handler that formats each record once."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from channel_proc.logs import (
    ChannelLogHandler,
    JsonLineFormatter,
    Redactor,
    current_message_id,
    message_context,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


class CountingFormatter(JsonLineFormatter):
    """The real JSON formatter, counting its calls."""

    def __init__(self) -> None:
        super().__init__("chan", Redactor())
        self.calls = 0

    def format(self, record: logging.LogRecord) -> str:
        self.calls += 1
        return super().format(record)


@pytest.fixture
def channel_log(tmp_path: Path) -> Iterator[tuple[logging.Logger, Path, CountingFormatter]]:
    path = tmp_path / "chan"
    handler = ChannelLogHandler(path, max_bytes=1_000_000, max_files=3)
    formatter = CountingFormatter()
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test_logs_context.{tmp_path.name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger, path, formatter
    finally:
        logger.removeHandler(handler)
        handler.close()


def entries(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_logs_context_adds_message_id_while_active(
    channel_log: tuple[logging.Logger, Path, CountingFormatter],
) -> None:
    logger, path, _ = channel_log
    logger.info("before")
    with message_context("m1"):
        logger.info("sending")
        with message_context("m2"):
            logger.info("inner")
        with message_context(None):
            logger.info("between messages")
        logger.warning("rejected")
    logger.info("after")
    assert current_message_id() is None
    found = [(entry["message"], entry.get("message_id")) for entry in entries(path)]
    assert found == [
        ("before", None),
        ("sending", "m1"),
        ("inner", "m2"),
        ("between messages", None),
        ("rejected", "m1"),
        ("after", None),
    ]


def test_logs_context_explicit_extra_wins(
    channel_log: tuple[logging.Logger, Path, CountingFormatter],
) -> None:
    logger, path, _ = channel_log
    with message_context("task-message"):
        logger.info("about another", extra={"message_id": "other"})
    assert entries(path)[0]["message_id"] == "other"


async def test_logs_context_is_per_trio_task(
    channel_log: tuple[logging.Logger, Path, CountingFormatter],
) -> None:
    logger, path, _ = channel_log

    async def handle(message_id: str) -> None:
        with message_context(message_id):
            # Interleave: each task logs after the others have entered their context.
            await trio.testing.wait_all_tasks_blocked()
            logger.info("handling %s", message_id)
            await trio.to_thread.run_sync(logger.info, f"thread for {message_id}")

    async with trio.open_nursery() as nursery:
        for message_id in ("a", "b", "c"):
            nursery.start_soon(handle, message_id)
    found = entries(path)
    assert len(found) == 6
    for entry in found:
        assert str(entry["message"]).endswith(str(entry["message_id"]))


def test_logs_context_each_record_formatted_once(
    channel_log: tuple[logging.Logger, Path, CountingFormatter],
) -> None:
    logger, _, formatter = channel_log
    for n in range(50):
        logger.info("line %d", n)
    assert formatter.calls == 50


def test_logs_context_handler_still_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "chan"
    handler = ChannelLogHandler(path, max_bytes=400, max_files=3)
    handler.setFormatter(JsonLineFormatter("chan", Redactor()))
    logger = logging.getLogger(f"test_logs_context.rotate.{tmp_path.name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for n in range(40):
            logger.info("line %02d", n)
    finally:
        logger.removeHandler(handler)
        handler.close()
    rotated = [tmp_path / "chan.1", tmp_path / "chan.2"]
    assert all(p.exists() for p in rotated)
    assert not (tmp_path / "chan.4").exists()
    for p in (path, *rotated):
        assert 0 < p.stat().st_size < 400
    # The newest lines are in the current file, in order, none lost across it and `.1`.
    newest = [e["message"] for e in entries(rotated[0]) + entries(path)]
    assert newest == [f"line {n:02d}" for n in range(40 - len(newest), 40)]
