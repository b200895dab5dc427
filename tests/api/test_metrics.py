"""GET /metrics (issue 7): the channels' runtime snapshots as Prometheus text, read back with
prometheus_client's own parser; on both backends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from api.metrics import cumulative_buckets
from api.queue_control import METRICS_KEY, QUEUES_KEY
from ipc.names import runtime_scope
from ipc.payloads import vumi_timestamp

if TYPE_CHECKING:
    from tests.api.harness import Api

JsonObject = dict[str, Any]
#: (sample name, sorted label items) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(api: Api) -> Samples:
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = await response.get_data(as_text=True)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def of(channel_id: str, **labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"channel_id": channel_id, **labels}.items()))


METRICS: JsonObject = {
    "counters": {
        "messages_out_total": 7,
        "messages_in_total": 3,
        "parts_out_total": 9,
        "events_total": {"submitted": 6, "rejected": 1, "made_up_type": 4},
        "webhook_failures_total": {"event_url": 2, "elsewhere": 5},
    },
    "histograms": {
        "send_latency_seconds": {
            "buckets": {"0.005": 1, "0.1": 4, "1.0": 6, "+Inf": 7},
            "sum": 2.5,
            "count": 7,
        },
    },
    "link_up": 1,
    "updated": "2024-01-01 00:00:00.000000",
}


async def test_no_channels(api: Api) -> None:
    samples = await scrape(api)
    assert samples[("junebug_channels", ())] == 0


async def test_channel_snapshots_become_metrics(api: Api) -> None:
    cid = await api.create_channel(mo_url="http://example.com/mo")
    await api.store.kv_put(runtime_scope(cid), METRICS_KEY, METRICS)
    queues = {
        "outbound": 12,
        "inbound": 1,
        "events": 0,
        "oldest_outbound_age": 3.5,
        "send_rate": 4.0,
        "drain_seconds": None,
        "paused": True,
        "updated": vumi_timestamp(),
    }
    await api.store.kv_put(runtime_scope(cid), QUEUES_KEY, queues)
    process = {
        "component": "process",
        "channel_id": cid,
        "status": "ok",
        "type": "running",
        "message": "running",
        "details": {"restarts": 2},
    }
    await api.store.set_status(cid, "process", process)

    samples = await scrape(api)
    assert samples[("junebug_channels", ())] == 1
    expected = {
        ("junebug_messages_out_total", of(cid)): 7,
        ("junebug_messages_in_total", of(cid)): 3,
        ("junebug_parts_out_total", of(cid)): 9,
        ("junebug_events_total", of(cid, event_type="submitted")): 6,
        ("junebug_events_total", of(cid, event_type="rejected")): 1,
        ("junebug_events_total", of(cid, event_type="delivery_failed")): 0,
        ("junebug_webhook_failures_total", of(cid, target="event_url")): 2,
        ("junebug_webhook_failures_total", of(cid, target="mo_url")): 0,
        ("junebug_send_latency_seconds_bucket", of(cid, le="0.005")): 1,
        ("junebug_send_latency_seconds_bucket", of(cid, le="1.0")): 6,
        ("junebug_send_latency_seconds_bucket", of(cid, le="+Inf")): 7,
        ("junebug_send_latency_seconds_count", of(cid)): 7,
        ("junebug_send_latency_seconds_sum", of(cid)): 2.5,
        ("junebug_link_up", of(cid)): 1,
        ("junebug_queue_messages", of(cid, queue="outbound")): 12,
        ("junebug_queue_messages", of(cid, queue="inbound")): 1,
        ("junebug_queue_messages", of(cid, queue="event")): 0,
        ("junebug_queue_oldest_outbound_age_seconds", of(cid)): 3.5,
        ("junebug_send_rate", of(cid)): 4.0,
        ("junebug_channel_paused", of(cid)): 1,
        ("junebug_channel_restarts_total", of(cid)): 2,
    }
    assert {key: samples.get(key) for key in expected} == expected
    # Bounded labels: nothing outside the fixed sets; nulls are left out.
    labels = {label for _, items in samples for label in items}
    assert {value for name, value in labels if name == "event_type"} == {
        "submitted",
        "rejected",
        "delivery_succeeded",
        "delivery_failed",
        "delivery_pending",
    }
    assert {value for name, value in labels if name == "target"} == {
        "mo_url",
        "event_url",
        "status_url",
    }
    assert not any(name == "junebug_queue_drain_seconds" for name, _ in samples)
    assert not any(name.startswith("junebug_delivery_report_latency") for name, _ in samples)


async def test_without_snapshots_the_queues_come_from_the_broker(api: Api) -> None:
    cid = await api.create_channel(mo_url="http://example.com/mo")
    for _ in range(2):
        response = await api.client.post(
            f"/channels/{cid}/messages/", json={"to": "+1", "content": "x"}
        )
        assert response.status_code == 201
    samples = await scrape(api)
    assert samples[("junebug_queue_messages", of(cid, queue="outbound"))] == 2
    assert samples[("junebug_channel_paused", of(cid))] == 0
    assert samples[("junebug_channel_restarts_total", of(cid))] == 0
    assert not any(name == "junebug_messages_out_total" for name, _ in samples)


def test_histogram_buckets_are_made_cumulative() -> None:
    per_bucket = {"buckets": {"0.1": 2, "0.5": 0, "1": 3, "+Inf": 1}, "sum": 4.0, "count": 6}
    assert cumulative_buckets(per_bucket) == [("0.1", 2), ("0.5", 2), ("1", 5), ("+Inf", 6)]
    cumulative = {"buckets": {"1": 5, "0.1": 2, "+Inf": 6}, "count": 6}
    assert cumulative_buckets(cumulative) == [("0.1", 2), ("1", 5), ("+Inf", 6)]
    without_inf = {"buckets": {"0.1": 2, "1": 5}, "count": 6}
    assert cumulative_buckets(without_inf) == [("0.1", 2), ("1", 5), ("+Inf", 6)]
    assert cumulative_buckets({"buckets": {"x": 1}}) is None
    assert cumulative_buckets({}) is None
