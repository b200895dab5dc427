"""The channel process's in-process metrics registry: counters by name and label, fixed-bucket
histograms, and the "metrics" snapshot shape stored under kv scope "{cid}:runtime" (issue 7).
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

#: Junebug event types (docs 1.8.2): the only labels of `events_total`.
EVENT_TYPES: Final = (
    "submitted",
    "rejected",
    "delivery_succeeded",
    "delivery_failed",
    "delivery_pending",
)
#: The only labels of `webhook_failures_total` (router destinations count as mo_url/event_url).
WEBHOOK_TARGETS: Final = ("mo_url", "event_url", "status_url")

#: Counter name -> its fixed label set, or None for an unlabelled counter.
COUNTERS: Final[Mapping[str, tuple[str, ...] | None]] = {
    "messages_out_total": None,
    "messages_in_total": None,
    "parts_out_total": None,
    "events_total": EVENT_TYPES,
    "webhook_failures_total": WEBHOOK_TARGETS,
}

#: Seconds; wide, because a delivery report may come minutes or hours after the send.
LATENCY_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)

#: Histogram name -> its bucket upper bounds (ascending; "+Inf" is implied).
HISTOGRAMS: Final[Mapping[str, tuple[float, ...]]] = {
    "send_latency_seconds": LATENCY_BUCKETS,
    "delivery_report_latency_seconds": LATENCY_BUCKETS,
}

INF_KEY: Final = "+Inf"


def bucket_key(bound: float) -> str:
    """How a bucket bound is written in the snapshot: "0.005", "1.0", ..., "+Inf"."""
    return INF_KEY if math.isinf(bound) else repr(float(bound))


@dataclass(slots=True)
class _Histogram:
    bounds: tuple[float, ...]
    #: Per-bucket (not cumulative) counts; the last slot is +Inf.
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # Buckets are `le` (upper bound inclusive), as Prometheus's.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def bucket_keys(self) -> list[str]:
        return [bucket_key(b) for b in self.bounds] + [INF_KEY]

    def render(self, baseline: _Histogram | None) -> dict[str, Any]:
        counts = list(self.counts)
        total, count = self.total, self.count
        if baseline is not None:
            counts = [a + b for a, b in zip(counts, baseline.counts, strict=True)]
            total += baseline.total
            count += baseline.count
        cumulative: dict[str, int] = {}
        running = 0
        for key, n in zip(self.bucket_keys(), counts, strict=True):
            running += n
            cumulative[key] = running
        return {"buckets": cumulative, "sum": total, "count": count}


class Counters:
    """Counters and histograms of one channel process, updated in place (one trio thread, so no
    locking) and read as a snapshot.

    Only declared names and labels are accepted (bounded label cardinality for /metrics): an
    undeclared one is a programming error and raises. `restore()` sets the previous run's
    snapshot as a baseline that `snapshot()` adds, so values never go backwards across restarts.
    """

    def __init__(
        self,
        counters: Mapping[str, Sequence[str] | None] = COUNTERS,
        histograms: Mapping[str, Sequence[float]] = HISTOGRAMS,
    ) -> None:
        self._labels: dict[str, tuple[str, ...] | None] = {
            name: tuple(labels) if labels is not None else None for name, labels in counters.items()
        }
        self._values = self._zeroed()
        self._baseline = self._zeroed()
        self._histograms = {
            name: _Histogram(tuple(sorted(float(b) for b in bounds)))
            for name, bounds in histograms.items()
        }
        self._histogram_baseline: dict[str, _Histogram] = {}

    def _zeroed(self) -> dict[tuple[str, str | None], int]:
        values: dict[tuple[str, str | None], int] = {}
        for name, labels in self._labels.items():
            for label in labels if labels is not None else (None,):
                values[(name, label)] = 0
        return values

    def inc(self, name: str, label: str | None = None, *, amount: int = 1) -> None:
        """Add `amount` (>= 0) to counter `name` (with `label` when the counter has labels).

        Raises:
            KeyError: `name` is not declared, or `label` is not one of its labels (or is
                missing / given for an unlabelled counter).
            ValueError: `amount` is negative (counters never go down).
        """
        if amount < 0:
            raise ValueError(f"counter {name} cannot decrease (amount {amount})")
        key = (name, label)
        if key not in self._values:
            raise KeyError(f"undeclared counter {name} with label {label!r}")
        self._values[key] += amount

    def observe(self, name: str, value: float) -> None:
        """Record one observation (seconds) in histogram `name`; negative values (clock skew)
        count as 0 and NaN is ignored.

        Raises:
            KeyError: `name` is not a declared histogram.
        """
        histogram = self._histograms[name]
        if math.isnan(value):
            return
        histogram.observe(max(0.0, value))

    def value(self, name: str, label: str | None = None) -> int:
        """A counter's current value, baseline included.

        Raises:
            KeyError: as `inc`.
        """
        key = (name, label)
        return self._values[key] + self._baseline[key]

    def snapshot(self) -> dict[str, Any]:
        """{"counters": {...}, "histograms": {...}} as in the issue 7 metrics snapshot.

        Unlabelled counters are ints; labelled ones a dict with every declared label (zeros
        included). Histogram buckets are cumulative (Prometheus `le`), keyed by `bucket_key`,
        ending with "+Inf" (== count). The snapshot writer adds "link_up" and "updated".
        """
        counters: dict[str, Any] = {}
        for name, labels in self._labels.items():
            if labels is None:
                counters[name] = self.value(name)
            else:
                counters[name] = {label: self.value(name, label) for label in labels}
        histograms = {
            name: histogram.render(self._histogram_baseline.get(name))
            for name, histogram in self._histograms.items()
        }
        return {"counters": counters, "histograms": histograms}

    def restore(self, previous: Mapping[str, Any] | None) -> None:
        """Use a previous snapshot (as stored; anything malformed is skipped) as the baseline.

        Replaces any earlier baseline, so calling it twice does not double count. A histogram
        whose stored buckets differ from the declared ones is not restored.
        """
        self._baseline = self._zeroed()
        self._histogram_baseline = {}
        if not previous:
            return
        counters = previous.get("counters")
        if isinstance(counters, dict):
            for name, labels in self._labels.items():
                stored = counters.get(name)
                if labels is None:
                    self._baseline[(name, None)] = _count(stored)
                elif isinstance(stored, dict):
                    for label in labels:
                        self._baseline[(name, label)] = _count(stored.get(label))
        histograms = previous.get("histograms")
        if isinstance(histograms, dict):
            for name, histogram in self._histograms.items():
                restored = _restore_histogram(histogram, histograms.get(name))
                if restored is not None:
                    self._histogram_baseline[name] = restored
                elif name in histograms:
                    log.warning("the stored %s histogram does not match; not restored", name)


def _count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def _restore_histogram(current: _Histogram, stored: object) -> _Histogram | None:
    """The stored histogram (cumulative buckets) as per-bucket counts, if its layout matches."""
    if not isinstance(stored, dict):
        return None
    buckets = stored.get("buckets")
    total = stored.get("sum")
    count = _count(stored.get("count"))
    if not isinstance(buckets, dict) or set(buckets) != set(current.bucket_keys()):
        return None
    if not isinstance(total, int | float) or isinstance(total, bool):
        return None
    cumulative = [_count(buckets[key]) for key in current.bucket_keys()]
    counts = [b - a for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True)]
    if any(n < 0 for n in counts) or cumulative[-1] != count:
        return None
    return _Histogram(current.bounds, counts, float(total), count)
