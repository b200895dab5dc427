"""Callbacks on both backends against a fake receiver: URL templates, X-Junebug-Delivery,
X-Junebug-Signature, per-attempt timeline entries, metrics counters, bad templates
dead-lettered (forwarder, status actor, and the channel process wiring them).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from channel_proc.counters import Counters
from channel_proc.forwarder import Routes
from channel_proc.lifecycle import Shutdown
from channel_proc.process import load_channel, run_channel_process
from channel_proc.status import run_status_actor
from channel_proc.transports.base import StatusLevel
from channel_proc.transports.errors import ConfigError
from channel_proc.webhook import delivery_id
from ipc.codec import encode_payload
from ipc.payloads import EventType, SessionEvent, VumiEvent, VumiMessage, api_event
from tests.channel_proc.support import WAIT, StatusInbox, wait_for, wait_for_length
from tests.channel_proc.webhook_support import Forwarders, assert_queue_copies, wait_dead_letters
from tests.fakes.webhook import DROP

if TYPE_CHECKING:
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.settings import Settings
    from ipc.state import StateStore
    from tests.fakes.webhook import FakeWebhook, RecordedRequest

SECRET = "sign-me-Qx81"
DELIVERY = "x-junebug-delivery"
SIGNATURE = "x-junebug-signature"


def signed_with(request: RecordedRequest, secret: str) -> bool:
    """A receiver's check: HMAC-SHA256 of the raw body bytes, compared in constant time."""
    digest = hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(request.headers.get(SIGNATURE, ""), f"sha256={digest}")


def timeline(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("message_type") == "timeline"]


@pytest.fixture
def forwarders(
    settings: Settings, namespace: Namespace, store: StateStore, broker: Broker, channel_id: str
) -> Forwarders:
    return Forwarders(settings, namespace, store, broker, channel_id)


@pytest.mark.slow
async def test_mo_url_template_signature_delivery_id_and_timeline_per_attempt(
    forwarders: Forwarders,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    webhook.fail_next(2, status=500)
    msg = VumiMessage(
        from_addr="+27 82 555/1", to_addr="*120*8#", content="hi", session_event=SessionEvent.NEW
    )
    await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))
    template = "/mo/{channel_id}/{message_id}?from={from}&to={to}&s={session_event}&e={event_type}"
    counters = Counters()
    routes = Routes(mo_url=webhook.url(template), signing_secret=SECRET)
    async with forwarders(routes, counters=counters):
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(1, delivered_only=True)
        await wait_for_length(broker, namespace.inbound_queue(channel_id), 0)
    expected_path = (
        f"/mo/{channel_id}/{msg.message_id}?from=%2B27%2082%20555%2F1&to=%2A120%2A8%23&s=new&e="
    )
    assert [r.status for r in webhook.requests] == [500, 500, 200]
    for request in webhook.requests:
        assert request.path == expected_path
        assert request.body == webhook.requests[0].body
        assert request.headers[DELIVERY] == delivery_id("mo_url", msg.message_id)
        contract = uuid.uuid5(uuid.NAMESPACE_URL, f"mo_url:{msg.message_id}").hex
        assert request.headers[DELIVERY] == contract
        assert signed_with(request, SECRET)
    assert not signed_with(webhook.requests[0], "another secret")
    record = await store.get_outbound(channel_id, msg.message_id, 600)
    assert record is not None
    assert record.message is None
    entries = timeline(record.events)
    assert len(entries) == len(record.events) == 3
    assert [e["stage"] for e in entries] == ["webhook_attempt"] * 3
    assert all(isinstance(e["timestamp"], str) for e in entries)
    details = [e["details"] for e in entries]
    assert [(d["target"], d["attempt"], d["status"], d["delivered"]) for d in details] == [
        ("mo_url", 1, 500, False),
        ("mo_url", 2, 500, False),
        ("mo_url", 3, 200, True),
    ]
    assert "HTTP 500" in details[0]["error"]
    assert details[2]["error"] is None
    assert counters.value("messages_in_total") == 1
    assert counters.value("webhook_failures_total", "mo_url") == 2
    assert counters.value("webhook_failures_total", "event_url") == 0


async def test_event_url_template_signature_delivery_id_and_timeline_per_attempt(
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
        "to": "+1 555",
        "from": "12345",
        "channel_data": {"session_event": "close"},
        "event_url": webhook.url(
            "/ev/{message_id}/{event_type}?to={to}&f={from}&s={session_event}"
        ),
    }
    await store.put_outbound(channel_id, mid, record, 600)
    ack = VumiEvent(event_type=EventType.ACK, user_message_id=mid, sent_message_id="p1")
    dr = VumiEvent(
        event_type=EventType.DELIVERY_REPORT, user_message_id=mid, delivery_status="delivered"
    )
    webhook.fail_next(1, status=DROP)
    for event in (ack, dr):
        await broker.publish(namespace.event_queue(channel_id), encode_payload(event))
    counters = Counters()
    # One at a time: the events and attempts are then stored strictly in queue order.
    async with forwarders(Routes(signing_secret=SECRET), counters=counters, webhook_concurrency=1):
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(2, delivered_only=True)
    first, retried, second = webhook.requests
    assert (first.status, retried.status, second.status) == (DROP, 200, 200)
    assert first.path == f"/ev/{mid}/submitted?to=%2B1%20555&f=12345&s=close"
    assert second.path == f"/ev/{mid}/delivery_succeeded?to=%2B1%20555&f=12345&s=close"
    ack_delivery = delivery_id("event_url", ack.event_id)
    assert first.headers[DELIVERY] == retried.headers[DELIVERY] == ack_delivery
    assert second.headers[DELIVERY] == delivery_id("event_url", dr.event_id)
    assert second.headers[DELIVERY] != first.headers[DELIVERY]
    assert delivery_id("mo_url", mid) not in {r.headers[DELIVERY] for r in webhook.requests}
    assert all(signed_with(r, SECRET) for r in webhook.requests)
    assert retried.json() == api_event(ack, channel_id)
    stored = await store.get_outbound(channel_id, mid, 600)
    assert stored is not None
    assert stored.message == record
    kinds = [
        (e["message_type"], e.get("event_id"), e.get("details", {}).get("attempt"))
        for e in stored.events
    ]
    assert kinds == [
        ("event", ack.event_id, None),
        ("timeline", None, 1),
        ("timeline", None, 2),
        ("event", dr.event_id, None),
        ("timeline", None, 1),
    ]
    attempts = [e["details"] for e in timeline(stored.events)]
    assert [(d["target"], d["status"], d["delivered"]) for d in attempts] == [
        ("event_url", None, False),
        ("event_url", 200, True),
        ("event_url", 200, True),
    ]
    assert attempts[0]["error"]
    assert counters.value("events_total", "submitted") == 1
    assert counters.value("events_total", "delivery_succeeded") == 1
    assert counters.value("webhook_failures_total", "event_url") == 1
    assert counters.value("messages_in_total") == 0


async def test_invalid_mo_url_template_dead_letters_and_keeps_running(
    forwarders: Forwarders,
    settings: Settings,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    messages = [VumiMessage(from_addr="+1", to_addr="2", content=str(n)) for n in range(2)]
    for msg in messages:
        await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))
    caplog.set_level(logging.INFO)
    counters = Counters()
    async with forwarders(Routes(mo_url=webhook.url("/mo/{msisdn}")), counters=counters):
        letters = await wait_dead_letters(store, channel_id, 2)
        await wait_for_length(broker, namespace.inbound_queue(channel_id), 0)
    bodies = [encode_payload(m) for m in messages]
    assert sorted(letter.body_bytes() for letter in letters) == sorted(bodies)
    await assert_queue_copies(settings, broker, namespace, channel_id, bodies)
    assert webhook.requests == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("unknown placeholder {msisdn}" in e and "dead-lettered" in e for e in errors)
    assert any(messages[0].message_id in e and "unusable" in e for e in errors)
    # Still stored for replies, and counted as received.
    assert await store.get_inbound(channel_id, messages[0].message_id, 600) is not None
    assert counters.value("messages_in_total") == 2


async def test_invalid_event_url_template_dead_letters_only_that_event(
    forwarders: Forwarders,
    settings: Settings,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    urls = {
        "bad-name": webhook.url("/ev/{nope}"),
        "bad-syntax": webhook.url("/ev/{message_id"),
        "bad-render": "http://127.0.0.1:{to}/ev",
        "good": webhook.url("/ok/{message_id}"),
    }
    events = {}
    for name, url in urls.items():
        mid = f"{name}-{uuid.uuid4().hex[:8]}"
        await store.put_outbound(channel_id, mid, {"to": "abc", "event_url": url}, 600)
        events[name] = VumiEvent(event_type=EventType.ACK, user_message_id=mid)
        await broker.publish(namespace.event_queue(channel_id), encode_payload(events[name]))
    async with forwarders(Routes()):
        with trio.fail_after(WAIT):
            (delivered,) = await webhook.wait_for_requests(1)
        letters = await wait_dead_letters(store, channel_id, 3)
    assert delivered.path == f"/ok/{events['good'].user_message_id}"
    assert SIGNATURE not in delivered.headers
    assert delivered.headers[DELIVERY] == delivery_id("event_url", events["good"].event_id)
    bad = [encode_payload(events[name]) for name in ("bad-name", "bad-syntax", "bad-render")]
    assert sorted(letter.body_bytes() for letter in letters) == sorted(bad)
    await assert_queue_copies(settings, broker, namespace, channel_id, bad)
    errors = " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "unknown placeholder {nope}" in errors
    assert "bad template syntax" in errors
    assert "Invalid port" in errors


@pytest.mark.slow
async def test_status_url_template_signed_with_stable_delivery_id(
    store: StateStore, channel_id: str, webhook: FakeWebhook
) -> None:
    webhook.fail_next(1, status=503)
    counters = Counters()
    inbox = StatusInbox()
    async with httpx.AsyncClient(timeout=2.0) as http, trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                run_status_actor,
                inbox.recv,
                channel_id=channel_id,
                store=store,
                http=http,
                status_url=webhook.url("/st/{channel_id}/{component}?s={status}&m={message_id}"),
                signing_secret=SECRET,
                counters=counters,
            )
        )
        inbox.reporter.report("telnet", StatusLevel.DOWN, "bind_failed", "Cannot listen")
        inbox.reporter.report("telnet", StatusLevel.OK, "listening", "Listening")
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(2, delivered_only=True)
        nursery.cancel_scope.cancel()
    failed, retried, second = webhook.requests
    assert [r.status for r in webhook.requests] == [503, 200, 200]
    assert failed.path == retried.path == f"/st/{channel_id}/telnet?s=down&m="
    assert second.path == f"/st/{channel_id}/telnet?s=ok&m="
    assert failed.headers[DELIVERY] == retried.headers[DELIVERY]
    assert second.headers[DELIVERY] != failed.headers[DELIVERY]
    assert len(second.headers[DELIVERY]) == 32
    assert all(signed_with(r, SECRET) for r in webhook.requests)
    assert counters.value("webhook_failures_total", "status_url") == 1


async def test_invalid_status_url_template_is_logged_and_statuses_still_stored(
    store: StateStore, channel_id: str, webhook: FakeWebhook, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = StatusInbox()
    async with httpx.AsyncClient(timeout=2.0) as http, trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                run_status_actor,
                inbox.recv,
                channel_id=channel_id,
                store=store,
                http=http,
                status_url=webhook.url("/st/{nope}"),
            )
        )
        inbox.reporter.report("telnet", StatusLevel.OK, "listening", "Listening")

        async def stored() -> bool:
            return "telnet" in await store.get_statuses(channel_id)

        with trio.fail_after(WAIT):
            await wait_for(stored)
        nursery.cancel_scope.cancel()
    assert webhook.requests == []
    assert any("unknown placeholder {nope}" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
async def test_channel_process_passes_signing_secret_and_templates(
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    """The wiring: stored channel properties -> forwarder and status actor (in-process)."""
    await store.save_channel(
        channel_id,
        {
            "type": "telnet",
            "config": {"twisted_endpoint": "tcp:port=0:interface=127.0.0.1"},
            "mo_url": webhook.url("/mo/{message_id}"),
            "status_url": webhook.url("/status/{component}/{status}"),
            "signing_secret": SECRET,
        },
    )
    msg = VumiMessage(from_addr="+1", to_addr="2", content="hello")
    await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))
    spec = await load_channel(store, settings, channel_id)
    shutdown = Shutdown(grace=2.0)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(
                partial(
                    run_channel_process,
                    spec,
                    settings=settings,
                    namespace=namespace,
                    store=store,
                    broker=broker,
                    shutdown=shutdown,
                    watch_process=False,
                )
            )
            (mo,) = await webhook.wait_for_requests(1, path=f"/mo/{msg.message_id}")
            (status,) = await webhook.wait_for_requests(1, path="/status/telnet/ok")
        shutdown.request("test done")
    assert signed_with(mo, SECRET)
    assert mo.headers[DELIVERY] == delivery_id("mo_url", msg.message_id)
    assert signed_with(status, SECRET)
    assert status.json()["type"] == "listening"


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
async def test_load_channel_leaves_templates_to_the_forwarder(
    settings: Settings, store: StateStore, channel_id: str
) -> None:
    telnet = {"type": "telnet", "config": {"twisted_endpoint": "tcp:port=0"}}
    # httpx cannot parse this template as a URL; a template is only checked when rendered.
    await store.save_channel(channel_id, {**telnet, "mo_url": "http://h:{to}/{nope}"})
    spec = await load_channel(store, settings, channel_id)
    assert spec.properties.mo_url == "http://h:{to}/{nope}"
    await store.save_channel(channel_id, {**telnet, "mo_url": "http://h:port/"})
    with pytest.raises(ConfigError, match="mo_url"):
        await load_channel(store, settings, channel_id)
