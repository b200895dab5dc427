"""Shared fixtures: real Redis and RabbitMQ, a fresh Namespace per test, settings per backend.

Redis and RabbitMQ must be answering (JUNEBUG_TEST_REDIS / JUNEBUG_TEST_AMQP,
default 127.0.0.1:6379 and 127.0.0.1:5672 guest/guest); a missing service is
an error with instructions, never a silent skip. `.ci/run` starts both.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import TYPE_CHECKING

import pytest

from ipc.names import Namespace
from ipc.settings import AmqpSettings, RedisSettings, Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    import trio

    from ipc.broker import Broker
    from tests.faults.harness import RelayProxy

REDIS_HOST = os.environ.get("JUNEBUG_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("JUNEBUG_TEST_REDIS_PORT", "6379"))
AMQP_HOST = os.environ.get("JUNEBUG_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("JUNEBUG_TEST_AMQP_PORT", "5672"))

BACKENDS = ("embedded", "redis+rabbitmq")


def _answering(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def services() -> None:
    """Fail (not skip) when Redis or RabbitMQ is missing."""
    missing = [
        f"{name} at {host}:{port}"
        for name, host, port in (
            ("Redis", REDIS_HOST, REDIS_PORT),
            ("RabbitMQ", AMQP_HOST, AMQP_PORT),
        )
        if not _answering(host, port)
    ]
    if missing:
        pytest.fail(
            "not answering: " + ", ".join(missing) + ". Start them (`bash .ci/run` does) "
            "or point JUNEBUG_TEST_REDIS_HOST/PORT and JUNEBUG_TEST_AMQP_HOST/PORT at them."
        )


@pytest.fixture
def namespace() -> Namespace:
    return Namespace(prefix=f"jbtest-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def embedded_settings(tmp_path: Path, namespace: Namespace) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        logging_path=str(tmp_path / "logs"),
        namespace=namespace.prefix,
    )


@pytest.fixture
def redis_settings(tmp_path: Path, namespace: Namespace, services: None) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        logging_path=str(tmp_path / "logs"),
        namespace=namespace.prefix,
        redis=RedisSettings(host=REDIS_HOST, port=REDIS_PORT),
        amqp=AmqpSettings(hostname=AMQP_HOST, port=AMQP_PORT),
    )


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Each test using this runs once on the embedded backend and once on Redis + RabbitMQ."""
    name: str = request.param
    if name == "embedded":
        result: Settings = request.getfixturevalue("embedded_settings")
    else:
        result = request.getfixturevalue("redis_settings")
    return result


@pytest.fixture
async def amqp_relay(services: None, nursery: trio.Nursery) -> RelayProxy:
    """RabbitMQ behind a relay the test can take down, bring back or stall."""
    from tests.faults.harness import RelayProxy

    relay = RelayProxy(AMQP_HOST, AMQP_PORT)
    await nursery.start(relay.run)
    return relay


@pytest.fixture
async def rabbitmq(redis_settings: Settings) -> AsyncIterator[Broker]:
    """A broker straight to RabbitMQ, untouched by the relay's outages."""
    from ipc.broker import open_broker

    async with open_broker(redis_settings) as broker:
        yield broker
