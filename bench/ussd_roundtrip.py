"""USSD round trip through the real gateway: the latency the gateway adds to a Dmark reply.

    python -m bench.ussd_roundtrip --backend embedded|redis --requests 300 --out results.json

Starts the real junebug-supervisor (tests/e2e/gateway.py) with one dmark channel, a fake
application (mo_url) that answers every message by POSTing a reply to the API, and an HTTP
client playing Dmark. For each request, "added" is the time from the application starting
its reply POST to Dmark receiving the USSD HTTP response: API + store + queue + channel
process + HTTP answer. Bounded by --requests and --timeout; loopback only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from bench.broker import git_commit, machine
from bench.cli import add_service_args, check_ranges, run_main
from ipc.settings import AmqpSettings, RedisSettings, Settings
from tests.e2e.gateway import free_port, remember_channel, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook

TARGET_P99_MS = 20.0
READY_TIMEOUT = 60.0


@dataclass(slots=True)
class Timings:
    """Per msisdn (one request each): when the app began its reply, when Dmark got it."""

    reply_started: dict[str, float] = field(default_factory=dict)
    reply_posted: dict[str, float] = field(default_factory=dict)
    request_started: dict[str, float] = field(default_factory=dict)
    answered: dict[str, float] = field(default_factory=dict)


def settings_for(backend: str, tmp: Path, args: argparse.Namespace) -> Settings:
    base = Settings(
        data_dir=tmp / "data",
        logging_path=str(tmp / "logs"),
        namespace=f"bench-{uuid.uuid4().hex[:12]}",
    )
    if backend == "embedded":
        return base
    return base.model_copy(
        update={
            "redis": RedisSettings(host=args.redis_host, port=args.redis_port),
            "amqp": AmqpSettings(hostname=args.amqp_host, port=args.amqp_port),
        }
    )


async def create_channel(gateway: Gateway, hook: FakeWebhook, web_port: int) -> str:
    response = await gateway.request(
        "POST",
        "/channels/",
        {
            "type": "dmark",
            "mo_url": hook.url("/mo"),
            "config": {"web_path": "/ussd", "web_port": web_port, "web_interface": "127.0.0.1"},
        },
    )
    if response.status_code != 201:
        raise RuntimeError(f"channel not created: {response.text}")
    channel_id: str = response.json()["result"]["id"]
    remember_channel(gateway.settings, channel_id)
    return channel_id


async def run_application(
    gateway: Gateway, hook: FakeWebhook, channel_id: str, total: int, timings: Timings
) -> None:
    """Reply to each message at the mo_url as soon as it arrives (one task per reply)."""
    async with (
        httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as api,
        trio.open_nursery() as nursery,
    ):

        async def reply(body: dict[str, Any]) -> None:
            msisdn = body["from"]
            timings.reply_started[msisdn] = time.perf_counter()
            response = await api.post(
                f"/channels/{channel_id}/messages/",
                json={"reply_to": body["message_id"], "content": f"Hello {msisdn}"},
            )
            timings.reply_posted[msisdn] = time.perf_counter()
            if response.status_code != 201:
                raise RuntimeError(f"reply refused: {response.text}")

        for index in range(total):
            requests = await hook.wait_for_requests(index + 1, path="/mo")
            nursery.start_soon(reply, requests[index].json())


async def run_dmark(web_port: int, total: int, concurrency: int, timings: Timings) -> None:
    """`total` new USSD sessions from `concurrency` callers, each waiting for its answer."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with (
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{web_port}", timeout=30, limits=limits
        ) as client,
        trio.open_nursery() as nursery,
    ):

        async def call(index: int) -> None:
            msisdn = f"+2567{index:08d}"
            timings.request_started[msisdn] = time.perf_counter()
            response = await client.get(
                "/ussd",
                params={
                    "transactionId": f"tx-{index}",
                    "msisdn": msisdn,
                    "ussdServiceCode": "*180#",
                    "transactionTime": "1389971940",
                    "ussdRequestString": "*180#",
                    "creationTime": "1389971950",
                    "response": "false",
                },
            )
            timings.answered[msisdn] = time.perf_counter()
            body = response.json()
            if body != {"responseString": f"Hello {msisdn}", "action": "request"}:
                raise RuntimeError(f"unexpected USSD response {response.status_code}: {body}")

        async def caller(first: int) -> None:
            for index in range(first, total, concurrency):
                await call(index)

        for first in range(concurrency):
            nursery.start_soon(caller, first)


async def wait_listening(web_port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}", timeout=5) as client:

        async def healthy() -> bool:
            try:
                return (await client.get("/health")).status_code == 200
            except httpx.TransportError:
                return False

        with trio.fail_after(READY_TIMEOUT):
            await wait_for(healthy)


def percentiles(values: list[float]) -> dict[str, float]:
    """Milliseconds: p50, p90, p99, max, mean."""
    ms = sorted(v * 1000 for v in values)
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "p50": round(cuts[49], 2),
        "p90": round(cuts[89], 2),
        "p99": round(cuts[98], 2),
        "max": round(ms[-1], 2),
        "mean": round(statistics.fmean(ms), 2),
    }


def summarise(timings: Timings, warmup: int) -> dict[str, dict[str, float]]:
    """Latency figures over the requests after the first `warmup` ones."""
    keys = sorted(timings.answered, key=lambda k: timings.request_started[k])[warmup:]
    added = [timings.answered[k] - timings.reply_started[k] for k in keys]
    api = [timings.reply_posted[k] - timings.reply_started[k] for k in keys]
    total = [timings.answered[k] - timings.request_started[k] for k in keys]
    return {
        "gateway_added": percentiles(added),
        "reply_post": percentiles(api),
        "ussd_round_trip": percentiles(total),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    total = args.warmup + args.requests
    timings = Timings()
    web_port = free_port()
    with tempfile.TemporaryDirectory(prefix="jb-bench-") as tmp:
        settings = settings_for(args.backend, Path(tmp), args)
        async with open_fake_webhook() as hook, running_gateway(settings) as gateway:
            channel_id = await create_channel(gateway, hook, web_port)
            await wait_listening(web_port)
            with trio.fail_after(args.timeout):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_application, gateway, hook, channel_id, total, timings)
                    await run_dmark(web_port, total, args.concurrency, timings)
    figures = summarise(timings, args.warmup)
    added = figures["gateway_added"]
    print(
        f"ussd_roundtrip[{args.backend}] {args.requests} requests, concurrency {args.concurrency}: "
        f"gateway added p50 {added['p50']:.1f} ms, p99 {added['p99']:.1f} ms "
        f"(target p99 < {TARGET_P99_MS:.0f} ms); "
        f"reply POST p50 {figures['reply_post']['p50']:.1f} ms; "
        f"full USSD round trip p50 {figures['ussd_round_trip']['p50']:.1f} ms, "
        f"p99 {figures['ussd_round_trip']['p99']:.1f} ms"
    )
    return {
        "benchmark": "ussd_roundtrip",
        "backend": args.backend,
        "requests": args.requests,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "unit": "ms",
        "target_p99_ms": TARGET_P99_MS,
        "results": figures,
        "git_commit": git_commit(),
        "machine": machine(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ussd_roundtrip", description=__doc__)
    parser.add_argument("--backend", choices=["embedded", "redis"], required=True)
    parser.add_argument("--requests", type=int, default=300, help="measured requests")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests first")
    parser.add_argument("--concurrency", type=int, default=1, help="sessions in flight")
    add_service_args(parser, timeout=300.0)
    args = parser.parse_args(argv)
    check_ranges(
        parser,
        args,
        {
            "--requests": (2, 10_000),
            "--warmup": (0, 1000),
            "--concurrency": (1, 50),
        },
    )
    return args


def main(argv: list[str] | None = None) -> None:
    run_main(main_async, parse_args(argv))


if __name__ == "__main__":
    main()
