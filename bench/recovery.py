"""Recovery times of the real gateway: a channel process killed with SIGKILL, and a full restart.

    python -m bench.recovery --backend embedded|redis --channels 1,10,50 --out results.json

For each N, the real junebug-supervisor (tests/e2e/gateway.py) runs N telnet channels on
127.0.0.1. Then:

- kill: SIGKILL to one channel process while messages are sent to it (they queue while it
  is down). "bound" is the time from the kill until its telnet port accepts connections
  again (the supervisor's first restart delay, 0.5 s +-20 %, included); "drained" until
  every message queued meanwhile has its event at the event_url (telnet rejects them: the
  addressee is not connected), i.e. its outbound queue is empty. Repeated on up to --kills
  distinct channels (each has its own restart budget).
- restart: SIGTERM to the supervisor ("stop" until it exited), then a new supervisor:
  "api" until GET /health answers 200, "all bound" until all N telnet ports accept.

CPU seconds are printed too (a killed channel's new process until drained; the whole new
gateway until all N are bound): on a shared machine they move far less than the times.

Bounded by --timeout per step; loopback only.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import trio

from bench.broker import git_commit, machine
from bench.cli import add_service_args, check_ranges, run_main
from bench.smpp_load import cpu_seconds, process_tree
from ipc.settings import AmqpSettings, RedisSettings, Settings
from tests.e2e.gateway import channel_pids, free_port, remember_channel, running_gateway
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook

#: Channels created at once (each POST waits for its channel process to be ready).
CREATE_CONCURRENCY: Final = 4
SEND_CONCURRENCY: Final = 8
#: How often a port is tried while waiting for it to accept connections: one killed
#: channel's port often, the N ports of a restart less often (probing 50 ports every 10 ms
#: would take CPU from the processes being measured).
PROBE_INTERVAL: Final = 0.01
RESTART_PROBE_INTERVAL: Final = 0.05


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


async def create_channels(
    gateway: Gateway, hook: FakeWebhook, ports: list[int], client: httpx.AsyncClient
) -> list[str]:
    ids: dict[int, str] = {}
    limiter = trio.CapacityLimiter(CREATE_CONCURRENCY)

    async def create(port: int) -> None:
        async with limiter:
            response = await client.post(
                f"{gateway.base_url}/channels/",
                json={
                    "type": "telnet",
                    "mo_url": hook.url("/mo"),
                    "config": {"twisted_endpoint": f"tcp:port={port}:interface=127.0.0.1"},
                },
            )
        if response.status_code != 201:
            raise RuntimeError(f"channel on port {port} not created: {response.text}")
        ids[port] = response.json()["result"]["id"]
        remember_channel(gateway.settings, ids[port])

    async with trio.open_nursery() as nursery:
        for port in ports:
            nursery.start_soon(create, port)
    return [ids[port] for port in ports]


async def accepting(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def wait_accepting(port: int, interval: float = PROBE_INTERVAL) -> float:
    """Until `port` accepts a connection; returns when (trio clock)."""
    # Polling: another process binds the port, with nothing to wait on but a connect.
    while not await accepting(port):  # noqa: ASYNC110
        await trio.sleep(interval)
    return trio.current_time()


async def wait_all_accepting(ports: list[int]) -> float:
    async with trio.open_nursery() as nursery:
        for port in ports:
            nursery.start_soon(wait_accepting, port, RESTART_PROBE_INTERVAL)
    return trio.current_time()


async def send_queued(
    gateway: Gateway, hook: FakeWebhook, channel_id: str, count: int, client: httpx.AsyncClient
) -> set[str]:
    """`count` messages to a telnet address nobody is connected from; their message ids."""
    ids: set[str] = set()
    limiter = trio.CapacityLimiter(SEND_CONCURRENCY)

    async def send(n: int) -> None:
        async with limiter:
            response = await client.post(
                f"{gateway.base_url}/channels/{channel_id}/messages/",
                json={"to": "127.0.0.1:9", "content": f"queued {n}", "event_url": hook.url("/ev")},
            )
        if response.status_code != 201:
            raise RuntimeError(f"send refused: {response.text}")
        ids.add(response.json()["result"]["message_id"])

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(send, n)
    return ids


async def wait_events(hook: FakeWebhook, message_ids: set[str]) -> float:
    while not message_ids <= {r.json()["message_id"] for r in hook.on_path("/ev")}:
        await hook.wait_for_requests(len(hook.requests) + 1)
    return trio.current_time()


async def measure_kill(
    gateway: Gateway,
    hook: FakeWebhook,
    channel_id: str,
    port: int,
    queued: int,
    client: httpx.AsyncClient,
) -> dict[str, float]:
    (pid,) = channel_pids(channel_id)
    killed = trio.current_time()
    os.kill(pid, signal.SIGKILL)
    # Refused at once: the listening socket died with the process.
    while await accepting(port):  # noqa: ASYNC110 - as in wait_accepting
        await trio.sleep(PROBE_INTERVAL)
    message_ids = await send_queued(gateway, hook, channel_id, queued, client)
    bound = await wait_accepting(port)
    drained = await wait_events(hook, message_ids)
    # All the new process's CPU, from its spawn to the queue drained: unlike the times,
    # barely moved by other load on the machine.
    cpu = cpu_seconds(channel_pids(channel_id))
    return {"bound_s": bound - killed, "drained_s": drained - killed, "cpu_s": cpu}


async def measure_restart(gateway: Gateway, ports: list[int]) -> dict[str, float]:
    began = trio.current_time()
    code = await gateway.stop()
    stopped = trio.current_time()
    if code != 0:
        raise RuntimeError(f"the supervisor exited {code}:\n{gateway.output()}")
    for port in ports:
        if await accepting(port):
            raise RuntimeError(f"port {port} still accepts after the supervisor stopped")
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        # Ports are watched from the spawn on; start() returns once /health answers 200.
        bound_at: list[float] = []

        async def watch() -> None:
            bound_at.append(await wait_all_accepting(ports))

        nursery.start_soon(watch)
        await gateway.start()
        api = trio.current_time()
    assert gateway.process is not None
    return {
        "stop_s": stopped - began,
        "api_s": api - started,
        "all_bound_s": bound_at[0] - started,
        # Every process of the new gateway is new: their CPU is what the restart cost.
        "cpu_s": cpu_seconds(process_tree([gateway.process.pid])),
    }


def summary(values: list[float]) -> dict[str, float]:
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
    }


async def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    ports = [free_port() for _ in range(n)]
    with tempfile.TemporaryDirectory(prefix="jb-bench-") as tmp:
        settings = settings_for(args.backend, Path(tmp), args)
        async with (
            open_fake_webhook() as hook,
            running_gateway(settings) as gateway,
            httpx.AsyncClient(timeout=args.timeout) as client,
        ):
            began = trio.current_time()
            with trio.fail_after(args.timeout):
                ids = await create_channels(gateway, hook, ports, client)
            created = trio.current_time() - began
            kills = []
            # Each kill hits another channel: one killed again within its restart period
            # would wait out a longer (doubled) restart delay.
            for index in range(min(args.kills, n)):
                with trio.fail_after(args.timeout):
                    kills.append(
                        await measure_kill(
                            gateway, hook, ids[index], ports[index], args.queued, client
                        )
                    )
            with trio.fail_after(args.timeout):
                restart = await measure_restart(gateway, ports)
    return {
        "channels": n,
        "create_all_s": created,
        "kill": {
            "runs": kills,
            "bound_s": summary([k["bound_s"] for k in kills]),
            "drained_s": summary([k["drained_s"] for k in kills]),
            "cpu_s": summary([k["cpu_s"] for k in kills]),
        },
        "restart": restart,
    }


def table(results: list[dict[str, Any]], queued: int) -> str:
    """Medians (max in brackets) of the kills, and the restart, per N; seconds."""
    header = (
        "N",
        "kill -9 -> bound",
        f"-> {queued} queued drained",
        "restart: stop",
        "-> API up",
        "-> all N bound",
        "CPU s: kill",
        "restart",
    )
    rows = [header]
    for r in results:
        bound, drained, restart = r["kill"]["bound_s"], r["kill"]["drained_s"], r["restart"]
        rows.append(
            (
                str(r["channels"]),
                f"{bound['median']:.2f} ({bound['max']:.2f})",
                f"{drained['median']:.2f} ({drained['max']:.2f})",
                f"{restart['stop_s']:.2f}",
                f"{restart['api_s']:.2f}",
                f"{restart['all_bound_s']:.2f}",
                f"{r['kill']['cpu_s']['median']:.2f}",
                f"{restart['cpu_s']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results = [await run_size(n, args) for n in args.channels]
    print(f"recovery[{args.backend}] (medians over up to {args.kills} kills per N)")
    print(table(results, args.queued))
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs")
    return {
        "benchmark": "recovery",
        "backend": args.backend,
        "kills": args.kills,
        "queued": args.queued,
        "unit": "s",
        "results": results,
        "git_commit": git_commit(),
        "machine": machine(),
        # Other work on the machine stretches every time: the 1-minute load at the end.
        "load_average_1m": load,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__)
    parser.add_argument("--backend", choices=["embedded", "redis"], required=True)
    parser.add_argument(
        "--channels",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 10, 50],
        help="comma-separated channel counts (default 1,10,50)",
    )
    parser.add_argument("--kills", type=int, default=3, help="kills per N (distinct channels)")
    parser.add_argument("--queued", type=int, default=50, help="messages queued during a kill")
    add_service_args(parser, timeout=300.0)
    args = parser.parse_args(argv)
    if not all(1 <= n <= 200 for n in args.channels):
        parser.error("--channels must be between 1 and 200 each")
    check_ranges(
        parser,
        args,
        {
            "--kills": (1, 20),
            "--queued": (0, 5000),
        },
    )
    return args


def main(argv: list[str] | None = None) -> None:
    run_main(main_async, parse_args(argv))


if __name__ == "__main__":
    main()
