"""GET /metrics content: every channel's runtime snapshots rendered as Prometheus metrics.

The channel processes count (kv "{cid}:runtime" key "metrics", cumulative across restarts)
and snapshot their queues (key "queues"); the supervisor counts restarts (the "process"
status's details.restarts). This module only reads them: any API worker answers the same.
Label values come from fixed sets (event types, webhook targets, queues) and channel ids,
so the number of series grows with channels only.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from api.queue_control import METRICS_KEY, queue_snapshot
from ipc.names import runtime_scope

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from prometheus_client.metrics_core import Metric

    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.state import StateStore

JsonObject = dict[str, Any]

PREFIX = "junebug"
INF = float("inf")
EVENT_TYPES = (
    "submitted",
    "rejected",
    "delivery_succeeded",
    "delivery_failed",
    "delivery_pending",
)
WEBHOOK_TARGETS = ("mo_url", "event_url", "status_url")
#: Snapshot field -> `queue` label of junebug_queue_messages.
QUEUES = (("outbound", "outbound"), ("inbound", "inbound"), ("events", "event"))
#: (snapshot counter, metric name, help).
COUNTERS = (
    ("messages_out_total", "messages_out", "Outbound messages taken off the queue and sent"),
    ("messages_in_total", "messages_in", "Inbound messages received from the provider"),
    ("parts_out_total", "parts_out", "Provider parts (segments) sent"),
)
#: (snapshot histogram, metric name, help).
HISTOGRAMS = (
    (
        "send_latency_seconds",
        "send_latency_seconds",
        "Seconds from the send request to the provider's acceptance",
    ),
    (
        "delivery_report_latency_seconds",
        "delivery_report_latency_seconds",
        "Seconds from the provider's acceptance to the delivery report",
    ),
)
#: (snapshot field, metric name, help) of the queue gauges besides the depths.
QUEUE_GAUGES = (
    (
        "oldest_outbound_age",
        "queue_oldest_outbound_age_seconds",
        "Age of the oldest queued outbound message",
    ),
    ("drain_seconds", "queue_drain_seconds", "Estimated seconds to send the outbound queue"),
    ("send_rate", "send_rate", "Messages sent per second over the last 10 s"),
)


@dataclass(slots=True)
class ChannelSample:
    """What is known about one channel at collection time."""

    channel_id: str
    queues: JsonObject
    metrics: JsonObject = field(default_factory=dict)
    restarts: float = 0


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _mapping(value: object) -> JsonObject:
    return value if isinstance(value, dict) else {}


def cumulative_buckets(histogram: JsonObject) -> list[tuple[str, float]] | None:
    """Prometheus buckets (sorted by bound, cumulative, ending in +Inf) from a snapshot
    histogram {"buckets": {le: n}, "sum", "count"}; None when it has none.

    Bucket counts are taken as cumulative when they can be (they never decrease and end at
    `count`, or below it when there is no +Inf bucket); otherwise as per-bucket counts,
    summed here.
    """
    parsed: list[tuple[float, str, float]] = []
    for le, count in _mapping(histogram.get("buckets")).items():
        bound = INF if le in ("+Inf", "inf", "Inf") else _safe_float(le)
        value = _number(count)
        if bound is None or value is None:
            continue
        parsed.append((bound, "+Inf" if bound == INF else str(le), value))
    if not parsed:
        return None
    parsed.sort()
    values = [value for _, _, value in parsed]
    total = _number(histogram.get("count"))
    has_inf = parsed[-1][0] == INF
    ordered = all(a <= b for a, b in itertools.pairwise(values))
    fits = total is None or (values[-1] == total if has_inf else values[-1] <= total)
    if not (ordered and fits):
        values = list(itertools.accumulate(values))
    buckets = [(le, value) for (_, le, _), value in zip(parsed, values, strict=True)]
    if not has_inf:
        buckets.append(("+Inf", values[-1] if total is None else max(total, values[-1])))
    return buckets


def _safe_float(text: object) -> float | None:
    try:
        value = float(str(text))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class SnapshotCollector:
    """A prometheus_client collector over samples read beforehand (collect() does no I/O)."""

    def __init__(self, samples: list[ChannelSample]) -> None:
        self._samples = samples

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{PREFIX}_channels", "Channels configured", value=len(self._samples)
        )
        yield from self._counters()
        yield from self._histograms()
        yield from self._gauges()

    def _counters(self) -> Iterable[Metric]:
        for key, name, help_text in COUNTERS:
            family = CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=["channel_id"])
            for sample in self._samples:
                value = _number(_mapping(sample.metrics.get("counters")).get(key))
                if value is not None:
                    family.add_metric([sample.channel_id], value)
            yield family
        events = CounterMetricFamily(
            f"{PREFIX}_events", "Events by Junebug event type", labels=["channel_id", "event_type"]
        )
        failures = CounterMetricFamily(
            f"{PREFIX}_webhook_failures",
            "Webhook POSTs that failed (each attempt), by target",
            labels=["channel_id", "target"],
        )
        restarts = CounterMetricFamily(
            f"{PREFIX}_channel_restarts",
            "Times the supervisor restarted the channel's process",
            labels=["channel_id"],
        )
        for sample in self._samples:
            counters = _mapping(sample.metrics.get("counters"))
            if sample.metrics:
                by_type = _mapping(counters.get("events_total"))
                for event_type in EVENT_TYPES:
                    value = _number(by_type.get(event_type)) or 0.0
                    events.add_metric([sample.channel_id, event_type], value)
                by_target = _mapping(counters.get("webhook_failures_total"))
                for target in WEBHOOK_TARGETS:
                    value = _number(by_target.get(target)) or 0.0
                    failures.add_metric([sample.channel_id, target], value)
            restarts.add_metric([sample.channel_id], sample.restarts)
        yield from (events, failures, restarts)

    def _histograms(self) -> Iterable[Metric]:
        for key, name, help_text in HISTOGRAMS:
            family = HistogramMetricFamily(f"{PREFIX}_{name}", help_text, labels=["channel_id"])
            for sample in self._samples:
                histogram = _mapping(_mapping(sample.metrics.get("histograms")).get(key))
                buckets = cumulative_buckets(histogram)
                if buckets is not None:
                    total = _number(histogram.get("sum")) or 0.0
                    family.add_metric([sample.channel_id], buckets, total)
            yield family

    def _gauges(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_messages",
            "Messages waiting in a queue",
            labels=["channel_id", "queue"],
        )
        for sample in self._samples:
            for key, queue in QUEUES:
                value = _number(sample.queues.get(key))
                if value is not None:
                    depth.add_metric([sample.channel_id, queue], value)
        yield depth
        for key, name, help_text in QUEUE_GAUGES:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=["channel_id"])
            for sample in self._samples:
                value = _number(sample.queues.get(key))
                if value is not None:
                    family.add_metric([sample.channel_id], value)
            yield family
        paused = GaugeMetricFamily(
            f"{PREFIX}_channel_paused",
            "1 while the channel's sending is paused",
            labels=["channel_id"],
        )
        link = GaugeMetricFamily(
            f"{PREFIX}_link_up", "1 while the channel's provider link is up", labels=["channel_id"]
        )
        for sample in self._samples:
            if isinstance(sample.queues.get("paused"), bool):
                paused.add_metric([sample.channel_id], float(sample.queues["paused"]))
            value = _number(sample.metrics.get("link_up"))
            if value is not None:
                link.add_metric([sample.channel_id], value)
        yield from (paused, link)


def _restarts(statuses: dict[str, JsonObject]) -> float:
    details = _mapping(_mapping(statuses.get("process")).get("details"))
    return _number(details.get("restarts")) or 0.0


async def collect_samples(
    store: StateStore, broker: Broker, namespace: Namespace
) -> list[ChannelSample]:
    samples = []
    for channel_id in await store.list_channels():
        metrics = await store.kv_get(runtime_scope(channel_id), METRICS_KEY)
        samples.append(
            ChannelSample(
                channel_id=channel_id,
                queues=await queue_snapshot(store, broker, namespace, channel_id),
                metrics=metrics or {},
                restarts=_restarts(await store.get_statuses(channel_id)),
            )
        )
    return samples


def render(samples: list[ChannelSample]) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of `samples`."""
    return generate_latest(SnapshotCollector(samples))
