"""Fixtures for the fault tests: a private Redis and a relay to RabbitMQ the test controls."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ipc.settings import AmqpSettings, RedisSettings
from tests.faults.harness import PrivateRedis, RelayProxy, private_redis

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.settings import Settings


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    async with private_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def outage_settings(
    embedded_settings: Settings, redis_server: PrivateRedis, amqp_relay: RelayProxy
) -> Settings:
    """Redis + RabbitMQ, both of which the test may take away: our own redis-server, and
    RabbitMQ through a relay."""
    return embedded_settings.model_copy(
        update={
            "redis": RedisSettings(host="127.0.0.1", port=redis_server.port),
            "amqp": AmqpSettings(hostname="127.0.0.1", port=amqp_relay.port),
        }
    )
