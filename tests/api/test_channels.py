"""Channel create, list, get, modify, delete and restart against both backends (behaviour 2-3)."""

from __future__ import annotations

import math
import uuid
from typing import TYPE_CHECKING, Any

from api.channel_object import current_bucket
from ipc.errors import RemoteError
from tests.api.harness import open_api

if TYPE_CHECKING:
    from pathlib import Path

    from ipc.settings import Settings
    from tests.api.harness import Api

JsonObject = dict[str, Any]

EMPTY_STATUS: JsonObject = {
    "status": None,
    "components": {},
    "inbound_message_rate": 0,
    "outbound_message_rate": 0,
    "submitted_event_rate": 0,
    "rejected_event_rate": 0,
    "delivery_succeeded_rate": 0,
    "delivery_failed_rate": 0,
    "delivery_pending_rate": 0,
    # No snapshot from a channel process: the counts come from the broker.
    "queues": {
        "outbound": 0,
        "inbound": 0,
        "events": 0,
        "oldest_outbound_age": None,
        "send_rate": None,
        "drain_seconds": None,
        "paused": False,
        "updated": None,
    },
}


async def _json(api: Api, method: str, path: str, body: object = None) -> tuple[int, JsonObject]:
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    response = await api.client.open(path, method=method, **kwargs)
    payload: JsonObject = await response.get_json()
    return response.status_code, payload


async def test_create_returns_201_with_the_channel_object(api: Api) -> None:
    body = {
        "type": "fake",
        "label": "My channel",
        "config": {"host": "smsc.example", "port": 2775},
        "mo_url": "http://example.com/mo",
        "custom_key": [1, 2],
        "id": "ignored",
        "status": "ignored",
    }
    status, payload = await _json(api, "POST", "/channels/", body)
    assert status == 201
    assert payload["code"] == "Created"
    assert payload["description"] == "channel created"
    result = payload["result"]
    channel_id = result["id"]
    assert uuid.UUID(channel_id).version == 4
    assert str(uuid.UUID(channel_id)) == channel_id
    assert result == {
        "type": "fake",
        "label": "My channel",
        "config": {"host": "smsc.example", "port": 2775},
        "mo_url": "http://example.com/mo",
        "custom_key": [1, 2],
        "id": channel_id,
        "status": EMPTY_STATUS,
    }
    stored = await api.store.get_channel(channel_id)
    assert stored is not None
    assert "id" not in stored
    assert "status" not in stored
    assert api.supervisor.lifecycle() == [("start_channel", channel_id)]


async def test_create_refused_by_the_channel_is_400_and_not_kept(api: Api) -> None:
    api.supervisor.fail_next(
        "start_channel", RemoteError("ChannelConfigError", "bad system_id", code=400)
    )
    status, payload = await _json(
        api, "POST", "/channels/", {"type": "fake", "config": {"host": "h"}}
    )
    assert status == 400
    assert payload["description"] == "invalid channel config"
    assert payload["result"]["errors"] == [
        {"type": "InvalidChannelConfig", "message": "bad system_id"}
    ]
    assert await api.store.list_channels() == []


async def test_create_kept_when_the_supervisor_cannot_start_it(api: Api) -> None:
    api.supervisor.fail_next(
        "start_channel", RemoteError("ChannelStartTimeout", "not ready in 15 s", code=503)
    )
    status, payload = await _json(
        api, "POST", "/channels/", {"type": "fake", "config": {"host": "h"}}
    )
    assert status == 201
    assert await api.store.list_channels() == [payload["result"]["id"]]


async def test_list_is_sorted(api: Api) -> None:
    ids = [await api.create_channel() for _ in range(3)]
    status, payload = await _json(api, "GET", "/channels/")
    assert status == 200
    assert payload["description"] == "channels listed"
    assert payload["result"] == sorted(ids)


async def test_get_shows_status_components_and_worst_level(api: Api) -> None:
    channel_id = await api.create_channel()
    components = {
        "smpp": {
            "component": "smpp",
            "channel_id": channel_id,
            "status": "degraded",
            "type": "throttled",
            "message": "Throttled",
            "details": {},
        },
        "process": {
            "component": "process",
            "channel_id": channel_id,
            "status": "ok",
            "type": "running",
            "message": "running",
            "details": {},
        },
    }
    for name, event in components.items():
        await api.store.set_status(channel_id, name, event)
    status, payload = await _json(api, "GET", f"/channels/{channel_id}")
    assert status == 200
    assert payload["description"] == "channel found"
    assert payload["result"]["status"]["status"] == "degraded"
    assert payload["result"]["status"]["components"] == components


async def test_rates_come_from_the_previous_bucket(api: Api) -> None:
    channel_id = await api.create_channel()
    window = api.settings.metric_window
    ttl = math.ceil(2 * window)
    while True:
        bucket = current_bucket(window)
        for _ in range(3):
            await api.store.incr_rate(channel_id, "inbound", bucket - 1, ttl)
        await api.store.incr_rate(channel_id, "delivery_failed", bucket - 1, ttl)
        # The current, partial bucket is never reported.
        await api.store.incr_rate(channel_id, "submitted", bucket, ttl)
        _, payload = await _json(api, "GET", f"/channels/{channel_id}")
        if current_bucket(window) == bucket:
            break
        # A bucket boundary passed mid-test: the counters now sit in the wrong buckets.
    rates = payload["result"]["status"]
    assert rates["inbound_message_rate"] == 3 / window
    assert rates["delivery_failed_rate"] == 1 / window
    assert rates["submitted_event_rate"] == 0
    assert rates["outbound_message_rate"] == 0


async def test_modify_merges_saves_and_restarts(api: Api) -> None:
    channel_id = await api.create_channel(label="old", metadata={"a": 1}, mo_url="http://a/mo")
    status, payload = await _json(
        api,
        "POST",
        f"/channels/{channel_id}",
        {"config": {"host": "new.example"}, "mo_url": None, "status_url": "http://s"},
    )
    assert status == 200
    assert payload["description"] == "channel updated"
    expected = {
        "type": "fake",
        "label": "old",
        "metadata": {"a": 1},
        "config": {"host": "new.example"},
        "mo_url": None,
        "status_url": "http://s",
    }
    assert {k: v for k, v in payload["result"].items() if k not in ("id", "status")} == expected
    assert await api.store.get_channel(channel_id) == expected
    assert api.supervisor.lifecycle() == [
        ("start_channel", channel_id),
        ("start_channel", channel_id),
    ]


async def test_modify_of_label_only_does_not_restart(api: Api) -> None:
    channel_id = await api.create_channel()
    status, _ = await _json(api, "POST", f"/channels/{channel_id}", {"label": "renamed"})
    assert status == 200
    assert api.supervisor.lifecycle() == [("start_channel", channel_id)]


async def test_modify_with_invalid_type_changes_nothing(api: Api) -> None:
    channel_id = await api.create_channel()
    before = await api.store.get_channel(channel_id)
    status, payload = await _json(
        api, "POST", f"/channels/{channel_id}", {"type": "nope", "config": {}}
    )
    assert status == 400
    assert payload["description"] == "invalid channel type"
    assert await api.store.get_channel(channel_id) == before
    assert api.supervisor.lifecycle() == [("start_channel", channel_id)]


async def test_modify_with_invalid_config_changes_nothing(api: Api) -> None:
    channel_id = await api.create_channel()
    before = await api.store.get_channel(channel_id)
    status, payload = await _json(api, "POST", f"/channels/{channel_id}", {"config": {"host": 5}})
    assert status == 400
    assert payload["result"]["errors"] == [
        {
            "type": "invalid_body",
            "message": "5 is not of type 'string'",
            "schema_path": ["properties", "config", "properties", "host", "type"],
        }
    ]
    assert await api.store.get_channel(channel_id) == before


async def test_modify_refused_by_the_channel_restores_the_old_properties(api: Api) -> None:
    channel_id = await api.create_channel()
    before = await api.store.get_channel(channel_id)
    api.supervisor.fail_next(
        "start_channel", RemoteError("ChannelConfigError", "cannot bind", code=400)
    )
    status, payload = await _json(
        api, "POST", f"/channels/{channel_id}", {"config": {"host": "bad.example"}}
    )
    assert status == 400
    assert payload["result"]["errors"] == [
        {"type": "InvalidChannelConfig", "message": "cannot bind"}
    ]
    assert await api.store.get_channel(channel_id) == before
    # Started with the new config (refused), then again with the old one.
    assert api.supervisor.lifecycle() == [("start_channel", channel_id)] * 3


async def test_delete_stops_and_removes_state_and_queues(api: Api) -> None:
    channel_id = await api.create_channel(mo_url="http://a/mo")
    await api.store.set_status(channel_id, "smpp", {"status": "ok"})
    response = await api.client.post(
        f"/channels/{channel_id}/messages/", json={"to": "+1", "content": "queued"}
    )
    assert response.status_code == 201
    outbound = api.namespace.outbound_queue(channel_id)
    assert await api.broker.queue_length(outbound) == 1

    status, payload = await _json(api, "DELETE", f"/channels/{channel_id}")
    assert status == 200
    assert payload == {"status": 200, "code": "OK", "description": "channel deleted", "result": {}}
    assert api.supervisor.lifecycle()[-1] == ("stop_channel", channel_id)
    assert await api.store.get_channel(channel_id) is None
    assert await api.store.get_statuses(channel_id) == {}
    assert await api.broker.queue_length(outbound) == 0
    status, _ = await _json(api, "DELETE", f"/channels/{channel_id}")
    assert status == 404


async def test_delete_when_the_supervisor_does_not_answer_keeps_the_channel(api: Api) -> None:
    channel_id = await api.create_channel()
    api.supervisor.fail_next("stop_channel", RemoteError("Crash", "boom", code=500))
    status, payload = await _json(api, "DELETE", f"/channels/{channel_id}")
    assert status == 503
    assert payload["description"] == "supervisor unavailable"
    assert payload["result"]["errors"][0]["type"] == "SupervisorUnavailable"
    assert await api.store.get_channel(channel_id) is not None


async def test_restart(api: Api) -> None:
    channel_id = await api.create_channel()
    status, payload = await _json(api, "POST", f"/channels/{channel_id}/restart")
    assert status == 200
    assert payload["description"] == "channel restarted"
    assert payload["result"] == {}
    assert api.supervisor.lifecycle()[-1] == ("restart_channel", channel_id)


async def test_supervisor_connection_is_held_as_the_api_role(api: Api) -> None:
    assert [peer.role.value for peer in api.supervisor.peers] == ["api"]


async def test_amqp_queue_accepted_with_rabbitmq(
    redis_settings: Settings, socket_dir: Path
) -> None:
    async with open_api(redis_settings, socket_dir) as api:
        channel_id = await api.create_channel(amqp_queue="myapp")
        stored = await api.store.get_channel(channel_id)
    assert stored is not None
    assert stored["amqp_queue"] == "myapp"
