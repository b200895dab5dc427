"""Backlog priority: a channel draining a deep outbound queue gives way on the CPU.

A channel that has a backlog (its outbound queue deeper than BACKLOG_HIGH) sends flat out,
and on a machine with few cores its process then competes for CPU with every other channel's
process: their messages wait behind its drain. So while it has a backlog it lowers its own
CPU scheduling priority, and restores it once the queue is down to BACKLOG_LOW (the gap
keeps a queue hovering near one threshold from flapping). Throughput on an idle machine is
unchanged: a lower priority only matters when another process wants the CPU.

Four Linux mechanisms:

- The autogroup's nice BACKLOG_GROUP_NICE. Where the kernel groups processes by session
  (CONFIG_SCHED_AUTOGROUP, on by default in most distributions' kernels, for processes not
  placed in a CPU cgroup), it first shares the CPU between groups and only then between a
  group's threads by their nice. The supervisor starts every channel in a session of its
  own, so a channel is its own group and a thread's nice alone changes nothing against
  other channels (measured: two busy processes in two sessions, one at nice 10, split a
  core 50/50; with the group at nice 10, 90/10). Any process may set its group's nice back
  down to 0, so it is used whenever the process leads its session (otherwise the group is
  its caller's whole session) and the group's nice is not below 0 to begin with. It goes to
  19, the weakest, not +10: see the slice below.
- Every thread's nice +BACKLOG_NICE (the broker and store adapters run worker threads):
  what counts where there are no autogroups (a CPU cgroup per service, or autogroups off).
  Raising nice is always allowed, but lowering it back needs CAP_SYS_NICE or an
  RLIMIT_NICE that permits the old value (e.g. systemd `LimitNICE=+0`, or `ulimit -e 20`).
  Without either it is not used: a channel niced for good would stay slow after it caught
  up.
- SCHED_BATCH on every thread: the weak one (the thread is treated as CPU-bound and does
  not preempt others on wake-up), which any unprivileged process may set and clear.
- A long time slice (BACKLOG_SLICE_NS) on every thread, with sched_setattr's sched_runtime
  (kernel 6.12+, EEVDF; unprivileged; older kernels ignore it). A neighbour's message crosses
  several processes that each run for a millisecond or so; EEVDF gives a group its fair
  share whenever it holds the earliest virtual deadline, and once running it keeps the core
  until the next tick (4 ms at HZ=250) unless a task wakes. So a draining group picked
  between two hops of a neighbour's chain delays it by up to a tick (seen in a kernel trace).
  A long slice puts its deadline far out, so it runs when the others have nothing to run.
  bench.sched_chain measures it (four processes doing 1 ms of work each, a busy loop per
  core; round trips more than 1.5 ms late, of 700): 2 / 11 / 9 at this priority, 6 / 22 / 18
  at nice +10 with the default slice, 4 / 3 / 7 with no busy loop.

Other platforms: nothing is changed.

What else a backlog changes, the process's write waits and its outbound prefetch, is
`apply_backlog`, which the process gives BacklogPriority as `on_change`.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import platform
import resource
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

    from channel_proc.outbound import OutboundActor
    from ipc.broker import Broker
    from ipc.state import StateStore

log = logging.getLogger(__name__)

#: Outbound queue depth (ready messages) from which the process lowers its priority...
BACKLOG_HIGH: Final = 1000
#: ...and at or below which it restores it.
BACKLOG_LOW: Final = 100
#: How much nicer the process's threads get while it has a backlog...
BACKLOG_NICE: Final = 10
#: ...the nice its autogroup takes (the weakest)...
BACKLOG_GROUP_NICE: Final = 19
#: ...and its threads' time slice, in ns (the kernel's maximum; 0 is the kernel's default).
BACKLOG_SLICE_NS: Final = 100_000_000
#: Seconds its store writes then wait for others to commit with (apply_backlog), and its
#: queue writes too when its transport's answered sends wait for them in the window...
BACKLOG_WRITE_LINGER: Final = 0.010
#: ...and its queue writes (event publishes, acks) when they are out of the window: each
#: publish syncs the queue file, and the disk's flushes are what the other channels' durable
#: accepts wait for (measured: its extra flushes fell from 33-58 to 12-17/s).
BACKLOG_QUEUE_LINGER: Final = 0.050
#: CAP_SYS_NICE's bit in /proc/self/status CapEff.
CAP_SYS_NICE: Final = 23

SCHED_SUPPORTED: Final = hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH")
#: sched_setattr's number by machine (the os module has no binding for it: a C call, here).
SCHED_SETATTR_NR: Final = {"x86_64": 314, "aarch64": 274, "i686": 351, "armv7l": 380}
#: struct sched_attr up to sched_period (SCHED_ATTR_SIZE_VER0): size, policy, flags, nice,
#: priority, runtime, deadline, period.
SCHED_ATTR: Final = struct.Struct("IIQiIQQQ")
#: The process's autogroup: reads "/autogroup-N nice K", takes a nice (sched(7)).
AUTOGROUP: Final = Path("/proc/self/autogroup")


def thread_ids() -> list[int]:
    """This process's threads (Linux: /proc/self/task); just the process elsewhere."""
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _sched_setattr() -> Callable[..., int] | None:
    number = SCHED_SETATTR_NR.get(platform.machine())
    if not sys.platform.startswith("linux") or number is None:
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    return lambda tid, attr: int(syscall(number, tid, attr, 0))


_SYSCALL = _sched_setattr()


def set_slice(tid: int, slice_ns: int) -> bool:
    """Sets thread `tid`'s time slice (0: the kernel's default), keeping its policy and nice
    (sched_setattr sets all three; the same nice needs no privilege). False where it failed
    or there is no such call."""
    if _SYSCALL is None:
        return False
    try:
        policy = os.sched_getscheduler(tid)
        nice = os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return False
    attr = ctypes.create_string_buffer(
        SCHED_ATTR.pack(SCHED_ATTR.size, policy, 0, nice, 0, slice_ns, 0, 0), SCHED_ATTR.size
    )
    if _SYSCALL(tid, attr) != 0:
        log.debug("slice %d ns not set on %d: errno %d", slice_ns, tid, ctypes.get_errno())
        return False
    return True


def has_cap_sys_nice() -> bool:
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return False


def can_restore_nice(nice: int) -> bool:
    """Whether this process may set its nice back down to `nice` once raised."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    # RLIMIT_NICE is expressed as 20 - nice (see setrlimit(2)).
    return has_cap_sys_nice() or soft == resource.RLIM_INFINITY or 20 - nice <= soft


def own_autogroup_nice() -> int | None:
    """The nice of this process's autogroup when it is the process's own to change (it leads
    its session, and the nice is not below 0: that could not be set back), else None."""
    if not hasattr(os, "getsid") or os.getsid(0) != os.getpid():
        return None
    try:
        fields = AUTOGROUP.read_text().split()
        nice = int(fields[fields.index("nice") + 1])
    except (OSError, ValueError, IndexError):
        return None
    return nice if nice >= 0 or has_cap_sys_nice() else None


def set_autogroup_nice(nice: int) -> bool:
    """False when the kernel refused: it allows one change per 100 ms on the whole machine to
    an unprivileged process (EAGAIN), so the caller tries again later."""
    try:
        AUTOGROUP.write_text(str(nice))
    except OSError as exc:
        log.debug("autogroup nice %d not set: %s", nice, exc)
        return False
    return True


class Level(enum.Enum):
    NORMAL = "normal"
    BACKLOG = "backlog"


@dataclass
class ProcessPriority:
    """The process's CPU priority: NORMAL (as started) or BACKLOG (lowered)."""

    base_nice: int = field(default_factory=lambda: os.getpriority(os.PRIO_PROCESS, 0))
    backlog_nice: int = BACKLOG_NICE
    backlog_group_nice: int = BACKLOG_GROUP_NICE
    use_nice: bool | None = None
    #: The autogroup's nice as found; None: the autogroup is left alone.
    base_group_nice: int | None = field(default_factory=own_autogroup_nice)
    level: Level = Level.NORMAL
    #: The autogroup nice the kernel refused for now (rate limit), to set at the next retry().
    pending_group_nice: int | None = None

    def __post_init__(self) -> None:
        if self.use_nice is None:
            self.use_nice = can_restore_nice(self.base_nice)

    def lower(self) -> None:
        self._apply(min(19, self.base_nice + self.backlog_nice), batch=True)
        if self.base_group_nice is not None:
            self._set_group(max(self.base_group_nice, self.backlog_group_nice))
        self.level = Level.BACKLOG

    def restore(self) -> None:
        self._apply(self.base_nice, batch=False)
        if self.base_group_nice is not None:
            self._set_group(self.base_group_nice)
        self.level = Level.NORMAL

    def retry(self) -> None:
        """Sets the autogroup nice the kernel refused last time, if any."""
        if self.pending_group_nice is not None:
            self._set_group(self.pending_group_nice)

    def _set_group(self, nice: int) -> None:
        self.pending_group_nice = None if set_autogroup_nice(nice) else nice

    def _apply(self, nice: int, *, batch: bool) -> None:
        policy = os.SCHED_BATCH if batch else os.SCHED_OTHER
        for tid in thread_ids():
            # A thread may end between listing and changing it; one we may not change (it
            # was given a higher priority from outside) is left as it is.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if self.use_nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                if SCHED_SUPPORTED:
                    os.sched_setscheduler(tid, policy, os.sched_param(0))
                # After the policy and nice, which it keeps.
                set_slice(tid, BACKLOG_SLICE_NS if batch else 0)


@dataclass
class BacklogPriority:
    """Sets `priority` (the only setter) from each outbound queue depth it is told of: the
    runtime snapshots (channel_proc.metrics) read the depth every QUEUES_INTERVAL anyway."""

    priority: ProcessPriority = field(default_factory=ProcessPriority)
    high: int = BACKLOG_HIGH
    low: int = BACKLOG_LOW
    #: Told True when the backlog starts, False when it is over.
    on_change: Callable[[bool], None] | None = None

    def update(self, depth: int) -> None:
        priority = self.priority
        priority.retry()
        if priority.level is Level.NORMAL and depth > self.high:
            priority.lower()
            if self.on_change is not None:
                self.on_change(True)
            how = f"nice +{priority.backlog_nice}, " if priority.use_nice else ""
            if priority.base_group_nice is not None:
                how = f"its autogroup's nice {priority.backlog_group_nice}, {how}"
            log.info(
                "outbound backlog of %d: lowering this channel's CPU priority (%sSCHED_BATCH,"
                " long time slice)"
                " so that other channels keep their latency",
                depth,
                how,
            )
            if not priority.use_nice:
                log.info(
                    "not changing its threads' nice: setting it back needs CAP_SYS_NICE or "
                    "RLIMIT_NICE (e.g. systemd LimitNICE=+0)"
                )
        elif priority.level is Level.BACKLOG and depth <= self.low:
            priority.restore()
            if self.on_change is not None:
                self.on_change(False)
            log.info("outbound backlog down to %d: CPU priority restored", depth)

    async def run(self) -> None:
        """Until cancelled; the priority is restored on the way out."""
        try:
            await trio.sleep_forever()
        finally:
            if self.priority.level is Level.BACKLOG:
                self.priority.restore()


def apply_backlog(
    store: StateStore, broker: Broker, outbound: OutboundActor, backlog: bool
) -> None:
    """What else a backlog changes (BacklogPriority's `on_change`): while it drains, the
    process's writes wait for others to commit with, so the store's write lock (which every
    process shares) is taken a few hundred times a second instead of thousands, and the queue
    file is synced less often. Its queue writes wait longer (BACKLOG_QUEUE_LINGER) when the
    transport's answered sends leave the window before their event and ack, and the outbound
    consumer then holds more of them (OutboundActor.set_backlog)."""
    store.set_write_linger(BACKLOG_WRITE_LINGER if backlog else 0.0)
    queue_linger = BACKLOG_QUEUE_LINGER if outbound.answered_leave_window else BACKLOG_WRITE_LINGER
    broker.set_write_linger(queue_linger if backlog else 0.0)
    outbound.set_backlog(backlog)
