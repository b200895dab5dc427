"""Fixtures for channel_proc tests: a channel id, its store and broker (cleaned up), a webhook."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from channel_proc.deadletter import dead_letter_queue
from ipc.broker import open_broker
from ipc.names import new_channel_id
from ipc.state import open_state
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.settings import Settings
    from ipc.state import StateStore
    from tests.fakes.webhook import FakeWebhook


@pytest.fixture
def channel_id() -> str:
    return new_channel_id()


@pytest.fixture
async def store(
    settings: Settings, namespace: Namespace, channel_id: str
) -> AsyncIterator[StateStore]:
    async with open_state(settings, namespace) as opened:
        yield opened
        await opened.delete_channel(channel_id)


@pytest.fixture
async def broker(
    settings: Settings, namespace: Namespace, channel_id: str
) -> AsyncIterator[Broker]:
    async with open_broker(settings) as opened:
        yield opened
        for queue in (
            *namespace.channel_queues(channel_id),
            dead_letter_queue(namespace, channel_id),
        ):
            await opened.delete_queue(queue)


@pytest.fixture
async def webhook() -> AsyncIterator[FakeWebhook]:
    async with open_fake_webhook() as hook:
        yield hook
