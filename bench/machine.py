"""What the machine itself did during a benchmark: how fast a fixed piece of Python ran, and
how much of its CPU the hypervisor gave to others (steal).

On a shared virtual machine both move: seen here on one day, a loop of ten million
additions took 1.06 to 2.26 s, and 15-41% of the CPU was stolen whenever the gateway was
busy (none when idle). CPU seconds per message move with them too (a core that runs the
loop slower takes longer for the same work), so figures from runs (or windows) that differ
in these do not compare.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

PROC_STAT: Final = Path("/proc/stat")
#: Additions in the speed probe: about 50-200 ms of one core, short enough to run often.
PROBE_LOOP: Final = 2_000_000
PROBE_REPEATS: Final = 3


def loop_ms() -> float:
    """Milliseconds the fixed loop takes on one core, best of PROBE_REPEATS (a preempted
    repeat says nothing of the core's speed)."""
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        started = time.perf_counter()
        total = 0
        for n in range(PROBE_LOOP):
            total += n
        best = min(best, time.perf_counter() - started)
    return best * 1000


@dataclass(frozen=True, slots=True)
class CpuTicks:
    """The machine's CPU time so far, all CPUs, in clock ticks (the `cpu` line of
    /proc/stat)."""

    steal: int
    total: int


def cpu_ticks() -> CpuTicks | None:
    """None where /proc/stat is missing or has no steal column (not Linux, old kernels)."""
    try:
        line = PROC_STAT.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = line.split()
    # cpu user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    # counted in user and nice already.
    if fields[:1] != ["cpu"] or len(fields) < 9:
        return None
    values = [int(v) for v in fields[1:9]]
    return CpuTicks(steal=values[7], total=sum(values))


def stolen_percent(before: CpuTicks | None, after: CpuTicks | None) -> float | None:
    """The share of the machine's CPU time the hypervisor took between two readings."""
    if before is None or after is None or after.total <= before.total:
        return None
    return 100 * (after.steal - before.steal) / (after.total - before.total)
