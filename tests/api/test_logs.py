"""GET /channels/{cid}/logs: newest first across rotated files, n validated and clamped (9.3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.api.harness import open_api

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.settings import Settings
    from tests.api.harness import Api

JsonObject = dict[str, Any]


def _entry(index: int) -> JsonObject:
    return {"logger": "c", "level": 20, "timestamp": 1000.0 + index, "message": f"log {index}"}


def _write_logs(settings: Settings, channel_id: str) -> None:
    """Entries 0-2 in X.2, 3-5 in X.1, 6-8 in X (oldest to newest); junk that must be skipped."""
    directory = Path(settings.logging_path)
    directory.mkdir(parents=True, exist_ok=True)
    for suffix, first in ((".2", 0), (".1", 3), ("", 6)):
        lines = [json.dumps(_entry(i)) for i in range(first, first + 3)]
        text = "\n\n".join(lines) + "\n"
        if suffix == "":
            # A line still being written (no newline yet) is not returned.
            text += json.dumps(_entry(99))
        (directory / f"{channel_id}{suffix}").write_text(text)


@pytest.fixture
async def small_api(settings: Settings, socket_dir: Path) -> AsyncIterator[Api]:
    async with open_api(settings.model_copy(update={"max_logs": 5}), socket_dir) as harness:
        yield harness


async def _logs(api: Api, channel_id: str, query: str = "") -> tuple[int, JsonObject]:
    response = await api.client.get(f"/channels/{channel_id}/logs{query}")
    payload: JsonObject = await response.get_json()
    return response.status_code, payload


async def test_logs_newest_first_across_rotated_files(small_api: Api) -> None:
    channel_id = await small_api.create_channel()
    _write_logs(small_api.settings, channel_id)
    status, payload = await _logs(small_api, channel_id, "?n=4")
    assert status == 200
    assert payload["description"] == "logs retrieved"
    assert payload["result"] == [_entry(i) for i in (8, 7, 6, 5)]


@pytest.mark.parametrize(
    ("query", "expected"),
    [("", [8, 7, 6, 5, 4]), ("?n=1000", [8, 7, 6, 5, 4]), ("?n=0", []), ("?n=-3", [])],
)
async def test_logs_n_is_clamped_to_max_logs(
    small_api: Api, query: str, expected: list[int]
) -> None:
    channel_id = await small_api.create_channel()
    _write_logs(small_api.settings, channel_id)
    status, payload = await _logs(small_api, channel_id, query)
    assert status == 200
    assert payload["result"] == [_entry(i) for i in expected]


async def test_logs_n_not_an_integer_is_400(http_api: Api) -> None:
    status, payload = await _logs(http_api, "unknown-channel", "?n=abc")
    assert status == 400
    assert payload["result"]["errors"] == [
        {"type": "ApiUsageError", "message": "n must be an integer, got 'abc'"}
    ]


async def test_logs_of_a_channel_without_files(http_api: Api) -> None:
    channel_id = await http_api.create_channel()
    status, payload = await _logs(http_api, channel_id)
    assert status == 200
    assert payload["result"] == []
