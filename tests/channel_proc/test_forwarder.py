"""The forwarder on both backends, with a fake webhook receiver as mo_url / event_url."""

from __future__ import annotations

import base64
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import trio

from channel_proc.forwarder import Routes
from channel_proc.transports.base import StatusLevel
from ipc.broker import open_broker
from ipc.codec import encode_payload
from ipc.deadletters import SourceQueue
from ipc.names import amqp_event_key, amqp_inbound_key, amqp_outbound_queue
from ipc.payloads import (
    DeliveryStatus,
    EventType,
    SessionEvent,
    VumiEvent,
    VumiMessage,
    api_event,
    api_message,
)
from ipc.state import open_state
from tests.channel_proc.support import WAIT, StatusInbox, drain_queue, wait_for, wait_for_length
from tests.channel_proc.webhook_support import (
    Forwarders,
    assert_queue_copies,
    inbound_msg,
    wait_dead_letters,
)
from tests.fakes.webhook import DROP

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.settings import Settings
    from ipc.state import OutboundRecord, RateCount, StateStore
    from tests.fakes.webhook import FakeWebhook


def vumi_events(record: OutboundRecord) -> list[dict[str, Any]]:
    """The stored vumi events (the list also holds timeline entries)."""
    return [e for e in record.events if e.get("message_type") == "event"]


async def rate(store: StateStore, channel_id: str, label: str, since: int) -> int:
    """Sum of the label's counters from bucket `since` to now (a bucket may roll over)."""
    now = int(time.time() / 10.0)
    total = 0
    for bucket in range(since, now + 1):
        total += (await store.get_rates(channel_id, [label], bucket))[label]
    return total


@pytest.fixture
def forwarders(
    settings: Settings, namespace: Namespace, store: StateStore, broker: Broker, channel_id: str
) -> Forwarders:
    return Forwarders(settings, namespace, store, broker, channel_id)


async def test_forwarder_inbound_reaches_mo_url_with_token(
    forwarders: Forwarders,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    msg = inbound_msg()
    bucket = int(time.time() / 10.0)
    await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))
    routes = Routes(mo_url=webhook.url("/mo"), mo_url_auth_token="mo-token-123")
    async with forwarders(routes):
        with trio.fail_after(WAIT):
            (request,) = await webhook.wait_for_requests(1)
    assert request.path == "/mo"
    assert request.headers["authorization"] == "Token mo-token-123"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == api_message(msg, channel_id)
    assert await store.get_inbound(channel_id, msg.message_id, 600) == msg.model_dump(mode="json")
    assert await rate(store, channel_id, "inbound", bucket) == 1
    assert await broker.queue_length(namespace.inbound_queue(channel_id)) == 0


async def test_forwarder_inbound_basic_auth_from_url_userinfo(
    forwarders: Forwarders,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    await broker.publish(namespace.inbound_queue(channel_id), encode_payload(inbound_msg()))
    url = webhook.url("/mo").replace("http://", "http://user:p%40ss@")
    async with forwarders(Routes(mo_url=url)):
        with trio.fail_after(WAIT):
            (request,) = await webhook.wait_for_requests(1)
    expected = base64.b64encode(b"user:p@ss").decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    assert request.path == "/mo"


async def test_forwarder_session_close_is_forwarded(
    forwarders: Forwarders,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    msg = VumiMessage(from_addr="a", to_addr="b", session_event=SessionEvent.CLOSE)
    await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))
    async with forwarders(Routes(mo_url=webhook.url())):
        with trio.fail_after(WAIT):
            (request,) = await webhook.wait_for_requests(1)
    assert request.json()["channel_data"] == {"session_event": "close"}
    assert request.json()["content"] is None


async def test_forwarder_event_reaches_event_url(
    forwarders: Forwarders,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    mid = uuid.uuid4().hex
    record = {
        "message_id": mid,
        "to": "x",
        "event_url": webhook.url("/ev"),
        "event_auth_token": "ev-tok",
    }
    await store.put_outbound(channel_id, mid, record, 600)
    event = VumiEvent(event_type=EventType.ACK, user_message_id=mid, sent_message_id=mid)
    bucket = int(time.time() / 10.0)
    await broker.publish(namespace.event_queue(channel_id), encode_payload(event))
    async with forwarders(Routes()):
        with trio.fail_after(WAIT):
            (request,) = await webhook.wait_for_requests(1)
    assert request.path == "/ev"
    assert request.headers["authorization"] == "Token ev-tok"
    assert request.json() == api_event(event, channel_id)
    assert request.json()["event_type"] == "submitted"
    stored = await store.get_outbound(channel_id, mid, 600)
    assert stored is not None
    assert [e["event_id"] for e in vumi_events(stored)] == [event.event_id]
    assert await rate(store, channel_id, "submitted", bucket) == 1
    assert await broker.queue_length(namespace.event_queue(channel_id)) == 0


async def test_forwarder_event_without_record_is_stored_and_acked(
    forwarders: Forwarders,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    event = VumiEvent(event_type=EventType.NACK, user_message_id="m1", nack_reason="no")
    await broker.publish(namespace.event_queue(channel_id), encode_payload(event))
    async with forwarders(Routes()):
        await wait_for_length(broker, namespace.event_queue(channel_id), 0)

        async def stored() -> bool:
            record = await store.get_outbound(channel_id, "m1", 600)
            return record is not None and len(record.events) == 1

        with trio.fail_after(WAIT):
            await wait_for(stored)
    assert webhook.requests == []


EVENT_CASES = [
    pytest.param(
        {"event_type": EventType.ACK, "sent_message_id": "provider-1"},
        "submitted",
        {},
        id="submitted",
    ),
    pytest.param(
        {"event_type": EventType.NACK, "nack_reason": "no route to the handset"},
        "rejected",
        {"reason": "no route to the handset"},
        id="rejected",
    ),
    pytest.param(
        {"event_type": EventType.DELIVERY_REPORT, "delivery_status": DeliveryStatus.DELIVERED},
        "delivery_succeeded",
        {},
        id="delivery_succeeded",
    ),
    pytest.param(
        {"event_type": EventType.DELIVERY_REPORT, "delivery_status": DeliveryStatus.FAILED},
        "delivery_failed",
        {},
        id="delivery_failed",
    ),
    pytest.param(
        {"event_type": EventType.DELIVERY_REPORT, "delivery_status": DeliveryStatus.PENDING},
        "delivery_pending",
        {},
        id="delivery_pending",
    ),
]


@pytest.mark.parametrize(("fields", "event_type", "details"), EVENT_CASES)
async def test_forwarder_every_event_type_posts_the_documented_body(
    forwarders: Forwarders,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
    fields: dict[str, object],
    event_type: str,
    details: dict[str, object],
) -> None:
    """Docs 1.8.2: the POST body, and what message status and rates make of the event."""
    mid = uuid.uuid4().hex
    record = {"message_id": mid, "to": "+27821234567", "event_url": webhook.url("/ev")}
    await store.put_outbound(channel_id, mid, record, 600)
    event = VumiEvent(user_message_id=mid, transport_name=channel_id, **fields)
    bucket = int(time.time() / 10.0)
    await broker.publish(namespace.event_queue(channel_id), encode_payload(event))
    async with forwarders(Routes()):
        with trio.fail_after(WAIT):
            (request,) = await webhook.wait_for_requests(1)
    assert "authorization" not in request.headers
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "event_type": event_type,
        "message_id": mid,
        "channel_id": channel_id,
        "timestamp": event.timestamp,
        "event_details": details,
    }
    stored = await store.get_outbound(channel_id, mid, 600)
    assert stored is not None
    assert stored.message == record
    (kept,) = vumi_events(stored)
    assert kept == event.model_dump(mode="json")
    # What GET /channels/{id}/messages/{mid} renders as the message's events.
    assert api_event(VumiEvent.model_validate(kept), channel_id) == request.json()
    assert await rate(store, channel_id, event_type, bucket) == 1


async def test_forwarder_event_without_delivery_status_is_stored_not_posted_nor_counted(
    forwarders: Forwarders,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    mid = uuid.uuid4().hex
    await store.put_outbound(channel_id, mid, {"event_url": webhook.url("/ev")}, 600)
    odd = VumiEvent(event_type=EventType.DELIVERY_REPORT, user_message_id=mid)
    ack = VumiEvent(event_type=EventType.ACK, user_message_id=mid)
    for event in (odd, ack):
        await broker.publish(namespace.event_queue(channel_id), encode_payload(event))
    async with forwarders(Routes()):
        with trio.fail_after(WAIT):
            (request,) = await webhook.wait_for_requests(1)
        await wait_for_length(broker, namespace.event_queue(channel_id), 0)
    # Queue order: the unrecognised event was handled (and skipped) before the ack.
    assert request.json()["event_type"] == "submitted"
    stored = await store.get_outbound(channel_id, mid, 600)
    assert stored is not None
    assert [e["event_id"] for e in vumi_events(stored)] == [odd.event_id, ack.event_id]


@pytest.mark.slow
async def test_forwarder_event_of_expired_record_goes_to_amqp_but_not_event_url(
    settings: Settings,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    amqp_queue = f"jbtest-{uuid.uuid4().hex[:12]}"
    event_key = amqp_event_key(amqp_queue)
    if settings.amqp is not None:
        await broker.declare_queue(event_key)
    try:
        mid = uuid.uuid4().hex
        ttl = 0.2
        await store.put_outbound(channel_id, mid, {"event_url": webhook.url("/ev")}, ttl)
        # A TTL is a duration: only time passing makes the record expire (a poll would
        # refresh it, since reads slide the TTL).
        await trio.sleep(ttl * 2)
        expired = VumiEvent(event_type=EventType.ACK, user_message_id=mid)
        # A live message after it: once its POST arrives, the expired one was handled.
        live = uuid.uuid4().hex
        await store.put_outbound(channel_id, live, {"event_url": webhook.url("/live")}, 600)
        later = VumiEvent(event_type=EventType.ACK, user_message_id=live)
        for event in (expired, later):
            await broker.publish(namespace.event_queue(channel_id), encode_payload(event))
        async with Forwarders(settings, namespace, store, broker, channel_id)(
            Routes(amqp_queue=amqp_queue)
        ):
            with trio.fail_after(WAIT):
                await webhook.wait_for_requests(1, path="/live")
            if settings.amqp is not None:
                relayed = await drain_queue(broker, event_key, 2)
                assert relayed == [encode_payload(expired), encode_payload(later)]
        assert webhook.on_path("/ev", delivered_only=False) == []
        # The event is still kept (for GET message status), on a fresh record.
        stored = await store.get_outbound(channel_id, mid, 600)
        assert stored is not None
        assert stored.message is None
        assert [e["event_id"] for e in stored.events] == [expired.event_id]
    finally:
        if settings.amqp is not None:
            await broker.delete_queue(event_key)


@pytest.mark.slow
async def test_forwarder_retries_until_delivered_and_then_acks(
    forwarders: Forwarders,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    webhook.fail_next(2, status=500)
    webhook.fail_next(1, status=DROP)
    msg = inbound_msg()
    queue = namespace.inbound_queue(channel_id)
    await broker.publish(queue, encode_payload(msg))
    async with forwarders(Routes(mo_url=webhook.url())):
        with trio.fail_after(WAIT):
            requests = await webhook.wait_for_requests(1, delivered_only=True)
    assert [r.status for r in webhook.requests] == [500, 500, DROP, 200]
    assert requests[0].json()["message_id"] == msg.message_id
    assert all(r.body == requests[0].body for r in webhook.requests)
    # The forwarder has stopped: anything unacked would be back in the queue.
    assert await broker.queue_length(queue) == 0


@pytest.mark.slow
async def test_forwarder_does_not_ack_before_delivery(
    forwarders: Forwarders,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    queue = namespace.inbound_queue(channel_id)
    msg = inbound_msg()
    await broker.publish(queue, encode_payload(msg))
    webhook.go_down()
    async with forwarders(Routes(mo_url=webhook.url())):
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(3)
    assert await broker.queue_length(queue) == 1
    webhook.come_up()
    async with forwarders(Routes(mo_url=webhook.url())):
        with trio.fail_after(WAIT):
            (delivered,) = await webhook.wait_for_requests(1, delivered_only=True)
    assert delivered.json()["message_id"] == msg.message_id
    assert await broker.queue_length(queue) == 0


@pytest.mark.slow
async def test_forwarder_dead_mo_url_does_not_block_events(
    forwarders: Forwarders,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    mid = uuid.uuid4().hex
    await store.put_outbound(channel_id, mid, {"event_url": webhook.url("/ev")}, 600)
    await broker.publish(namespace.inbound_queue(channel_id), encode_payload(inbound_msg()))
    webhook.fail_path("/mo")
    async with forwarders(Routes(mo_url=webhook.url("/mo"))):
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(2, path="/mo")
        event = VumiEvent(event_type=EventType.ACK, user_message_id=mid)
        await broker.publish(namespace.event_queue(channel_id), encode_payload(event))
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(1, path="/ev", delivered_only=True)
        assert webhook.on_path("/mo") == []


@pytest.mark.slow
async def test_forwarder_gives_up_after_max_age_and_dead_letters(
    forwarders: Forwarders,
    settings: Settings,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    msg = inbound_msg()
    body = encode_payload(msg)
    await broker.publish(namespace.inbound_queue(channel_id), body)
    webhook.go_down(status=500)
    routes = Routes(mo_url=webhook.url())
    async with forwarders(routes, webhook_max_age=0.3):
        (letter,) = await wait_dead_letters(store, channel_id, 1)
        await wait_for_length(broker, namespace.inbound_queue(channel_id), 0)
    assert letter.source is SourceQueue.INBOUND
    assert letter.queue == namespace.inbound_queue(channel_id)
    assert letter.owner_id == channel_id
    assert "mo_url gave up" in letter.reason
    assert letter.body == msg.model_dump(mode="json")
    assert letter.body_bytes() == body
    await assert_queue_copies(settings, broker, namespace, channel_id, [body])


async def test_forwarder_undecodable_inbound_is_dead_lettered(
    forwarders: Forwarders,
    settings: Settings,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    await broker.publish(namespace.inbound_queue(channel_id), b"not json\xff")
    async with forwarders(Routes(mo_url=webhook.url())):
        (letter,) = await wait_dead_letters(store, channel_id, 1)
    assert await broker.queue_length(namespace.inbound_queue(channel_id)) == 0
    assert letter.body is None
    assert letter.body_bytes() == b"not json\xff"
    await assert_queue_copies(settings, broker, namespace, channel_id, [b"not json\xff"])
    assert webhook.requests == []


@pytest.mark.slow
async def test_forwarder_reports_degraded_then_recovered(
    forwarders: Forwarders,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    webhook.fail_next(2, status=502)
    await broker.publish(namespace.inbound_queue(channel_id), encode_payload(inbound_msg()))
    inbox = StatusInbox()
    routes = Routes(mo_url=webhook.url("/mo"))
    async with forwarders(routes, statuses=inbox):
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(1, delivered_only=True)
    reports = [(r.component, r.level, r.type) for r in inbox.reports()]
    assert reports == [
        ("mo_url", StatusLevel.DEGRADED, "delivery_failing"),
        ("mo_url", StatusLevel.OK, "delivery_recovered"),
    ]


async def test_forwarder_amqp_queue_publishes_and_relays(
    redis_settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    channel_id: str,
) -> None:
    if redis_settings.amqp is None:  # pragma: no cover - the fixture always sets it
        pytest.fail("redis_settings has no amqp")
    amqp_queue = f"jbtest-{uuid.uuid4().hex[:12]}"
    queues = [
        amqp_inbound_key(amqp_queue),
        amqp_event_key(amqp_queue),
        amqp_outbound_queue(amqp_queue),
    ]
    for queue in queues:
        await broker.declare_queue(queue)
    try:
        msg = inbound_msg()
        event = VumiEvent(event_type=EventType.ACK, user_message_id="m")
        outbound = VumiMessage(to_addr="x", content="from amqp")
        await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))
        await broker.publish(namespace.event_queue(channel_id), encode_payload(event))
        await broker.publish(amqp_outbound_queue(amqp_queue), encode_payload(outbound))
        async with Forwarders(redis_settings, namespace, store, broker, channel_id)(
            Routes(amqp_queue=amqp_queue)
        ):
            assert await drain_queue(broker, amqp_inbound_key(amqp_queue), 1) == [
                encode_payload(msg)
            ]
            assert await drain_queue(broker, amqp_event_key(amqp_queue), 1) == [
                encode_payload(event)
            ]
            relayed = await drain_queue(broker, namespace.outbound_queue(channel_id), 1)
        assert relayed == [encode_payload(outbound)]
    finally:
        for queue in queues:
            await broker.delete_queue(queue)


async def test_forwarder_ignores_amqp_queue_on_embedded_broker(
    embedded_settings: Settings,
    namespace: Namespace,
    channel_id: str,
) -> None:
    amqp_queue = "jbtest-embedded"
    async with (
        open_state(embedded_settings, namespace) as store,
        open_broker(embedded_settings) as broker,
    ):
        await broker.publish(namespace.inbound_queue(channel_id), encode_payload(inbound_msg()))
        async with Forwarders(embedded_settings, namespace, store, broker, channel_id)(
            Routes(amqp_queue=amqp_queue)
        ):
            await wait_for_length(broker, namespace.inbound_queue(channel_id), 0)
        assert await broker.queue_length(amqp_inbound_key(amqp_queue)) == 0


@pytest.mark.parametrize(
    ("failures", "max_age", "separate_counts"),
    [
        pytest.param(0, 60.0, 0, id="delivered at once: one write"),
        pytest.param(1, 60.0, 0, id="delivered on a retry: one write"),
        pytest.param(-1, 0.3, 2, id="given up: counted on its own"),
    ],
)
async def test_forwarder_counts_a_delivery_with_its_timeline_entry(
    forwarders: Forwarders,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
    monkeypatch: pytest.MonkeyPatch,
    failures: int,
    max_age: float,
    separate_counts: int,
) -> None:
    """A delivered item's rate count is written with its delivered attempt (one store write,
    not two); an item given up on is still counted, by a write of its own. Either way each
    item is counted once."""
    counted_alone: list[str] = []
    incr_rates = store.incr_rates

    async def spy(rates: Sequence[RateCount]) -> None:
        counted_alone.extend(rate.label for rate in rates)
        await incr_rates(rates)

    monkeypatch.setattr(store, "incr_rates", spy)
    if failures < 0:
        webhook.go_down(status=500)
    else:
        webhook.fail_next(failures, status=500)
    mid = uuid.uuid4().hex
    await store.put_outbound(channel_id, mid, {"event_url": webhook.url("/ev")}, 600)
    event = VumiEvent(event_type=EventType.ACK, user_message_id=mid, sent_message_id=mid)
    msg = inbound_msg()
    bucket = int(time.time() / 10.0)
    await broker.publish(namespace.event_queue(channel_id), encode_payload(event))
    await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))

    async def both_counted() -> bool:
        return (
            await rate(store, channel_id, "submitted", bucket) == 1
            and await rate(store, channel_id, "inbound", bucket) == 1
        )

    async with forwarders(Routes(mo_url=webhook.url("/mo")), webhook_max_age=max_age):
        with trio.fail_after(WAIT):
            await wait_for(both_counted)
    # Stopped: a second count would have been written by now.
    assert await both_counted()
    assert len(counted_alone) == separate_counts
    total = 0
    for message_id in (mid, msg.message_id):
        stored = await store.get_outbound(channel_id, message_id, 600)
        assert stored is not None
        attempts = [e["details"] for e in stored.events if e.get("stage") == "webhook_attempt"]
        assert attempts
        assert attempts[-1]["delivered"] is (failures >= 0)
        total += len(attempts)
    if failures >= 0:
        assert total == failures + 2
