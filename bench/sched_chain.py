"""What a CPU-bound neighbour at a draining channel's priority costs a chain of processes.

    python -m bench.sched_chain [--processes 4] [--work-ms 1] [--trips 700] [--repeats 3]

A message through the gateway crosses several processes (the API worker, the channel
process, their store and queue), each waking, working briefly and handing over. This
reproduces only that, without the gateway: a byte goes round a ring of `--processes`
processes, each in a session (so an autogroup) of its own as the supervisor starts them,
all but the first spending `--work-ms` of CPU before passing it on, one round trip every
`--interval-ms`. Each mode runs a busy loop per CPU beside the ring:

- `none`: no busy loop (the reference);
- `backlog`: at the priority a channel with a backlog takes now
  (channel_proc.priority.ProcessPriority.lower: autogroup nice 19, SCHED_BATCH, a 100 ms
  time slice, nice +10 where it may set it back);
- `nice10`: at the priority it took before (autogroup nice +10, SCHED_BATCH, nice +10, the
  kernel's default slice).

Modes run interleaved, `--repeats` times, and each prints the round trips' p50 and p99 and
how many were late: more than LATE_MS beyond the ring's own work, which on a kernel with a
4 ms tick is what a neighbour picked in the middle of the chain costs.

Linux only (fork, sessions, autogroups, /proc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Final, NoReturn

from bench.machine import cpu_ticks, loop_ms, stolen_percent
from tests.e2e.gateway import ROOT

if TYPE_CHECKING:
    from collections.abc import Iterator

#: A round trip this much beyond the ring's work is late.
LATE_MS: Final = 1.5
#: Seconds the busy loops get to start before the ring runs.
SETTLE: Final = 0.5
BUSY: Final = {
    "backlog": """
from channel_proc.priority import ProcessPriority
ProcessPriority().lower()
""",
    "nice10": """
import os
open("/proc/self/autogroup", "w").write("10")
os.nice(10)
os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
""",
}
MODES: Final = ("none", *BUSY)


@dataclass
class Trial:
    mode: str
    p50_ms: float
    p99_ms: float
    late: int
    trips: int
    steal_percent: float | None


def busy_loop(mode: str) -> subprocess.Popen[bytes]:
    """A busy loop at `mode`'s priority (a key of BUSY), in a session (so an autogroup) of
    its own as the supervisor starts a channel; also bench.isolation's burn control."""
    return subprocess.Popen(
        [sys.executable, "-c", BUSY[mode] + "while True:\n    pass\n"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )


def busy_loops(mode: str) -> list[subprocess.Popen[bytes]]:
    if mode == "none":
        return []
    return [busy_loop(mode) for _ in range(os.cpu_count() or 1)]


def hop(inbound: socket.socket, outbound: socket.socket, work: float) -> NoReturn:
    """A ring member, in a forked child."""
    try:
        os.setsid()
        while inbound.recv(1):
            started = time.perf_counter()
            while time.perf_counter() - started < work:
                pass
            outbound.send(b"x")
    finally:
        # Never back into the parent's code, whatever happened.
        os._exit(0)


@contextlib.contextmanager
def ring(processes: int, work: float) -> Iterator[tuple[socket.socket, socket.socket]]:
    """Yields (first, last): send on first, receive the byte back on last."""
    pairs = [socket.socketpair() for _ in range(processes)]
    children = []
    try:
        for n in range(1, processes):
            pid = os.fork()
            if pid == 0:
                hop(pairs[n - 1][1], pairs[n][0], work)
            children.append(pid)
        yield pairs[0][0], pairs[-1][1]
    finally:
        for child in children:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        for a, b in pairs:
            a.close()
            b.close()


def trial(mode: str, args: argparse.Namespace) -> Trial:
    work = args.work_ms / 1000
    loops = busy_loops(mode)
    try:
        time.sleep(SETTLE if loops else 0)
        ticks0 = cpu_ticks()
        rtts = []
        with ring(args.processes, work) as (first, last):
            for _ in range(args.trips):
                time.sleep(args.interval_ms / 1000)
                started = time.perf_counter()
                first.send(b"x")
                last.recv(1)
                rtts.append((time.perf_counter() - started) * 1000)
        steal = stolen_percent(ticks0, cpu_ticks())
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    rtts.sort()
    late_after = (args.processes - 1) * args.work_ms + LATE_MS
    return Trial(
        mode=mode,
        p50_ms=rtts[len(rtts) // 2],
        p99_ms=rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))],
        late=sum(1 for rtt in rtts if rtt > late_after),
        trips=len(rtts),
        steal_percent=steal,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sched_chain", description=__doc__)
    parser.add_argument("--processes", type=int, default=4, help="processes in the ring")
    parser.add_argument("--work-ms", type=float, default=1.0, help="CPU per hop")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="between round trips")
    parser.add_argument("--trips", type=int, default=700, help="round trips per trial")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.modes = args.modes.split(",")
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; known: {', '.join(MODES)}")
    if not 2 <= args.processes <= 32 or args.trips < 1 or args.repeats < 1:
        parser.error("--processes must be 2-32, --trips and --repeats at least 1")
    if not 0 <= args.work_ms <= 100 or not 0 <= args.interval_ms <= 1000:
        parser.error("--work-ms must be 0-100 and --interval-ms 0-1000")
    return args


def main(argv: list[str] | None = None) -> None:
    if not sys.platform.startswith("linux"):
        sys.exit("bench.sched_chain: Linux only")
    args = parse_args(argv)
    print(
        f"sched_chain: {args.processes} processes, {args.work_ms:g} ms of work per hop, "
        f"a busy loop per CPU ({os.cpu_count()}) beside them; kernel {os.uname().release}; "
        f"loop {loop_ms():.0f} ms"
    )
    trials = []
    for _ in range(args.repeats):
        for mode in args.modes:
            result = trial(mode, args)
            trials.append(result)
            steal = "-" if result.steal_percent is None else f"{result.steal_percent:.1f}%"
            print(
                f"{mode:>8}: p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
                f"late {result.late} of {result.trips}, steal {steal}",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"args": vars(args), "trials": [asdict(t) for t in trials]}, out, indent=2)


if __name__ == "__main__":
    main()
