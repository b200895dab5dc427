"""Sending messages (to the real outbound queue) and reading their status (behaviour 2.8-2.9, 4)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from api.channel_object import current_bucket
from ipc.codec import decode_vumi_message
from ipc.payloads import EventType, VumiEvent, VumiMessage
from tests.api.harness import open_api

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.settings import Settings
    from tests.api.harness import Api

JsonObject = dict[str, Any]


async def _send(api: Api, channel_id: str, body: JsonObject) -> tuple[int, JsonObject]:
    response = await api.client.post(f"/channels/{channel_id}/messages/", json=body)
    payload: JsonObject = await response.get_json()
    return response.status_code, payload


async def _queued(api: Api, channel_id: str, count: int) -> list[VumiMessage]:
    """Take `count` messages off the channel's outbound queue, acking them."""
    messages = []
    async with api.broker.consume(api.namespace.outbound_queue(channel_id), prefetch=1) as queue:
        for _ in range(count):
            with trio.fail_after(5):
                delivery = await queue.receive()
            messages.append(decode_vumi_message(delivery.body))
            await queue.ack(delivery)
    return messages


@pytest.fixture
async def channel_id(api: Api) -> str:
    return await api.create_channel(mo_url="http://example.com/mo", character_limit=10)


async def test_send_queues_the_vumi_message_and_answers_the_message(
    api: Api, channel_id: str
) -> None:
    body = {
        "to": "+27820000001",
        "from": "8110",
        "content": "hello",
        "event_url": "http://example.com/events",
        "event_auth_token": "tok",
        "priority": 3,
        "channel_data": {"continue_session": True, "voice": {"speed": 2}},
    }
    status, payload = await _send(api, channel_id, body)
    assert status == 201
    assert payload["code"] == "Created"
    assert payload["description"] == "message submitted"
    result = payload["result"]
    message_id = result["message_id"]
    assert len(message_id) == 32
    assert result == {
        "to": "+27820000001",
        "from": "8110",
        "group": None,
        "message_id": message_id,
        "channel_id": channel_id,
        "timestamp": result["timestamp"],
        "reply_to": None,
        "content": "hello",
        "channel_data": {"voice": {"speed": 2}, "continue_session": True},
    }

    [queued] = await _queued(api, channel_id, 1)
    assert queued.message_id == message_id
    assert queued.to_addr == "+27820000001"
    assert queued.from_addr == "8110"
    assert queued.content == "hello"
    assert queued.transport_name == channel_id
    assert queued.helper_metadata == {"voice": {"speed": 2}}
    assert queued.session_event is None
    assert getattr(queued, "continue_session", None) is True
    assert queued.timestamp == result["timestamp"]

    record = await api.store.get_outbound(channel_id, message_id, 60)
    assert record is not None
    assert record.message == {
        **result,
        "event_url": "http://example.com/events",
        "event_auth_token": "tok",
        "priority": 3,
    }
    rates = await api.store.get_rates(
        channel_id, ["outbound"], current_bucket(api.settings.metric_window)
    )
    assert rates["outbound"] >= 1


async def test_priority_orders_the_outbound_queue(api: Api, channel_id: str) -> None:
    for content, priority in [("low", None), ("high", 5), ("mid", "3")]:
        body: JsonObject = {"to": "+1", "content": content}
        if priority is not None:
            body["priority"] = priority
        status, _ = await _send(api, channel_id, body)
        assert status == 201
    queued = await _queued(api, channel_id, 3)
    assert [message.content for message in queued] == ["high", "mid", "low"]


async def test_content_null_is_accepted(api: Api, channel_id: str) -> None:
    status, payload = await _send(api, channel_id, {"to": "*120#", "content": None})
    assert status == 201
    assert payload["result"]["content"] is None
    [queued] = await _queued(api, channel_id, 1)
    assert queued.content is None


async def test_message_too_long(api: Api, channel_id: str) -> None:
    content = "Over the character limit."
    status, payload = await _send(api, channel_id, {"to": "+1", "content": content})
    assert status == 400
    assert payload["description"] == "message too long"
    assert payload["result"]["errors"] == [
        {
            "type": "MessageTooLong",
            "message": "Message content 'Over the character limit.' is of length 25, which is "
            "greater than the character limit of 10",
        }
    ]
    assert await api.broker.queue_length(api.namespace.outbound_queue(channel_id)) == 0


async def test_character_limit_counts_code_points(api: Api, channel_id: str) -> None:
    status, _ = await _send(api, channel_id, {"to": "+1", "content": "ñ€😀" * 3 + "é"})
    assert status == 201


async def test_channel_without_destination_refuses_sends(api: Api) -> None:
    channel_id = await api.create_channel()
    status, payload = await _send(api, channel_id, {"to": "+1", "content": "x"})
    assert status == 400
    assert payload["result"]["errors"] == [
        {"type": "ApiUsageError", "message": 'This channel has no "mo_url" or "amqp_queue"'}
    ]


async def test_neither_to_nor_reply_to(api: Api, channel_id: str) -> None:
    status, payload = await _send(api, channel_id, {"content": "x"})
    assert status == 400
    assert payload["result"]["errors"] == [
        {"type": "ApiUsageError", "message": 'Either "to" or "reply_to" must be specified'}
    ]


async def _store_inbound(api: Api, channel_id: str) -> VumiMessage:
    inbound = VumiMessage(
        to_addr="*120#",
        from_addr="+27820000002",
        content="hi",
        transport_name=channel_id,
        transport_type="ussd",
        provider="mno",
        transport_metadata={"session_id": "s1"},
        helper_metadata={"secret": "not carried over"},
    )
    await api.store.put_inbound(
        channel_id,
        inbound.message_id,
        inbound.model_dump(mode="json"),
        api.settings.inbound_message_ttl,
    )
    return inbound


async def test_reply_takes_addresses_from_the_inbound(api: Api, channel_id: str) -> None:
    inbound = await _store_inbound(api, channel_id)
    status, payload = await _send(
        api,
        channel_id,
        {
            "reply_to": inbound.message_id,
            "to": "ignored",
            "content": "bye",
            "channel_data": {"continue_session": False},
        },
    )
    assert status == 201
    result = payload["result"]
    assert result["to"] == "+27820000002"
    assert result["from"] == "*120#"
    assert result["reply_to"] == inbound.message_id
    assert result["channel_data"] == {"session_event": "close"}
    [queued] = await _queued(api, channel_id, 1)
    assert queued.in_reply_to == inbound.message_id
    assert queued.to_addr == "+27820000002"
    assert queued.session_event == "close"
    assert queued.transport_metadata == {"session_id": "s1"}
    assert queued.transport_type == "ussd"
    assert queued.provider == "mno"
    assert queued.helper_metadata == {}


async def test_reply_to_unknown_message(api: Api, channel_id: str) -> None:
    status, payload = await _send(api, channel_id, {"reply_to": "abc", "to": "+1", "content": "x"})
    assert status == 400
    assert payload["description"] == "message not found"
    assert payload["result"]["errors"] == [
        {"type": "MessageNotFound", "message": "Inbound message with id abc not found"}
    ]


@pytest.fixture
async def lenient_api(settings: Settings, socket_dir: Path) -> AsyncIterator[Api]:
    async with open_api(
        settings.model_copy(update={"allow_expired_replies": True}), socket_dir
    ) as harness:
        yield harness


async def test_allow_expired_replies_falls_back_to_to(lenient_api: Api) -> None:
    api = lenient_api
    channel_id = await api.create_channel(mo_url="http://example.com/mo")
    status, payload = await _send(
        api, channel_id, {"reply_to": "gone", "to": "+1", "from": "99", "content": "x"}
    )
    assert status == 201
    assert payload["result"]["reply_to"] is None
    assert payload["result"]["to"] == "+1"
    status, _ = await _send(api, channel_id, {"reply_to": "gone", "content": "x"})
    assert status == 400


async def test_message_status_lists_events_oldest_first(api: Api, channel_id: str) -> None:
    _, payload = await _send(api, channel_id, {"to": "+1", "content": "x"})
    message_id = payload["result"]["message_id"]
    events = [
        VumiEvent(
            event_type=EventType.DELIVERY_REPORT,
            delivery_status="delivered",
            user_message_id=message_id,
            timestamp="2024-01-01 10:00:02.000000",
        ),
        VumiEvent(
            event_type=EventType.ACK,
            user_message_id=message_id,
            sent_message_id="smsc-1",
            timestamp="2024-01-01 10:00:01.000000",
        ),
    ]
    for event in events:
        await api.store.add_event(
            channel_id, message_id, event.event_id, event.model_dump(mode="json"), 60
        )
    response = await api.client.get(f"/channels/{channel_id}/messages/{message_id}")
    payload = await response.get_json()
    assert response.status_code == 200
    assert payload["description"] == "message status"
    timeline = payload["result"].pop("timeline")
    # The two events (dated 2024) come before the API's stages of the send (dated now).
    assert [(entry["stage"], entry["details"].get("event_type")) for entry in timeline] == [
        ("event", "submitted"),
        ("event", "delivery_succeeded"),
        ("accepted", None),
        ("queued", None),
    ]
    assert timeline[0]["details"]["provider_message_id"] == "smsc-1"
    assert payload["result"] == {
        "id": message_id,
        "last_event_type": "delivery_succeeded",
        "last_event_timestamp": "2024-01-01 10:00:02.000000",
        "events": [
            {
                "channel_id": channel_id,
                "message_id": message_id,
                "timestamp": "2024-01-01 10:00:01.000000",
                "event_type": "submitted",
                "event_details": {},
            },
            {
                "channel_id": channel_id,
                "message_id": message_id,
                "timestamp": "2024-01-01 10:00:02.000000",
                "event_type": "delivery_succeeded",
                "event_details": {},
            },
        ],
    }


async def test_status_of_unknown_message_is_empty(api: Api, channel_id: str) -> None:
    response = await api.client.get(f"/channels/{channel_id}/messages/unknown")
    payload = await response.get_json()
    assert response.status_code == 200
    assert payload["result"] == {
        "id": "unknown",
        "last_event_type": None,
        "last_event_timestamp": None,
        "events": [],
        "timeline": [],
    }
