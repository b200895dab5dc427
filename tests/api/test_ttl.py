"""Message lifetimes through the API on both backends: replies find their inbound message
within inbound_message_ttl, a sent message's events are kept for outbound_message_ttl."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from ipc.payloads import DeliveryStatus, EventType, VumiEvent, VumiMessage
from tests.api.harness import open_api

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.settings import Settings
    from tests.api.harness import Api

pytestmark = pytest.mark.slow

JsonObject = dict[str, Any]

TTL = 1
#: Beyond the TTL, so the record has expired on either backend.
PAST_TTL = TTL + 0.5


async def _outlive_ttl() -> None:
    # Not synchronisation: what is tested is wall-clock expiry, so the time must pass,
    # and nothing may read the record meanwhile (reads refresh the TTL).
    await trio.sleep(PAST_TTL)


@pytest.fixture
async def short_lived(settings: Settings, socket_dir: Path) -> AsyncIterator[Api]:
    update = {"inbound_message_ttl": TTL, "outbound_message_ttl": TTL}
    async with open_api(settings.model_copy(update=update), socket_dir) as harness:
        yield harness


async def _inbound(api: Api, channel_id: str) -> str:
    """Store an inbound message the way the channel's forwarder does."""
    message = VumiMessage(to_addr="*120#", from_addr="+27820000002", content="hi")
    await api.store.put_inbound(
        channel_id,
        message.message_id,
        message.model_dump(mode="json"),
        api.settings.inbound_message_ttl,
    )
    return message.message_id


async def _send(api: Api, channel_id: str, body: JsonObject) -> tuple[int, JsonObject]:
    response = await api.client.post(f"/channels/{channel_id}/messages/", json=body)
    payload: JsonObject = await response.get_json()
    return response.status_code, payload


async def test_reply_within_inbound_ttl_and_not_after(short_lived: Api) -> None:
    api = short_lived
    channel_id = await api.create_channel(mo_url="http://example.com/mo")
    fresh = await _inbound(api, channel_id)
    status, payload = await _send(api, channel_id, {"reply_to": fresh, "content": "ok"})
    assert status == 201, payload
    assert payload["result"]["reply_to"] == fresh
    assert payload["result"]["to"] == "+27820000002"

    stale = await _inbound(api, channel_id)
    await _outlive_ttl()
    status, payload = await _send(api, channel_id, {"reply_to": stale, "content": "late"})
    assert status == 400
    assert payload["result"]["errors"] == [
        {"type": "MessageNotFound", "message": f"Inbound message with id {stale} not found"}
    ]


async def test_a_reply_refreshes_the_inbound_ttl(short_lived: Api) -> None:
    """Each lookup slides the expiry, as the original's EXPIRE after every read did."""
    api = short_lived
    channel_id = await api.create_channel(mo_url="http://example.com/mo")
    inbound = await _inbound(api, channel_id)
    for _ in range(2):
        # Under the TTL each time, over it in total.
        await trio.sleep(TTL * 0.7)
        status, payload = await _send(api, channel_id, {"reply_to": inbound, "content": "x"})
        assert status == 201, payload


async def _add_event(api: Api, channel_id: str, message_id: str, status: DeliveryStatus) -> None:
    """Store an event the way the channel process does."""
    event = VumiEvent(
        event_type=EventType.DELIVERY_REPORT, user_message_id=message_id, delivery_status=status
    )
    await api.store.add_event(
        channel_id,
        message_id,
        event.event_id,
        event.model_dump(mode="json"),
        api.settings.outbound_message_ttl,
    )


async def _status(api: Api, channel_id: str, message_id: str) -> JsonObject:
    response = await api.client.get(f"/channels/{channel_id}/messages/{message_id}")
    assert response.status_code == 200
    payload: JsonObject = await response.get_json()
    result: JsonObject = payload["result"]
    return result


async def test_events_are_kept_for_the_outbound_ttl(short_lived: Api) -> None:
    api = short_lived
    channel_id = await api.create_channel(mo_url="http://example.com/mo")
    body = {"to": "+1", "content": "x", "event_url": "http://example.com/events"}
    status, payload = await _send(api, channel_id, body)
    assert status == 201
    message_id = payload["result"]["message_id"]

    await _add_event(api, channel_id, message_id, DeliveryStatus.PENDING)
    await _add_event(api, channel_id, message_id, DeliveryStatus.DELIVERED)
    result = await _status(api, channel_id, message_id)
    assert [event["event_type"] for event in result["events"]] == [
        "delivery_pending",
        "delivery_succeeded",
    ]

    await _outlive_ttl()
    assert await _status(api, channel_id, message_id) == {
        "id": message_id,
        "last_event_type": None,
        "last_event_timestamp": None,
        "events": [],
        "timeline": [],
    }
    # A late event starts a record of its own: the send record (event_url) is gone.
    await _add_event(api, channel_id, message_id, DeliveryStatus.FAILED)
    late = await api.store.get_outbound(channel_id, message_id, TTL)
    assert late is not None
    assert late.message is None
    result = await _status(api, channel_id, message_id)
    assert [event["event_type"] for event in result["events"]] == ["delivery_failed"]
