"""Routers and destinations through the API (behaviour 10, DESIGN's compatibility decisions):
CRUD, validation per router type, errors, sending from a destination, message status, logs."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from api.channel_object import current_bucket
from ipc.codec import decode_vumi_message
from ipc.errors import RemoteError
from ipc.names import ROUTERS_SCOPE, destinations_scope
from ipc.payloads import EventType, VumiEvent, VumiMessage
from tests.api.test_openapi import _Conformance as Conformance

if TYPE_CHECKING:
    from tests.api.harness import Api

JsonObject = dict[str, Any]

ZERO_RATES: JsonObject = {
    "inbound_message_rate": 0,
    "outbound_message_rate": 0,
    "submitted_event_rate": 0,
    "rejected_event_rate": 0,
    "delivery_succeeded_rate": 0,
    "delivery_failed_rate": 0,
    "delivery_pending_rate": 0,
}


async def call(api: Api, method: str, path: str, body: object = None) -> tuple[int, JsonObject]:
    kwargs: JsonObject = {} if body is None else {"json": body}
    response = await api.client.open(path, method=method, **kwargs)
    payload: JsonObject = await response.get_json()
    assert payload["status"] == response.status_code
    return response.status_code, payload


async def make_router(api: Api, channel_id: str | None = None, **extra: Any) -> tuple[str, str]:
    """A from_address router on a new (or the given) channel: (channel id, router id)."""
    cid = channel_id or await api.create_channel()
    status, payload = await call(
        api, "POST", "/routers/", {"type": "from_address", "config": {"channel": cid}, **extra}
    )
    assert status == 201, payload
    return cid, payload["result"]["id"]


async def make_destination(api: Api, router_id: str, **body: Any) -> str:
    body.setdefault("config", {"regular_expression": "^123$"})
    status, payload = await call(api, "POST", f"/routers/{router_id}/destinations/", body)
    assert status == 201, payload
    destination_id: str = payload["result"]["id"]
    return destination_id


def error_of(payload: JsonObject) -> tuple[str, str, str]:
    [item] = payload["result"]["errors"]
    return payload["description"], item["type"], item["message"]


# --- routers ------------------------------------------------------------------------------


async def test_create_router_returns_it_with_rates_and_restarts_its_channel(api: Api) -> None:
    cid = await api.create_channel()
    body = {
        "type": "from_address",
        "label": "SMS longcode 12345",
        "config": {"channel": cid.upper()},
        "metadata": {"owner": 7},
    }
    status, payload = await call(api, "POST", "/routers/", body)
    assert (status, payload["code"], payload["description"]) == (201, "Created", "router created")
    result = payload["result"]
    rid = result["id"]
    assert str(uuid.UUID(rid)) == rid
    # The channel id is kept in its canonical (lower-case) form, as the original.
    assert result == {
        "id": rid,
        "type": "from_address",
        "label": "SMS longcode 12345",
        "config": {"channel": cid},
        "metadata": {"owner": 7},
        "status": ZERO_RATES,
    }
    assert api.supervisor.lifecycle()[-1] == ("start_channel", cid)
    stored = await api.store.kv_get(ROUTERS_SCOPE, rid)
    properties = {key: value for key, value in result.items() if key not in {"id", "status"}}
    assert stored == {"properties": properties, "channels": [cid]}
    status, payload = await call(api, "GET", f"/routers/{rid}")
    assert (status, payload["description"], payload["result"]) == (200, "router found", result)


async def test_list_routers_is_sorted(api: Api) -> None:
    ids = [(await make_router(api))[1] for _ in range(3)]
    status, payload = await call(api, "GET", "/routers/")
    assert (status, payload["description"], payload["result"]) == (
        200,
        "routers retrieved",
        sorted(ids),
    )


async def test_router_rates_come_from_the_previous_bucket(api: Api) -> None:
    _, rid = await make_router(api)
    window = api.settings.metric_window
    bucket = current_bucket(window)
    await api.store.incr_rate(rid, "inbound", bucket - 1, math.ceil(2 * window))
    _, payload = await call(api, "GET", f"/routers/{rid}")
    if current_bucket(window) != bucket:
        pytest.skip("a bucket boundary passed mid-test")
    assert payload["result"]["status"]["inbound_message_rate"] == 1 / window


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"type": "from_address"}, "'config' is a required property"),
        ({"config": {}}, "'type' is a required property"),
        (
            {"type": "from_address", "config": {}, "status_url": "x"},
            "Additional properties are not allowed ('status_url' was unexpected)",
        ),
        ({"type": 5, "config": {}}, "5 is not of type 'string'"),
    ],
)
async def test_router_body_schema_errors(http_api: Api, body: JsonObject, expected: str) -> None:
    status, payload = await call(http_api, "POST", "/routers/", body)
    assert status == 400
    assert payload["description"] == "api usage error"
    assert expected in [item["message"] for item in payload["result"]["errors"]]
    assert {item["type"] for item in payload["result"]["errors"]} == {"invalid_body"}


async def test_invalid_router_type_is_a_plain_string_type(http_api: Api) -> None:
    status, payload = await call(http_api, "POST", "/routers/", {"type": "foo", "config": {}})
    assert status == 400
    assert error_of(payload) == (
        "invalid router type",
        "InvalidRouterType",
        "Invalid router type foo, must be one of: from_address",
    )
    assert await http_api.store.kv_items(ROUTERS_SCOPE) == {}


async def _router_config_error(api: Api, config: JsonObject) -> str:
    status, payload = await call(
        api, "POST", "/routers/", {"type": "from_address", "config": config}
    )
    assert status == 400, payload
    description, kind, message = error_of(payload)
    assert (description, kind) == ("invalid router config", "InvalidRouterConfig")
    return message


async def test_from_address_router_config_errors(http_api: Api) -> None:
    api = http_api
    missing = str(uuid.uuid4())
    assert await _router_config_error(api, {}) == "Missing required config field 'channel'"
    assert await _router_config_error(api, {"channel": "nope"}) == (
        "Field 'channel' is not a valid UUID"
    )
    assert await _router_config_error(api, {"channel": None}) == (
        "Field 'channel': None is not of type 'string'"
    )
    assert await _router_config_error(api, {"channel": missing, "x": 1}) == (
        "Additional properties are not allowed ('x' was unexpected)"
    )
    assert await _router_config_error(api, {"channel": missing}) == (
        f"Channel {missing} does not exist"
    )
    for destination in ({"mo_url": "http://example.com/mo"}, {"mo_url": None}):
        with_destination = await api.create_channel()
        # Key presence counts (Q10): `"mo_url": null` set by a modify too.
        status, _ = await call(api, "POST", f"/channels/{with_destination}", destination)
        assert status == 200
        assert await _router_config_error(api, {"channel": with_destination}) == (
            f"Channel {with_destination} already has a destination specified"
        )
    cid, rid = await make_router(api)
    assert await _router_config_error(api, {"channel": cid}) == (
        f"Router {rid} is already routing channel {cid}"
    )
    stored = {"properties": {"type": "from_address", "config": {"channel": cid}}, "channels": [cid]}
    assert await api.store.kv_items(ROUTERS_SCOPE) == {rid: stored}


async def test_router_refused_by_its_channel_is_400_and_not_kept(api: Api) -> None:
    cid = await api.create_channel()
    api.supervisor.fail_next(
        "start_channel", RemoteError("ChannelConfigError", "router: bad idea", code=400)
    )
    status, payload = await call(
        api, "POST", "/routers/", {"type": "from_address", "config": {"channel": cid}}
    )
    assert status == 400
    assert error_of(payload) == ("invalid router config", "InvalidRouterConfig", "router: bad idea")
    assert await api.store.kv_items(ROUTERS_SCOPE) == {}
    # Restarted again, as it was.
    assert api.supervisor.lifecycle()[-2:] == [("start_channel", cid), ("start_channel", cid)]


async def test_unknown_router_is_404(http_api: Api) -> None:
    rid = str(uuid.uuid4())
    message = f"Router with ID {rid} cannot be found"
    for method, path, body in (
        ("GET", f"/routers/{rid}", None),
        ("PUT", f"/routers/{rid}", {"type": "from_address", "config": {}}),
        ("PATCH", f"/routers/{rid}", {}),
        ("DELETE", f"/routers/{rid}", None),
        ("GET", f"/routers/{rid}/logs", None),
        ("GET", f"/routers/{rid}/destinations/", None),
        ("POST", f"/routers/{rid}/destinations/", {"config": {}}),
        ("GET", f"/routers/{rid}/destinations/{rid}", None),
        ("POST", f"/routers/{rid}/destinations/{rid}/messages/", {"content": "x", "to": "1"}),
        ("GET", f"/routers/{rid}/destinations/{rid}/messages/abc", None),
        ("GET", f"/routers/{rid}/destinations/{rid}/logs", None),
    ):
        status, payload = await call(http_api, method, path, body)
        assert status == 404, (method, path, payload)
        assert error_of(payload) == ("router not found", "RouterNotFound", message)


async def test_body_is_checked_before_the_router_is_looked_up(http_api: Api) -> None:
    status, payload = await call(http_api, "PATCH", f"/routers/{uuid.uuid4()}", {"x": 1})
    assert (status, payload["description"]) == (400, "api usage error")


async def test_put_replaces_and_restarts_old_and_new_channels(api: Api) -> None:
    old_cid, rid = await make_router(api, label="old", metadata={"a": 1})
    new_cid = await api.create_channel()
    status, payload = await call(
        api, "PUT", f"/routers/{rid}", {"type": "from_address", "config": {"channel": new_cid}}
    )
    assert (status, payload["description"]) == (200, "router updated")
    assert payload["result"] == {
        "id": rid,
        "type": "from_address",
        "config": {"channel": new_cid},
        "status": ZERO_RATES,
    }
    assert api.supervisor.lifecycle()[-2:] == [
        ("start_channel", old_cid),
        ("start_channel", new_cid),
    ]
    # The old channel is free again.
    await make_router(api, old_cid)


async def test_patch_merges_and_keeps_its_own_channel(api: Api) -> None:
    cid, rid = await make_router(api, label="old", metadata={"a": 1})
    status, payload = await call(api, "PATCH", f"/routers/{rid}", {"label": "new"})
    assert status == 200, payload
    assert payload["result"]["label"] == "new"
    assert payload["result"]["metadata"] == {"a": 1}
    assert payload["result"]["config"] == {"channel": cid}


async def test_invalid_change_changes_nothing(api: Api) -> None:
    _, rid = await make_router(api, label="old")
    before = await api.store.kv_get(ROUTERS_SCOPE, rid)
    requests = len(api.supervisor.lifecycle())
    status, payload = await call(
        api, "PATCH", f"/routers/{rid}", {"label": "new", "config": {"channel": "x"}}
    )
    assert (status, error_of(payload)[1]) == (400, "InvalidRouterConfig")
    status, payload = await call(api, "PUT", f"/routers/{rid}", {"type": "nope", "config": {}})
    assert (status, error_of(payload)[1]) == (400, "InvalidRouterType")
    assert await api.store.kv_get(ROUTERS_SCOPE, rid) == before
    assert len(api.supervisor.lifecycle()) == requests


async def test_delete_router_removes_it_its_destinations_and_their_state(api: Api) -> None:
    cid, rid = await make_router(api)
    did = await make_destination(api, rid)
    inbound = VumiMessage(to_addr="123", from_addr="+27", transport_name=cid)
    await api.store.put_inbound(did, inbound.message_id, inbound.model_dump(mode="json"), 60)
    await api.store.incr_rate(rid, "inbound", 1, 60)
    await api.store.incr_rate(did, "inbound", 1, 60)
    await api.broker.publish(api.namespace.inbound_queue(did), b"{}")

    status, payload = await call(api, "DELETE", f"/routers/{rid}")
    assert (status, payload["description"], payload["result"]) == (200, "router deleted", {})
    assert api.supervisor.lifecycle()[-1] == ("start_channel", cid)
    assert await api.store.kv_get(ROUTERS_SCOPE, rid) is None
    assert await api.store.kv_items(destinations_scope(rid)) == {}
    assert await api.store.get_inbound(did, inbound.message_id, 60) is None
    assert await api.store.get_rates(rid, ["inbound"], 1) == {"inbound": 0}
    assert await api.store.get_rates(did, ["inbound"], 1) == {"inbound": 0}
    assert await api.broker.queue_length(api.namespace.inbound_queue(did)) == 0
    status, _ = await call(api, "DELETE", f"/routers/{rid}")
    assert status == 404
    # The channel can be routed again.
    await make_router(api, cid)


# --- destinations -------------------------------------------------------------------------


async def test_destination_create_get_list(api: Api) -> None:
    _, rid = await make_router(api)
    body = {
        "label": "*123*4567*1# subcode",
        "config": {"regular_expression": "^\\*123\\*4567\\*1#$"},
        "metadata": {"owner": 7},
        "mo_url": "https://www.example.org/messages",
        "mo_url_token": "my-secret-token",
        "character_limit": 140,
    }
    status, payload = await call(api, "POST", f"/routers/{rid}/destinations/", body)
    assert (status, payload["description"]) == (201, "destination created")
    did = payload["result"]["id"]
    assert payload["result"] == {**body, "id": did, "status": ZERO_RATES}
    other = await make_destination(api, rid)
    status, payload = await call(api, "GET", f"/routers/{rid}/destinations/")
    assert (status, payload["description"], payload["result"]) == (
        200,
        "destinations retrieved",
        sorted([did, other]),
    )
    status, payload = await call(api, "GET", f"/routers/{rid}/destinations/{did}")
    assert (status, payload["description"]) == (200, "destination found")
    assert payload["result"] == {**body, "id": did, "status": ZERO_RATES}


async def test_unknown_destination_is_404(http_api: Api) -> None:
    _, rid = await make_router(http_api)
    did = str(uuid.uuid4())
    message = f"Cannot find destination with ID {did} for router {rid}"
    base = f"/routers/{rid}/destinations/{did}"
    for method, path, body in (
        ("GET", base, None),
        ("PUT", base, {"config": {"regular_expression": "^1$"}}),
        ("PATCH", base, {}),
        ("DELETE", base, None),
        ("GET", f"{base}/logs", None),
        ("POST", f"{base}/messages/", {"content": "x", "to": "1"}),
        ("GET", f"{base}/messages/abc", None),
    ):
        status, payload = await call(http_api, method, path, body)
        assert status == 404, (method, path, payload)
        assert error_of(payload) == ("destination not found", "DestinationNotFound", message)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, "Missing required config field 'regular_expression'"),
        (
            {"regular_expression": "("},
            "Field 'regular_expression' is not a valid regular expression: "
            "missing ), unterminated subpattern at position 0",
        ),
        (
            {"regular_expression": "^1", "default": "yes"},
            "Field 'default': 'yes' is not of type 'boolean'",
        ),
    ],
)
async def test_destination_config_errors(http_api: Api, config: JsonObject, expected: str) -> None:
    _, rid = await make_router(http_api)
    status, payload = await call(
        http_api, "POST", f"/routers/{rid}/destinations/", {"config": config}
    )
    assert status == 400
    assert error_of(payload) == (
        "invalid router destination config",
        "InvalidRouterDestinationConfig",
        expected,
    )
    assert await http_api.store.kv_items(destinations_scope(rid)) == {}


async def test_destination_body_rejects_channel_only_keys(http_api: Api) -> None:
    _, rid = await make_router(http_api)
    body = {"config": {"regular_expression": "^1"}, "mo_url_auth_token": "t"}
    status, payload = await call(http_api, "POST", f"/routers/{rid}/destinations/", body)
    assert (status, payload["result"]["errors"][0]["type"]) == (400, "invalid_body")


async def test_one_default_destination_at_most(http_api: Api) -> None:
    _, rid = await make_router(http_api)
    first = await make_destination(
        http_api, rid, config={"regular_expression": "^1", "default": True}
    )
    status, payload = await call(
        http_api,
        "POST",
        f"/routers/{rid}/destinations/",
        {"config": {"regular_expression": "^2", "default": True}},
    )
    assert status == 400
    description, kind, message = error_of(payload)
    assert (description, kind) == (
        "invalid router destination config",
        "InvalidRouterDestinationConfig",
    )
    assert message.startswith(f"Router {rid} may have only one default destination")
    second = await make_destination(http_api, rid, config={"regular_expression": "^2"})
    status, _ = await call(
        http_api,
        "PATCH",
        f"/routers/{rid}/destinations/{second}",
        {"config": {"regular_expression": "^2", "default": True}},
    )
    assert status == 400
    # The default itself may be changed.
    status, _ = await call(
        http_api,
        "PUT",
        f"/routers/{rid}/destinations/{first}",
        {"config": {"regular_expression": "^3", "default": True}},
    )
    assert status == 200


async def test_destination_amqp_queue_needs_rabbitmq(http_api: Api) -> None:
    _, rid = await make_router(http_api)
    body = {"config": {"regular_expression": "^1"}, "amqp_queue": "app"}
    status, payload = await call(http_api, "POST", f"/routers/{rid}/destinations/", body)
    assert (status, error_of(payload)[1]) == (400, "ApiUsageError")


async def test_destination_put_patch_delete(api: Api) -> None:
    cid, rid = await make_router(api)
    did = await make_destination(api, rid, label="a", mo_url="http://example.com/a")
    base = f"/routers/{rid}/destinations/{did}"
    status, payload = await call(api, "PATCH", base, {"label": "b"})
    assert (status, payload["description"]) == (200, "destination updated")
    assert payload["result"]["label"] == "b"
    assert payload["result"]["mo_url"] == "http://example.com/a"
    status, payload = await call(api, "PUT", base, {"config": {"regular_expression": "^9"}})
    assert status == 200
    assert payload["result"] == {
        "id": did,
        "config": {"regular_expression": "^9"},
        "status": ZERO_RATES,
    }
    assert api.supervisor.lifecycle()[-1] == ("start_channel", cid)
    await api.store.incr_rate(did, "outbound", 1, 60)
    status, payload = await call(api, "DELETE", base)
    assert (status, payload["description"], payload["result"]) == (200, "destination deleted", {})
    assert await api.store.get_rates(did, ["outbound"], 1) == {"outbound": 0}
    status, _ = await call(api, "GET", base)
    assert status == 404


async def test_destination_refused_by_the_channel_keeps_the_previous_one(api: Api) -> None:
    _, rid = await make_router(api)
    did = await make_destination(api, rid, label="a")
    api.supervisor.fail_next(
        "start_channel", RemoteError("ChannelConfigError", "destination: no", code=400)
    )
    status, payload = await call(api, "PATCH", f"/routers/{rid}/destinations/{did}", {"label": "b"})
    assert status == 400
    assert error_of(payload)[1:] == ("InvalidRouterDestinationConfig", "destination: no")
    stored = await api.store.kv_get(destinations_scope(rid), did)
    assert stored is not None
    assert stored["label"] == "a"


# --- sending from a destination -----------------------------------------------------------


@pytest.mark.parametrize("slash", ["/", ""])
async def test_send_from_a_destination(api: Api, slash: str) -> None:
    cid, rid = await make_router(api)
    did = await make_destination(api, rid)
    body = {"to": "+27820000001", "from": "123", "content": "hi", "event_url": "http://e/v"}
    status, payload = await call(
        api, "POST", f"/routers/{rid}/destinations/{did}/messages{slash}", body
    )
    assert (status, payload["description"]) == (201, "message submitted")
    result = payload["result"]
    mid = result["message_id"]
    assert (result["channel_id"], result["to"], result["from"]) == (cid, "+27820000001", "123")
    for owner in (cid, did):
        record = await api.store.get_outbound(owner, mid, 60)
        assert record is not None
        assert record.message is not None
        assert record.message["destination_id"] == did
        assert record.message["router_id"] == rid
        assert record.message["event_url"] == "http://e/v"
    queue = api.namespace.outbound_queue(cid)
    assert await api.broker.queue_length(queue) == 1
    bucket = current_bucket(api.settings.metric_window)
    counted = [
        (await api.store.get_rates(owner, ["outbound"], bucket))["outbound"]
        for owner in (cid, did, rid)
    ]
    if current_bucket(api.settings.metric_window) == bucket:
        assert counted == [1, 1, 1]


async def test_destination_reply_found_under_the_destination_then_the_channel(api: Api) -> None:
    cid, rid = await make_router(api)
    did = await make_destination(api, rid)
    for owner in (did, cid):
        inbound = VumiMessage(to_addr="123", from_addr="+27821", transport_name=cid)
        await api.store.put_inbound(owner, inbound.message_id, inbound.model_dump(mode="json"), 60)
        status, payload = await call(
            api,
            "POST",
            f"/routers/{rid}/destinations/{did}/messages/",
            {"reply_to": inbound.message_id, "content": "answer"},
        )
        assert status == 201, payload
        assert (payload["result"]["to"], payload["result"]["from"]) == ("+27821", "123")
        assert payload["result"]["reply_to"] == inbound.message_id
    status, payload = await call(
        api,
        "POST",
        f"/routers/{rid}/destinations/{did}/messages/",
        {"reply_to": "nope", "content": "answer"},
    )
    assert (status, error_of(payload)[1]) == (400, "MessageNotFound")
    status, payload = await call(
        api, "POST", f"/routers/{rid}/destinations/{did}/messages/", {"content": "x"}
    )
    assert (status, error_of(payload)[1]) == (400, "ApiUsageError")


async def test_destination_character_limit_applies(http_api: Api) -> None:
    _, rid = await make_router(http_api)
    did = await make_destination(http_api, rid, character_limit=3)
    status, payload = await call(
        http_api,
        "POST",
        f"/routers/{rid}/destinations/{did}/messages/",
        {"to": "1", "content": "four"},
    )
    assert status == 400
    assert error_of(payload)[:2] == ("message too long", "MessageTooLong")


async def test_channel_limit_applies_to_destination_sends_too(http_api: Api) -> None:
    cid = await http_api.create_channel(character_limit=2)
    _, rid = await make_router(http_api, cid)
    did = await make_destination(http_api, rid)
    status, payload = await call(
        http_api,
        "POST",
        f"/routers/{rid}/destinations/{did}/messages/",
        {"to": "1", "content": "abc"},
    )
    assert (status, error_of(payload)[1]) == (400, "MessageTooLong")


async def test_destination_send_after_its_channel_was_deleted_is_404(http_api: Api) -> None:
    cid, rid = await make_router(http_api)
    did = await make_destination(http_api, rid)
    await http_api.store.delete_channel(cid)
    status, payload = await call(
        http_api,
        "POST",
        f"/routers/{rid}/destinations/{did}/messages/",
        {"to": "1", "content": "x"},
    )
    assert (status, error_of(payload)[1]) == (404, "ChannelNotFound")


async def test_a_routed_channel_can_be_sent_through(api: Api) -> None:
    cid, _ = await make_router(api)
    status, payload = await call(
        api, "POST", f"/channels/{cid}/messages/", {"to": "1", "from": "123", "content": "x"}
    )
    assert status == 201, payload
    mid = payload["result"]["message_id"]
    status, payload = await call(api, "GET", f"/channels/{cid}/messages/{mid}")
    assert (status, payload["result"]["events"]) == (200, [])
    [body] = [await _queued(api, cid)]
    assert decode_vumi_message(body).message_id == mid
    # An unrouted channel without mo_url or amqp_queue still cannot.
    plain = await api.create_channel()
    status, payload = await call(
        api, "POST", f"/channels/{plain}/messages/", {"to": "1", "content": "x"}
    )
    assert (status, error_of(payload)[1]) == (400, "ApiUsageError")


async def _queued(api: Api, channel_id: str) -> bytes:
    queue = api.namespace.outbound_queue(channel_id)
    async with api.broker.consume(queue, prefetch=1) as consumer:
        delivery = await consumer.receive()
        await consumer.ack(delivery)
        return delivery.body


async def test_destination_message_status(api: Api) -> None:
    _, rid = await make_router(api)
    did = await make_destination(api, rid)
    mid = "0" * 32
    event = VumiEvent(event_type=EventType.ACK, user_message_id=mid, sent_message_id="s")
    await api.store.add_event(did, mid, event.event_id, event.model_dump(mode="json"), 60)
    status, payload = await call(api, "GET", f"/routers/{rid}/destinations/{did}/messages/{mid}")
    assert (status, payload["description"]) == (200, "message status")
    assert payload["result"] == {
        "id": mid,
        "last_event_type": "submitted",
        "last_event_timestamp": event.timestamp,
        "events": [
            {
                "channel_id": did,
                "message_id": mid,
                "timestamp": event.timestamp,
                "event_type": "submitted",
                "event_details": {},
            }
        ],
        "timeline": [
            {
                "timestamp": event.timestamp,
                "stage": "event",
                "details": {
                    "event_type": "submitted",
                    "event_details": {},
                    "provider_message_id": "s",
                },
            }
        ],
    }


# --- logs ---------------------------------------------------------------------------------


def _write_log(api: Api, owner_id: str, count: int) -> list[JsonObject]:
    entries = [
        {"logger": owner_id, "level": 20, "timestamp": 1.0 + i, "message": f"m{i}"}
        for i in range(count)
    ]
    directory = Path(api.settings.logging_path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / owner_id).write_text("".join(json.dumps(e) + "\n" for e in entries))
    return entries


async def test_router_and_destination_logs(http_api: Api) -> None:
    _, rid = await make_router(http_api)
    did = await make_destination(http_api, rid)
    router_entries = _write_log(http_api, rid, 3)
    destination_entries = _write_log(http_api, did, 2)
    status, payload = await call(http_api, "GET", f"/routers/{rid}/logs?n=2")
    assert (status, payload["description"]) == (200, "logs retrieved")
    assert payload["result"] == router_entries[:0:-1]
    status, payload = await call(http_api, "GET", f"/routers/{rid}/destinations/{did}/logs")
    assert payload["result"] == destination_entries[::-1]
    for path in (f"/routers/{rid}/logs?n=x", f"/routers/{rid}/destinations/{did}/logs?n=x"):
        status, payload = await call(http_api, "GET", path)
        assert (status, error_of(payload)[1]) == (400, "ApiUsageError")


# --- the OpenAPI document describes these answers -----------------------------------------


async def test_router_answers_match_the_document(api: Api) -> None:
    response = await api.client.get("/openapi.json")
    conformance = Conformance(await response.get_json())

    async def check(template: str, method: str, path: str, body: object = None) -> JsonObject:
        status, payload = await call(api, method.upper(), path, body)
        conformance.check(template, method, status, payload)
        return payload

    cid = await api.create_channel()
    created = await check(
        "/routers/", "post", "/routers/", {"type": "from_address", "config": {"channel": cid}}
    )
    rid = created["result"]["id"]
    await check("/routers/", "post", "/routers/", {"type": "nope", "config": {}})
    await check("/routers/", "get", "/routers/")
    await check("/routers/{router_id}", "get", f"/routers/{rid}")
    await check("/routers/{router_id}", "get", "/routers/nope")
    await check("/routers/{router_id}", "patch", f"/routers/{rid}", {"label": "x"})
    await check(
        "/routers/{router_id}",
        "put",
        f"/routers/{rid}",
        {"type": "from_address", "config": {"channel": cid}},
    )
    await check("/routers/{router_id}/logs", "get", f"/routers/{rid}/logs")
    base = "/routers/{router_id}/destinations/"
    destination = await check(
        base, "post", f"/routers/{rid}/destinations/", {"config": {"regular_expression": "^1"}}
    )
    did = destination["result"]["id"]
    await check(base, "get", f"/routers/{rid}/destinations/")
    item = base + "{destination_id}"
    await check(item, "get", f"/routers/{rid}/destinations/{did}")
    await check(item, "patch", f"/routers/{rid}/destinations/{did}", {"label": "y"})
    await check(
        item, "put", f"/routers/{rid}/destinations/{did}", {"config": {"regular_expression": "^2"}}
    )
    await check(item + "/logs", "get", f"/routers/{rid}/destinations/{did}/logs")
    sent = await check(
        item + "/messages/",
        "post",
        f"/routers/{rid}/destinations/{did}/messages/",
        {"to": "1", "content": "x"},
    )
    await check(
        item + "/messages",
        "post",
        f"/routers/{rid}/destinations/{did}/messages",
        {"to": "1", "content": "x"},
    )
    mid = sent["result"]["message_id"]
    await check(
        item + "/messages/{message_id}", "get", f"/routers/{rid}/destinations/{did}/messages/{mid}"
    )
    await check(item, "delete", f"/routers/{rid}/destinations/{did}")
    await check("/routers/{router_id}", "delete", f"/routers/{rid}")
    assert len(conformance.checked) == 19
