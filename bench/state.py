"""StateStore throughput: put_outbound+get_outbound pairs and incr_rate, per backend.

    python -m bench.state --backend embedded|redis --ops 5000 --concurrency 1,50 --out r.json

Each case runs at most --ops operations and --max-seconds seconds; data goes into a
fresh namespace (Redis keys are deleted afterwards, the SQLite file is temporary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ipc.names import Namespace
from ipc.settings import RedisSettings, Settings
from ipc.state import open_state
from ipc.state_redis import RedisStateStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ipc.state import StateStore

TTL = 600.0
CHANNEL = "bench-channel"
RECORD: dict[str, Any] = {
    "to": "+27820000001",
    "from": "+27820000002",
    "group": None,
    "message_id": "",
    "channel_id": CHANNEL,
    "timestamp": "2024-01-01 00:00:00.000000",
    "reply_to": None,
    "content": "a message body of ordinary length " * 3,
    "channel_data": {},
    "event_url": "http://127.0.0.1:9/events",
    "event_auth_token": "secret",
    "priority": 1,
}


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: str
    concurrency: int
    ops: int
    store_calls: int
    seconds: float
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    truncated: bool


async def _put_get(store: StateStore, index: int) -> None:
    mid = f"m{index}"
    await store.put_outbound(CHANNEL, mid, {**RECORD, "message_id": mid}, TTL)
    await store.get_outbound(CHANNEL, mid, TTL)


async def _incr(store: StateStore, index: int) -> None:
    await store.incr_rate(CHANNEL, "outbound", index // 1000, TTL)


CASES: dict[str, tuple[Callable[[StateStore, int], Awaitable[None]], int]] = {
    # name -> (one operation, store calls per operation)
    "put_outbound+get_outbound": (_put_get, 2),
    "incr_rate": (_incr, 1),
}


async def run_case(
    store: StateStore, name: str, ops: int, concurrency: int, max_seconds: float
) -> CaseResult:
    operation, calls_per_op = CASES[name]
    indices = iter(range(ops))
    latencies: list[float] = []

    async def worker() -> None:
        for index in indices:
            began = time.perf_counter()
            await operation(store, index)
            latencies.append(time.perf_counter() - began)

    start = time.perf_counter()
    with trio.move_on_after(max_seconds) as scope:
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    seconds = time.perf_counter() - start
    done = len(latencies)
    quantiles = statistics.quantiles(latencies, n=100) if done >= 2 else [0.0] * 99
    return CaseResult(
        case=name,
        concurrency=concurrency,
        ops=done,
        store_calls=done * calls_per_op,
        seconds=round(seconds, 3),
        ops_per_s=round(done / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=round(quantiles[49] * 1000, 3),
        p99_ms=round(quantiles[98] * 1000, 3),
        truncated=scope.cancelled_caught,
    )


async def run_bench(settings: Settings, args: argparse.Namespace) -> list[CaseResult]:
    namespace = Namespace(f"bench-{uuid.uuid4().hex[:8]}")
    results: list[CaseResult] = []
    async with open_state(settings, namespace) as store:
        try:
            for concurrency in args.concurrency:
                for name in CASES:
                    result = await run_case(store, name, args.ops, concurrency, args.max_seconds)
                    results.append(result)
                    print(
                        f"{args.backend:8} {name:26} c={concurrency:<3} {result.ops} ops "
                        f"in {result.seconds:.2f}s = {result.ops_per_s:,.0f} ops/s "
                        f"(p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms)"
                        + (" TRUNCATED" if result.truncated else ""),
                        flush=True,
                    )
        finally:
            if isinstance(store, RedisStateStore):
                with trio.move_on_after(10, shield=True):
                    await store.purge_namespace()
    return results


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.state", description=__doc__)
    parser.add_argument("--backend", choices=("embedded", "redis"), default="embedded")
    parser.add_argument("--ops", type=int, default=5000, help="operations per case")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 50],
        help="comma-separated task counts, e.g. 1,50",
    )
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time cap per case")
    parser.add_argument(
        "--redis-host", default=os.environ.get("JUNEBUG_TEST_REDIS_HOST", "127.0.0.1")
    )
    parser.add_argument(
        "--redis-port", type=int, default=int(os.environ.get("JUNEBUG_TEST_REDIS_PORT", "6379"))
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.ops < 1 or min(args.concurrency) < 1:
        parser.error("--ops and every --concurrency value must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="junebug-bench-") as data_dir:
        redis = (
            RedisSettings(host=args.redis_host, port=args.redis_port)
            if args.backend == "redis"
            else None
        )
        settings = Settings(data_dir=Path(data_dir), redis=redis)
        results = trio.run(run_bench, settings, args)
    report = {
        "benchmark": "state",
        "backend": args.backend,
        "started_at": started_at,
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "ops_per_case": args.ops,
        "cases": [asdict(result) for result in results],
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
