"""The in-process metrics registry: counting, histograms, the snapshot shape, restoring."""

from __future__ import annotations

import json
import math

import pytest

from channel_proc.counters import (
    COUNTERS,
    EVENT_TYPES,
    HISTOGRAMS,
    LATENCY_BUCKETS,
    WEBHOOK_TARGETS,
    Counters,
    bucket_key,
)


def test_fresh_snapshot_has_every_declared_name_at_zero() -> None:
    snapshot = Counters().snapshot()
    counters = snapshot["counters"]
    assert set(counters) == set(COUNTERS)
    assert counters["messages_in_total"] == 0
    assert counters["events_total"] == dict.fromkeys(EVENT_TYPES, 0)
    assert counters["webhook_failures_total"] == dict.fromkeys(WEBHOOK_TARGETS, 0)
    assert set(snapshot["histograms"]) == set(HISTOGRAMS)
    histogram = snapshot["histograms"]["send_latency_seconds"]
    assert list(histogram["buckets"]) == [*(repr(b) for b in LATENCY_BUCKETS), "+Inf"]
    assert histogram["sum"] == 0.0
    assert histogram["count"] == 0
    # Stored as JSON as it is.
    assert json.loads(json.dumps(snapshot)) == snapshot


def test_inc_by_name_and_label() -> None:
    counters = Counters()
    counters.inc("messages_in_total")
    counters.inc("messages_in_total", amount=2)
    counters.inc("events_total", "submitted")
    counters.inc("webhook_failures_total", "mo_url")
    counters.inc("webhook_failures_total", "mo_url")
    assert counters.value("messages_in_total") == 3
    assert counters.value("events_total", "submitted") == 1
    snapshot = counters.snapshot()["counters"]
    assert snapshot["messages_in_total"] == 3
    assert snapshot["events_total"]["submitted"] == 1
    assert snapshot["events_total"]["rejected"] == 0
    assert snapshot["webhook_failures_total"] == {"mo_url": 2, "event_url": 0, "status_url": 0}


@pytest.mark.parametrize(
    ("name", "label"),
    [
        pytest.param("nope_total", None, id="unknown-name"),
        pytest.param("events_total", "ack", id="unknown-label"),
        pytest.param("events_total", None, id="missing-label"),
        pytest.param("messages_in_total", "x", id="label-on-unlabelled"),
    ],
)
def test_undeclared_counters_raise(name: str, label: str | None) -> None:
    with pytest.raises(KeyError):
        Counters().inc(name, label)


def test_counters_never_decrease() -> None:
    with pytest.raises(ValueError, match="cannot decrease"):
        Counters().inc("messages_in_total", amount=-1)


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    counters = Counters(histograms={"h": (0.1, 1.0)})
    for value in (0.05, 0.1, 0.5, 1.0, 7.0, -3.0, math.nan):
        counters.observe("h", value)
    histogram = counters.snapshot()["histograms"]["h"]
    # -3 counts as 0 (clock skew); NaN is dropped.
    assert histogram["buckets"] == {"0.1": 3, "1.0": 5, "+Inf": 6}
    assert histogram["count"] == 6
    assert histogram["sum"] == pytest.approx(0.05 + 0.1 + 0.5 + 1.0 + 7.0)
    with pytest.raises(KeyError):
        counters.observe("unknown", 1.0)


def test_bucket_key() -> None:
    assert [bucket_key(b) for b in (0.005, 1, 3600.0, math.inf)] == [
        "0.005",
        "1.0",
        "3600.0",
        "+Inf",
    ]


def test_restore_adds_the_previous_run_once() -> None:
    before = Counters()
    before.inc("messages_in_total", amount=5)
    before.inc("events_total", "rejected", amount=2)
    before.observe("send_latency_seconds", 0.2)
    before.observe("send_latency_seconds", 20.0)
    stored = json.loads(json.dumps(before.snapshot()))

    after = Counters()
    after.inc("messages_in_total")
    after.observe("send_latency_seconds", 0.2)
    after.restore(stored)
    after.restore(stored)  # idempotent: a baseline, not an addition
    snapshot = after.snapshot()
    assert snapshot["counters"]["messages_in_total"] == 6
    assert snapshot["counters"]["events_total"]["rejected"] == 2
    histogram = snapshot["histograms"]["send_latency_seconds"]
    assert histogram["count"] == 3
    assert histogram["sum"] == pytest.approx(20.4)
    assert histogram["buckets"]["0.25"] == 2
    assert histogram["buckets"]["30.0"] == 3
    assert histogram["buckets"]["+Inf"] == 3
    assert after.value("messages_in_total") == 6


@pytest.mark.parametrize(
    "previous",
    [
        pytest.param(None, id="none"),
        pytest.param({}, id="empty"),
        pytest.param({"counters": "x", "histograms": []}, id="wrong-types"),
        pytest.param(
            {
                "counters": {"messages_in_total": -4, "events_total": {"submitted": "9"}},
                "histograms": {"send_latency_seconds": {"buckets": {"1": 1}, "sum": 1, "count": 1}},
            },
            id="bad-values-and-other-buckets",
        ),
    ],
)
def test_restore_skips_what_is_malformed(previous: dict[str, object] | None) -> None:
    counters = Counters()
    counters.restore(previous)
    assert counters.snapshot() == Counters().snapshot()


def test_restore_skips_inconsistent_histogram() -> None:
    stored = Counters().snapshot()
    histogram = stored["histograms"]["send_latency_seconds"]
    histogram["buckets"]["0.005"] = 3  # more than the following cumulative buckets
    histogram["count"] = 0
    counters = Counters()
    counters.restore(stored)
    assert counters.snapshot()["histograms"]["send_latency_seconds"]["count"] == 0
