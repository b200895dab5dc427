"""The transport link's notes on both backends: kept per channel and group, and
note_put_many writing several at once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from channel_proc.events import StatusReporter
from channel_proc.link import QueueLink

if TYPE_CHECKING:
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.state import StateStore


def link_for(broker: Broker, namespace: Namespace, store: StateStore, cid: str) -> QueueLink:
    send, _ = trio.open_memory_channel[object](100)
    return QueueLink(broker, namespace, cid, StatusReporter(send), store=store, note_ttl=60.0)


async def test_note_put_many_stores_every_note_in_its_group(
    broker: Broker, namespace: Namespace, store: StateStore, channel_id: str
) -> None:
    link = link_for(broker, namespace, store, channel_id)
    neighbour = link_for(broker, namespace, store, f"{channel_id}-other")
    await link.note_put("sent:m0", {"old": True})
    await link.note_put_many({"smsc:abc": {"message_id": "m1"}, "sent:m1": {"parts": {"1": "abc"}}})
    await neighbour.note_put_many({"smsc:abc": {"message_id": "theirs"}})
    assert await link.note_get("smsc:abc") == {"message_id": "m1"}
    assert await link.notes("sent:") == {
        "sent:m0": {"old": True},
        "sent:m1": {"parts": {"1": "abc"}},
    }
    assert await neighbour.notes("smsc:") == {"smsc:abc": {"message_id": "theirs"}}


async def test_note_put_many_with_a_bad_key_writes_nothing(
    broker: Broker, namespace: Namespace, store: StateStore, channel_id: str
) -> None:
    link = link_for(broker, namespace, store, channel_id)
    with pytest.raises(ValueError, match="is not 'group:name'"):
        await link.note_put_many({"smsc:abc": {"message_id": "m1"}, "nogroup": {}})
    assert await link.note_get("smsc:abc") is None
