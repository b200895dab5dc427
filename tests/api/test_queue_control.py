"""Queue control through the API (issue 7): channel fields, backpressure (429 + Retry-After),
idempotent sends, expiry, pause/resume/cancel records, the queue snapshot, callback templates
and the router follow-ups. The channel side is out of scope here: what the API writes and
answers is checked, on both backends."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from api.queue_control import QUEUES_KEY, RETRY_AFTER_PAUSED, RETRY_AFTER_UNKNOWN, STATE_KEY
from ipc.codec import decode_vumi_message
from ipc.names import cancelled_scope, control_scope, runtime_scope
from ipc.payloads import EventType, VumiEvent, VumiMessage, vumi_timestamp
from tests.api.harness import open_api

if TYPE_CHECKING:
    from werkzeug.datastructures import Headers

    from ipc.settings import Settings
    from tests.api.harness import Api

JsonObject = dict[str, Any]


async def call(
    api: Api,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, JsonObject, Headers]:
    """Status, payload and headers (looked up case-insensitively) of one request."""
    kwargs: JsonObject = {} if body is None else {"json": body}
    response = await api.client.open(path, method=method, headers=headers or {}, **kwargs)
    payload: JsonObject = await response.get_json()
    assert payload["status"] == response.status_code
    return response.status_code, payload, response.headers


def error_of(payload: JsonObject) -> tuple[str, str, str]:
    [item] = payload["result"]["errors"]
    return payload["description"], item["type"], item["message"]


async def send(
    api: Api, channel_id: str, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, JsonObject, Headers]:
    body.setdefault("to", "+27820000001")
    body.setdefault("content", "hi")
    return await call(api, "POST", f"/channels/{channel_id}/messages/", body, headers)


async def queued(api: Api, channel_id: str) -> int:
    return await api.broker.queue_length(api.namespace.outbound_queue(channel_id))


async def take(api: Api, channel_id: str, count: int) -> list[VumiMessage]:
    """Take (and ack) `count` messages off the channel's outbound queue."""
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
    return await api.create_channel(mo_url="http://example.com/mo")


@pytest.fixture
async def http_channel(http_api: Api) -> str:
    return await http_api.create_channel(mo_url="http://example.com/mo")


# --- channel fields -----------------------------------------------------------------------


async def test_queue_limit_and_signing_secret_are_channel_fields(api: Api) -> None:
    cid = await api.create_channel(
        mo_url="http://example.com/mo", queue_limit=5, signing_secret="k3y"
    )
    status, payload, _ = await call(api, "GET", f"/channels/{cid}")
    assert status == 200
    assert (payload["result"]["queue_limit"], payload["result"]["signing_secret"]) == (5, "k3y")
    # queue_limit is the API's alone: no restart; a new signing_secret restarts the channel.
    status, payload, _ = await call(api, "POST", f"/channels/{cid}", {"queue_limit": None})
    assert (status, payload["result"]["queue_limit"]) == (200, None)
    assert api.supervisor.lifecycle() == [("start_channel", cid)]
    status, _, _ = await call(api, "POST", f"/channels/{cid}", {"signing_secret": "other"})
    assert status == 200
    assert api.supervisor.lifecycle() == [("start_channel", cid)] * 2


@pytest.mark.parametrize(
    "body",
    [{"queue_limit": 0}, {"queue_limit": "5"}, {"signing_secret": 7}],
)
async def test_bad_channel_fields_are_refused(http_api: Api, body: JsonObject) -> None:
    status, payload, _ = await call(
        http_api, "POST", "/channels/", {"type": "fake", "config": {"host": "h"}, **body}
    )
    assert status == 400
    assert payload["result"]["errors"][0]["type"] == "invalid_body"


# --- backpressure -------------------------------------------------------------------------


async def test_a_full_queue_answers_429_with_retry_after(api: Api) -> None:
    cid = await api.create_channel(mo_url="http://example.com/mo", queue_limit=2)
    for _ in range(2):
        assert (await send(api, cid))[0] == 201
    status, payload, headers = await send(api, cid)
    assert status == 429
    description, kind, message = error_of(payload)
    assert (description, kind) == ("queue full", "QueueFull")
    assert "2 messages queued" in message
    assert "queue_limit is 2" in message
    assert headers["Retry-After"] == str(RETRY_AFTER_UNKNOWN)
    # The refused send left nothing behind.
    assert await queued(api, cid) == 2
    await take(api, cid, 1)
    assert (await send(api, cid))[0] == 201


async def test_retry_after_follows_the_send_rate_and_a_pause(api: Api) -> None:
    cid = await api.create_channel(mo_url="http://example.com/mo", queue_limit=2)
    assert (await send(api, cid))[0] == 201
    assert (await send(api, cid))[0] == 201
    # A lower limit applies at once: two queued, limit one, so two must go before a send
    # fits; at 0.5/s that is 4 s.
    assert (await call(api, "POST", f"/channels/{cid}", {"queue_limit": 1}))[0] == 200
    snapshot = {"send_rate": 0.5, "updated": vumi_timestamp()}
    await api.store.kv_put(runtime_scope(cid), QUEUES_KEY, snapshot)
    assert (await send(api, cid))[2]["Retry-After"] == "4"
    assert (await call(api, "POST", f"/channels/{cid}/pause"))[0] == 200
    assert (await send(api, cid))[2]["Retry-After"] == str(RETRY_AFTER_PAUSED)


async def test_default_queue_limit_applies_to_channels_without_one(
    embedded_settings: Settings, socket_dir: Path
) -> None:
    settings = embedded_settings.model_copy(update={"default_queue_limit": 1})
    async with open_api(settings, socket_dir) as api:
        limited = await api.create_channel(mo_url="http://example.com/mo")
        unlimited = await api.create_channel(mo_url="http://example.com/mo", queue_limit=10)
        assert (await send(api, limited))[0] == 201
        assert (await send(api, limited))[0] == 429
        for _ in range(3):
            assert (await send(api, unlimited))[0] == 201


# --- idempotency --------------------------------------------------------------------------


async def test_a_repeated_idempotency_key_answers_the_first_send(api: Api, channel_id: str) -> None:
    key = {"Idempotency-Key": "order-17"}
    status, first, headers = await send(api, channel_id, key)
    assert status == 201
    assert "Idempotent-Replayed" not in headers
    status, again, headers = await send(api, channel_id, key, content="changed")
    assert (status, again["result"]) == (201, first["result"])
    assert headers["Idempotent-Replayed"] == "true"
    # The body field is the same key.
    status, body_key, _ = await send(api, channel_id, idempotency_key="order-17")
    assert (status, body_key["result"]) == (201, first["result"])
    assert await queued(api, channel_id) == 1
    # Another key, or the same key on another channel, is another send.
    status, other, _ = await send(api, channel_id, {"Idempotency-Key": "order-18"})
    assert other["result"]["message_id"] != first["result"]["message_id"]
    second = await api.create_channel(mo_url="http://example.com/mo")
    status, elsewhere, _ = await send(api, second, key)
    assert elsewhere["result"]["channel_id"] == second
    assert await queued(api, channel_id) == 2
    assert await queued(api, second) == 1


async def test_a_replay_is_answered_even_when_the_queue_is_full(api: Api) -> None:
    cid = await api.create_channel(mo_url="http://example.com/mo", queue_limit=1)
    status, first, _ = await send(api, cid, idempotency_key="k")
    assert status == 201
    assert (await send(api, cid))[0] == 429
    status, again, _ = await send(api, cid, idempotency_key="k")
    assert (status, again["result"]) == (201, first["result"])


async def test_concurrent_sends_with_one_key_send_once(api: Api, channel_id: str) -> None:
    results: list[JsonObject] = []

    async def one() -> None:
        status, payload, _ = await send(api, channel_id, {"Idempotency-Key": "same"})
        assert status == 201
        results.append(payload["result"])

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert len({result["message_id"] for result in results}) == 1
    assert await queued(api, channel_id) == 1


@pytest.mark.parametrize(
    ("headers", "body", "fragment"),
    [
        ({"Idempotency-Key": "a"}, {"idempotency_key": "b"}, "differ"),
        ({"Idempotency-Key": "x" * 201}, {}, "1 to 200"),
    ],
)
async def test_bad_idempotency_keys_are_refused(
    http_api: Api, headers: dict[str, str], body: JsonObject, fragment: str
) -> None:
    cid = await http_api.create_channel(mo_url="http://example.com/mo")
    status, payload, _ = await send(http_api, cid, headers, **body)
    assert status == 400
    assert fragment in error_of(payload)[2]
    assert await queued(http_api, cid) == 0


async def test_an_overlong_body_key_fails_the_schema(http_api: Api) -> None:
    cid = await http_api.create_channel(mo_url="http://example.com/mo")
    status, payload, _ = await send(http_api, cid, idempotency_key="x" * 201)
    assert (status, payload["result"]["errors"][0]["type"]) == (400, "invalid_body")


# --- expiry -------------------------------------------------------------------------------


async def test_validity_and_expires_at_become_routing_metadata(api: Api, channel_id: str) -> None:
    before = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert (await send(api, channel_id, validity=60))[0] == 201
    assert (await send(api, channel_id, expires_at="2030-01-02T03:04:05+02:00"))[0] == 201
    assert (await send(api, channel_id, expires_at="2030-01-02 03:04:05.500000"))[0] == 201
    assert (await send(api, channel_id))[0] == 201
    messages = await take(api, channel_id, 4)
    expiry = dt.datetime.strptime(
        messages[0].routing_metadata["expires_at"], "%Y-%m-%d %H:%M:%S.%f"
    )
    assert dt.timedelta(seconds=59) < expiry - before < dt.timedelta(seconds=70)
    assert messages[1].routing_metadata["expires_at"] == "2030-01-02 01:04:05.000000"
    assert messages[2].routing_metadata["expires_at"] == "2030-01-02 03:04:05.500000"
    assert "expires_at" not in messages[3].routing_metadata


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"validity": 5, "expires_at": "2030-01-01 00:00:00"}, "not both"),
        ({"expires_at": "tomorrow"}, "not a date-time"),
        ({"expires_at": "0900-01-01 00:00:00"}, "between the years"),
        ({"validity": 10**12}, "too far"),
    ],
)
async def test_bad_expiry_is_refused(http_api: Api, body: JsonObject, fragment: str) -> None:
    cid = await http_api.create_channel(mo_url="http://example.com/mo")
    status, payload, _ = await send(http_api, cid, **body)
    assert status == 400
    assert fragment in error_of(payload)[2]


async def test_validity_below_one_second_fails_the_schema(http_api: Api) -> None:
    cid = await http_api.create_channel(mo_url="http://example.com/mo")
    status, payload, _ = await send(http_api, cid, validity=0)
    assert (status, payload["result"]["errors"][0]["type"]) == (400, "invalid_body")


# --- pause, resume, cancel ----------------------------------------------------------------


async def test_pause_and_resume_write_the_control_state(api: Api, channel_id: str) -> None:
    status, payload, _ = await call(api, "POST", f"/channels/{channel_id}/pause", {"any": 1})
    assert (status, payload["description"]) == (200, "channel paused")
    assert payload["result"]["paused"] is True
    stored = await api.store.kv_get(control_scope(channel_id), STATE_KEY)
    assert stored == payload["result"]
    # Without a snapshot from the channel process, the status shows the control state.
    _, channel, _ = await call(api, "GET", f"/channels/{channel_id}")
    assert channel["result"]["status"]["queues"]["paused"] is True

    status, payload, _ = await call(api, "POST", f"/channels/{channel_id}/resume")
    assert (status, payload["description"]) == (200, "channel resumed")
    assert payload["result"]["paused"] is False
    stored = await api.store.kv_get(control_scope(channel_id), STATE_KEY)
    assert stored is not None
    assert stored["paused"] is False


async def test_cancel_all_covers_the_messages_queued_before_it(api: Api, channel_id: str) -> None:
    _, before, _ = await send(api, channel_id)
    await call(api, "POST", f"/channels/{channel_id}/pause")
    status, payload, _ = await call(api, "POST", f"/channels/{channel_id}/messages/cancel", {})
    assert (status, payload["description"]) == (200, "messages cancelled")
    cancel_before = payload["result"]["cancel_before"]
    _, after, _ = await send(api, channel_id)
    assert before["result"]["timestamp"] <= cancel_before < after["result"]["timestamp"]
    stored = await api.store.kv_get(control_scope(channel_id), STATE_KEY)
    assert stored is not None
    # The pause is kept: cancelling does not change it.
    assert (stored["cancel_before"], stored["paused"]) == (cancel_before, True)


async def test_cancel_one_message(api: Api, channel_id: str) -> None:
    _, sent, _ = await send(api, channel_id)
    mid = sent["result"]["message_id"]
    status, payload, _ = await call(api, "DELETE", f"/channels/{channel_id}/messages/{mid}")
    assert (status, payload["description"]) == (200, "message cancelled")
    assert payload["result"]["message_id"] == mid
    record = await api.store.kv_get(cancelled_scope(channel_id), mid)
    assert record == {"at": payload["result"]["at"]}

    status, payload, _ = await call(api, "DELETE", f"/channels/{channel_id}/messages/nope")
    assert (status, error_of(payload)[1]) == (400, "MessageNotFound")

    _, sent, _ = await send(api, channel_id)
    done = sent["result"]["message_id"]
    ack = VumiEvent(event_type=EventType.ACK, user_message_id=done, sent_message_id="p1")
    await api.store.add_event(channel_id, done, ack.event_id, ack.model_dump(mode="json"), 60)
    status, payload, _ = await call(api, "DELETE", f"/channels/{channel_id}/messages/{done}")
    assert status == 400
    assert "already left the queue" in error_of(payload)[2]
    assert await api.store.kv_get(cancelled_scope(channel_id), done) is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/pause"),
        ("POST", "/resume"),
        ("POST", "/messages/cancel"),
        ("DELETE", "/messages/m1"),
    ],
)
async def test_control_of_an_unknown_channel_is_404(http_api: Api, method: str, path: str) -> None:
    status, payload, _ = await call(http_api, method, f"/channels/nope{path}")
    assert (status, error_of(payload)[1]) == (404, "ChannelNotFound")


# --- queue snapshot -----------------------------------------------------------------------


async def test_the_status_shows_the_channels_queue_snapshot(api: Api, channel_id: str) -> None:
    snapshot = {
        "outbound": 12,
        "inbound": 1,
        "events": 2,
        "oldest_outbound_age": 3.5,
        "send_rate": 4.0,
        "drain_seconds": 3.0,
        "paused": False,
        "updated": vumi_timestamp(),
    }
    await api.store.kv_put(runtime_scope(channel_id), QUEUES_KEY, snapshot)
    _, payload, _ = await call(api, "GET", f"/channels/{channel_id}")
    assert payload["result"]["status"]["queues"] == snapshot


async def test_a_stale_snapshot_gives_way_to_the_brokers_counts(api: Api, channel_id: str) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    stale = {"outbound": 99, "send_rate": 4.0, "paused": True, "updated": vumi_timestamp(old)}
    await api.store.kv_put(runtime_scope(channel_id), QUEUES_KEY, stale)
    for _ in range(2):
        await send(api, channel_id)
    _, payload, _ = await call(api, "GET", f"/channels/{channel_id}")
    assert payload["result"]["status"]["queues"] == {
        "outbound": 2,
        "inbound": 0,
        "events": 0,
        "oldest_outbound_age": None,
        "send_rate": None,
        "drain_seconds": None,
        "paused": False,
        "updated": None,
    }


# --- timeline -----------------------------------------------------------------------------


async def test_a_send_records_accepted_and_queued(api: Api, channel_id: str) -> None:
    _, sent, _ = await send(api, channel_id, priority=4, expires_at="2030-01-01 00:00:00")
    mid = sent["result"]["message_id"]
    attempt = {
        "message_type": "timeline",
        "timestamp": vumi_timestamp(),
        "stage": "send_attempt",
        "details": {"attempt": 1, "outcome": "ok", "provider_message_id": "p1", "error": None},
    }
    await api.store.add_event(channel_id, mid, "t1", attempt, 60)
    ack = VumiEvent(event_type=EventType.ACK, user_message_id=mid, sent_message_id="p1")
    await api.store.add_event(channel_id, mid, ack.event_id, ack.model_dump(mode="json"), 60)
    status, payload, _ = await call(api, "GET", f"/channels/{channel_id}/messages/{mid}")
    assert status == 200
    result = payload["result"]
    assert [event["event_type"] for event in result["events"]] == ["submitted"]
    assert [entry["stage"] for entry in result["timeline"]] == [
        "accepted",
        "queued",
        "send_attempt",
        "event",
    ]
    accepted = result["timeline"][0]
    assert accepted["details"] == {"priority": 4, "expires_at": "2030-01-01 00:00:00.000000"}
    assert result["timeline"][2]["details"] == attempt["details"]
    assert result["timeline"][3]["details"]["provider_message_id"] == "p1"
    stamps = [entry["timestamp"] for entry in result["timeline"]]
    assert stamps == sorted(stamps)


# --- logs by message ----------------------------------------------------------------------


def _write_log(directory: Path, channel_id: str, entries: list[JsonObject]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{channel_id}.1").write_text("".join(json.dumps(e) + "\n" for e in entries[:3]))
    (directory / channel_id).write_text("".join(json.dumps(e) + "\n" for e in entries[3:]))


async def test_logs_by_message_id(http_api: Api, http_channel: str) -> None:
    channel_id = http_channel
    entries = [
        {"logger": channel_id, "level": 20, "timestamp": 1.0 + i, "message": f"m{i}"}
        | ({"message_id": "a"} if i % 2 else {})
        for i in range(6)
    ]
    # The older half in the rotated file: the filter reads on until it has n entries.
    _write_log(Path(http_api.settings.logging_path), channel_id, entries)
    path = f"/channels/{channel_id}/logs"
    status, payload, _ = await call(http_api, "GET", f"{path}?message_id=a")
    assert status == 200
    assert [entry["message"] for entry in payload["result"]] == ["m5", "m3", "m1"]
    _, payload, _ = await call(http_api, "GET", f"{path}?message_id=a&n=2")
    assert [entry["message"] for entry in payload["result"]] == ["m5", "m3"]
    _, payload, _ = await call(http_api, "GET", f"{path}?message_id=zzz")
    assert payload["result"] == []
