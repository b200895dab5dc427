"""Read a channel's recent log entries from its rotated JSON-lines files (behaviour 9.2-9.3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

JsonObject = dict[str, Any]


def _log_files(logging_path: str, worker_id: str) -> list[Path]:
    """The current file, then X.1, X.2... while they exist: newest first."""
    base = Path(logging_path) / worker_id
    files = [base]
    index = 1
    while (rotated := base.with_name(f"{base.name}.{index}")).exists():
        files.append(rotated)
        index += 1
    return files


def _entries_newest_first(path: Path) -> list[JsonObject]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    # The last element is b"" for a complete file, else a line still being written: skip both.
    lines.pop()
    entries: list[JsonObject] = []
    for line in reversed(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def read_logs(
    logging_path: str, worker_id: str, n: int, *, message_id: str | None = None
) -> list[JsonObject]:
    """Up to `n` entries, newest first; with `message_id`, only entries whose `message_id`
    field is that id (every file is read until n are found). Blocking file I/O: run it in a
    worker thread."""
    result: list[JsonObject] = []
    if n <= 0:
        return result
    for path in _log_files(logging_path, worker_id):
        for entry in _entries_newest_first(path):
            if message_id is not None and entry.get("message_id") != message_id:
                continue
            result.append(entry)
            if len(result) == n:
                return result
    return result
