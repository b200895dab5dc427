"""Fixtures for the API tests; the harness itself is in tests/api/harness.py."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.api.harness import Api, open_api

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from ipc.settings import Settings


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """Unix socket paths must stay under ~107 bytes: pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="jb-api-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def api(settings: Settings, socket_dir: Path) -> AsyncIterator[Api]:
    """The app on each backend (embedded, then Redis + RabbitMQ)."""
    async with open_api(settings, socket_dir) as harness:
        yield harness


@pytest.fixture
async def http_api(embedded_settings: Settings, socket_dir: Path) -> AsyncIterator[Api]:
    """For behaviour that does not depend on the backend (routing, validation): embedded only."""
    async with open_api(embedded_settings, socket_dir) as harness:
        yield harness
