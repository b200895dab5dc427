"""Concurrent webhook delivery on both backends: up to webhook_concurrency POSTs in flight per
queue, started in queue order; a failing delivery holds the later ones back and alone probes
the receiver; graceful stop drains what is in flight; answers are read up to a size limit."""

from __future__ import annotations

import logging
import tracemalloc
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from channel_proc.forwarder import Forwarder, Routes
from channel_proc.logs import current_message_id
from channel_proc.transports.base import StatusLevel
from channel_proc.webhook import WebhookClient, WebhookError, WebhookTarget, post_json
from ipc.codec import encode_payload
from ipc.payloads import VumiMessage
from tests.channel_proc.support import WAIT, StatusInbox, wait_for_length
from tests.channel_proc.webhook_support import Forwarders

if TYPE_CHECKING:
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.settings import Settings
    from ipc.state import StateStore
    from tests.fakes.webhook import FakeWebhook, RecordedRequest

BIG = 10 * 1024 * 1024


@pytest.fixture
def forwarding(
    settings: Settings, namespace: Namespace, store: StateStore, broker: Broker, channel_id: str
) -> Forwarders:
    return Forwarders(settings, namespace, store, broker, channel_id)


async def queue_messages(
    broker: Broker, namespace: Namespace, channel_id: str, n: int
) -> list[str]:
    """Publish `n` inbound messages; their contents, in queue order."""
    contents = [f"m{i}" for i in range(n)]
    for content in contents:
        msg = VumiMessage(from_addr="+1", to_addr="2", content=content)
        await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))
    return contents


def contents(requests: list[RecordedRequest]) -> list[str]:
    return [r.json()["content"] for r in requests]


async def test_forwarder_keeps_up_to_concurrency_posts_in_flight_in_queue_order(
    forwarding: Forwarders,
    channel_id: str,
    broker: Broker,
    namespace: Namespace,
    webhook: FakeWebhook,
) -> None:
    sent = await queue_messages(broker, namespace, channel_id, 10)
    webhook.hold()
    routes = Routes(mo_url=webhook.url("/mo"))
    async with forwarding(routes=routes, webhook_concurrency=4):
        with trio.fail_after(WAIT):
            first = await webhook.wait_for_requests(4)
        # The first four began in queue order (the network may swap their arrival).
        assert sorted(contents(first)) == sent[:4]
        webhook.release()
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(10, delivered_only=True)
        await wait_for_length(broker, namespace.inbound_queue(channel_id), 0)
    assert sorted(contents(webhook.requests)) == sorted(sent)
    assert webhook.max_in_flight == 4


@pytest.mark.slow
async def test_forwarder_outage_probes_with_one_delivery_and_keeps_the_order(
    forwarding: Forwarders,
    channel_id: str,
    broker: Broker,
    namespace: Namespace,
    webhook: FakeWebhook,
) -> None:
    sent = await queue_messages(broker, namespace, channel_id, 8)
    webhook.go_down(status=503)
    inbox = StatusInbox()
    routes = Routes(mo_url=webhook.url("/mo"))
    async with forwarding(routes=routes, statuses=inbox, webhook_concurrency=4):
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(16)
        # None began after the first failure, and only the first one keeps retrying. (One
        # whose failure came back before the first one's may have retried once meanwhile.)
        down = contents(webhook.requests)
        assert set(down) <= set(sent[:4])
        assert all(down.count(c) <= 2 for c in sent[1:4])
        assert down.count(sent[0]) >= 16 - 6
        webhook.come_up()
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(8, delivered_only=True)
        await wait_for_length(broker, namespace.inbound_queue(channel_id), 0)
    delivered = contents(webhook.delivered)
    # The held-back ones were retried one after the other, in queue order.
    assert delivered[:4] == sent[:4]
    assert sorted(delivered) == sorted(sent)
    reports = [(r.component, r.level, r.type) for r in inbox.reports()]
    assert reports[0] == ("mo_url", StatusLevel.DEGRADED, "delivery_failing")
    assert reports[-1] == ("mo_url", StatusLevel.OK, "delivery_recovered")


async def test_a_failure_not_yet_known_is_not_overtaken(
    forwarding: Forwarders,
    channel_id: str,
    broker: Broker,
    namespace: Namespace,
    webhook: FakeWebhook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The third first-attempt failure takes a second to be recorded (a slow store); the
    # receiver comes back meanwhile. Neither the failed deliveries after it nor new ones
    # may be delivered before its retry.
    sent = await queue_messages(broker, namespace, channel_id, 6)
    real_record = Forwarder._record_attempt
    first_failures = 0

    async def slow_record(self: Forwarder, *args: Any, **kwargs: Any) -> None:
        nonlocal first_failures
        attempt = args[1]
        if attempt == 1 and not kwargs.get("delivered"):
            first_failures += 1
            if first_failures == 3:
                await trio.sleep(1.0)
        await real_record(self, *args, **kwargs)

    monkeypatch.setattr(Forwarder, "_record_attempt", slow_record)
    webhook.go_down(status=503)
    routes = Routes(mo_url=webhook.url("/mo"))
    async with forwarding(routes=routes, webhook_concurrency=4):
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(6)
        webhook.come_up()
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(6, delivered_only=True)
        await wait_for_length(broker, namespace.inbound_queue(channel_id), 0)
    delivered = contents(webhook.delivered)
    # The four that failed in the outage, in queue order; the last two, begun together
    # afterwards, may finish in either order.
    assert delivered[:4] == sent[:4]
    assert sorted(delivered) == sorted(sent)


@pytest.mark.slow
async def test_forwarder_with_concurrency_one_delivers_strictly_in_order(
    forwarding: Forwarders,
    channel_id: str,
    broker: Broker,
    namespace: Namespace,
    webhook: FakeWebhook,
) -> None:
    sent = await queue_messages(broker, namespace, channel_id, 6)
    webhook.fail_next(3, status=500)
    routes = Routes(mo_url=webhook.url("/mo"))
    async with forwarding(routes=routes, webhook_concurrency=1):
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(6, delivered_only=True)
    assert contents(webhook.requests) == [sent[0]] * 4 + sent[1:]
    assert webhook.max_in_flight == 1


async def test_forwarder_stop_drains_the_deliveries_in_flight(
    forwarding: Forwarders,
    channel_id: str,
    broker: Broker,
    namespace: Namespace,
    webhook: FakeWebhook,
) -> None:
    sent = await queue_messages(broker, namespace, channel_id, 3)
    webhook.hold()
    routes = Routes(mo_url=webhook.url("/mo"))
    async with forwarding(routes=routes, webhook_concurrency=4) as shutdown:
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(3)
        shutdown.request("test stop")
        webhook.release()
    # Every POST in flight at the stop was answered and its message acked (an unacked one
    # would be back on the queue now that the consumer is closed).
    assert sorted(contents(webhook.delivered)) == sent
    assert await broker.queue_length(namespace.inbound_queue(channel_id)) == 0


@pytest.mark.slow
async def test_forwarder_oversized_2xx_answers_count_as_delivered(
    forwarding: Forwarders,
    channel_id: str,
    store: StateStore,
    broker: Broker,
    namespace: Namespace,
    webhook: FakeWebhook,
) -> None:
    cid = channel_id
    sent = await queue_messages(broker, namespace, cid, 3)
    webhook.answer_size = BIG
    routes = Routes(mo_url=webhook.url("/mo"))
    async with forwarding(routes=routes, webhook_max_response_bytes=1000):
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(3)
        await wait_for_length(broker, namespace.inbound_queue(cid), 0)
    # Once each: the receiver accepted them, its long answer is not a reason to resend.
    assert sorted(contents(webhook.requests)) == sent
    mid = webhook.requests[0].json()["message_id"]
    record = await store.get_outbound(cid, mid, 600)
    assert record is not None
    (attempt,) = [e["details"] for e in record.events if e.get("message_type") == "timeline"]
    assert attempt["delivered"] is True
    assert attempt["status"] == 200
    assert "over 1000 bytes" in attempt["error"]


@pytest.mark.parametrize("client", ["webhook-client", "httpx-client"])
async def test_post_json_reads_at_most_the_limit_of_a_large_answer(
    webhook: FakeWebhook, client: str
) -> None:
    webhook.answer_size = BIG
    target = WebhookTarget.parse(webhook.url())
    http: httpx.AsyncClient
    if client == "webhook-client":
        http = WebhookClient(timeout=5.0, concurrency=1)
    else:
        http = httpx.AsyncClient()
    tracemalloc.start()
    try:
        async with http:
            small = await post_json(http, target, {}, max_response_bytes=BIG + 1)
            tracemalloc.reset_peak()
            cut = await post_json(http, target, {}, max_response_bytes=65536)
            _, peak = tracemalloc.get_traced_memory()
            webhook.go_down(status=500)
            with pytest.raises(WebhookError, match="HTTP 500") as failed:
                await post_json(http, target, {}, max_response_bytes=65536)
    finally:
        tracemalloc.stop()
    assert (small.status, small.oversized) == (200, False)
    assert (cut.status, cut.oversized) == (200, True)
    assert failed.value.status == 500
    assert len(failed.value.reason) < 400
    # Streamed and cut off: nowhere near the 10 MB the receiver sent.
    assert peak < 2 * 1024 * 1024


class _MessageIds(logging.Handler):
    """Each record's text with the message id its task was handling when it was logged."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), current_message_id()))


async def test_forwarder_log_lines_name_the_message_being_handled(
    forwarding: Forwarders,
    broker: Broker,
    namespace: Namespace,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    await queue_messages(broker, namespace, channel_id, 6)
    capture = _MessageIds()
    logger = logging.getLogger("channel_proc.forwarder")
    logger.addHandler(capture)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        async with forwarding(routes=Routes(mo_url=webhook.url("/mo")), webhook_concurrency=4):
            with trio.fail_after(WAIT):
                await webhook.wait_for_requests(6)
            await wait_for_length(broker, namespace.inbound_queue(channel_id), 0)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
    delivered = [(text, mid) for text, mid in capture.seen if "delivered to" in text]
    assert len(delivered) == 6
    assert all(mid is not None and mid in text for text, mid in delivered)
