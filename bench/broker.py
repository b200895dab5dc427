"""Broker throughput: publish-with-confirm (sequential and concurrent) and consume+ack rates.

    python -m bench.broker --backend embedded|rabbitmq --messages 5000 --out results.json

Runs against the real backend (a temporary SQLite file, or RabbitMQ at --amqp-host/port) on
queues under a random namespace, deleted afterwards. Bounded by --messages and --timeout.
Each phase reports its rate and this process's CPU (all threads) per message: on a shared
machine the CPU figure moves much less than the rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from bench.cli import add_service_args, check_ranges, run_main
from ipc.broker_amqp import AmqpBroker
from ipc.broker_sqlite import SqliteBroker
from ipc.names import Namespace
from ipc.settings import AmqpSettings

if TYPE_CHECKING:
    from ipc.broker import Broker

CONCURRENT_PUBLISHERS = 50
PREFETCH = 100


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    messages: int
    seconds: float
    #: CPU seconds (user + system, every thread of this process) the phase took.
    cpu_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")

    @property
    def cpu_us_per_message(self) -> float:
        return self.cpu_seconds * 1e6 / self.messages if self.messages else 0.0

    def summary(self) -> str:
        return (
            f"{self.name:<24} {self.messages:>6} msgs {self.seconds:8.3f} s {self.rate:10.0f} msg/s"
            f" {self.cpu_us_per_message:8.0f} us CPU/msg"
        )


class _Clock:
    """Wall and CPU time since it was made."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def phase(self, name: str, messages: int) -> Phase:
        return Phase(
            name, messages, time.perf_counter() - self.wall, time.process_time() - self.cpu
        )


async def publish_sequential(broker: Broker, queue: str, count: int, body: bytes) -> Phase:
    clock = _Clock()
    for _ in range(count):
        await broker.publish(queue, body)
    return clock.phase("publish sequential", count)


async def publish_concurrent(broker: Broker, queue: str, count: int, body: bytes) -> Phase:
    async def publisher(share: int) -> None:
        for _ in range(share):
            await broker.publish(queue, body)

    shares = [count // CONCURRENT_PUBLISHERS] * CONCURRENT_PUBLISHERS
    shares[0] += count - sum(shares)
    clock = _Clock()
    async with trio.open_nursery() as nursery:
        for share in shares:
            nursery.start_soon(publisher, share)
    return clock.phase(f"publish {CONCURRENT_PUBLISHERS} concurrent", count)


async def consume_and_ack(broker: Broker, queue: str, count: int) -> Phase:
    clock = _Clock()
    async with broker.consume(queue, prefetch=PREFETCH) as consumer:
        for _ in range(count):
            await consumer.ack(await consumer.receive())
    return clock.phase(f"consume+ack prefetch {PREFETCH}", count)


async def run(broker: Broker, messages: int, body_size: int) -> list[Phase]:
    queue = Namespace(f"bench-{uuid.uuid4().hex[:12]}").queue("broker")
    body = b"x" * body_size
    try:
        await broker.declare_queue(queue)
        phases = [
            await publish_sequential(broker, queue, messages, body),
            await publish_concurrent(broker, queue, messages, body),
        ]
        phases.append(await consume_and_ack(broker, queue, 2 * messages))
    finally:
        with trio.move_on_after(10, shield=True):
            await broker.delete_queue(queue)
    return phases


async def open_backend(args: argparse.Namespace, data_dir: Path) -> Broker:
    if args.backend == "rabbitmq":
        return await AmqpBroker.connect(AmqpSettings(hostname=args.amqp_host, port=args.amqp_port))
    return await SqliteBroker.open(data_dir / "queues.sqlite3")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jb-bench-") as tmp, trio.fail_after(args.timeout):
        broker = await open_backend(args, Path(tmp))
        try:
            phases = await run(broker, args.messages, args.body_size)
        finally:
            await broker.aclose()
    for phase in phases:
        print(f"broker[{args.backend}] {phase.summary()}")
    return {
        "benchmark": "broker",
        "backend": args.backend,
        "messages": args.messages,
        "body_size": args.body_size,
        "concurrent_publishers": CONCURRENT_PUBLISHERS,
        "prefetch": PREFETCH,
        "results": [
            {
                **asdict(p),
                "rate": round(p.rate, 1),
                "cpu_us_per_message": round(p.cpu_us_per_message, 1),
            }
            for p in phases
        ],
        "git_commit": git_commit(),
        "machine": machine(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.broker", description=__doc__)
    parser.add_argument("--backend", choices=["embedded", "rabbitmq"], required=True)
    parser.add_argument("--messages", type=int, default=5000, help="per publish phase")
    parser.add_argument("--body-size", type=int, default=512)
    add_service_args(parser, timeout=300.0, redis=False)
    args = parser.parse_args(argv)
    check_ranges(parser, args, {"--messages": (1, 1_000_000)})
    return args


def main(argv: list[str] | None = None) -> None:
    run_main(main_async, parse_args(argv))


if __name__ == "__main__":
    main()
