"""Backlog priority (channel_proc/priority.py) in a real child process on a real broker.

The child watches a queue with small thresholds; the test publishes past the high one and
reads the child's threads' nice, scheduling policy and time slice and its autogroup's nice
from /proc,
then drains the queue and sees them come back. Run as an unprivileged user, the child
changes only what it could change back; a child that does not lead its session leaves the
autogroup (its caller's whole session) alone.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import trio

from channel_proc.priority import BACKLOG_GROUP_NICE, BACKLOG_NICE, BACKLOG_SLICE_NS
from ipc.broker import open_broker
from ipc.settings import SETTINGS_ENV

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.settings import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduling only"),
]

REPO: Final = Path(__file__).resolve().parents[2]
SCHED_OTHER: Final = 0
SCHED_BATCH: Final = 3
HIGH: Final = 5
LOW: Final = 1
#: Custom time slices (sched_setattr's sched_runtime for SCHED_OTHER/BATCH) came with 6.12;
#: older kernels take and ignore it.
CUSTOM_SLICES: Final = tuple(map(int, os.uname().release.split(".")[:2])) >= (6, 12)

WATCHER: Final = textwrap.dedent(
    f"""
    import sys, threading, trio
    from channel_proc.priority import BacklogPriority
    from ipc.broker import open_broker
    from ipc.settings import Settings

    async def main(queue):
        async with open_broker(Settings.from_env()) as broker:
            await broker.declare_queue(queue)
            watch = BacklogPriority(
                high={HIGH}, low={LOW}, on_change=lambda on: print("backlog", on, flush=True)
            )

            async def tell_depth():
                # As the channel's runtime snapshots do, faster.
                while True:
                    watch.update(await broker.queue_length(queue))
                    await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.run)
                nursery.start_soon(tell_depth)
                # A thread started before the change must be changed too.
                await trio.to_thread.run_sync(lambda: None)
                print("ready", flush=True)
                await trio.to_thread.run_sync(sys.stdin.read)
                nursery.cancel_scope.cancel()

    trio.run(main, sys.argv[1])
    """
)

#: Lowers then restores the priority; prints the main thread's nice and policy and the
#: autogroup's nice after each. With arguments (RLIMIT_NICE, uid, gid) it first becomes that
#: user with that limit (done here, after Python has started: the interpreter may live where
#: the user may not read).
FLIP: Final = textwrap.dedent(
    """
    import ctypes, json, os, resource, sys, time
    from channel_proc.priority import ProcessPriority

    if len(sys.argv) > 1:
        limit, uid, gid = map(int, sys.argv[1:])
        try:
            resource.setrlimit(resource.RLIMIT_NICE, (limit, limit))
        except ValueError as exc:  # no CAP_SYS_RESOURCE to raise the hard limit
            print(json.dumps({"skip": f"RLIMIT_NICE {limit}: {exc}"}))
            sys.exit()
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        # Changing uid made the process undumpable, which gives /proc/self to root; a
        # process started as that user is dumpable.
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE

    def group_nice():
        try:
            fields = open("/proc/self/autogroup").read().split()
        except OSError:
            return None
        # Empty in the root group (a session that pid 1 never left, as under a CI runner).
        return int(fields[fields.index("nice") + 1]) if "nice" in fields else None

    def slice_ns():
        # /proc/PID/sched: kernels with EEVDF (6.6+) and CONFIG_SCHED_DEBUG.
        try:
            lines = open("/proc/self/sched").read().splitlines()
        except OSError:
            return None
        return next((int(l.split()[-1]) for l in lines if l.startswith("se.slice")), None)

    def state():
        nice, policy = os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)
        return nice, policy, group_nice(), slice_ns()

    priority = ProcessPriority()
    before = state()
    priority.lower()
    lowered = state()
    priority.restore()
    # Unprivileged, the kernel takes one autogroup change per 100 ms: the channel's next
    # depth reading retries, as this does.
    deadline = time.monotonic() + 5
    while priority.pending_group_nice is not None and time.monotonic() < deadline:
        time.sleep(0.05)
        priority.retry()
    print(json.dumps([before, lowered, state(), priority.use_nice, priority.base_group_nice]))
    """
)


def group_nice(pid: int | str = "self") -> int | None:
    """The nice of `pid`'s autogroup; None without one: a kernel built without autogroups (no
    file), or a process in the root group (an empty file: pid 1's session and every process
    that never left it, which is where a CI runner may run the tests)."""
    try:
        fields = Path(f"/proc/{pid}/autogroup").read_text().split()
    except OSError:
        return None
    return int(fields[fields.index("nice") + 1]) if "nice" in fields else None


def slice_ns(task: Path) -> int | None:
    """The thread's time slice, from its sched file (kernels with EEVDF, 6.6+, and
    CONFIG_SCHED_DEBUG); None where there is none."""
    try:
        lines = (task / "sched").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[-1]) for line in lines if line.startswith("se.slice")), None)


def thread_states(pid: int) -> set[tuple[int, int]]:
    """{(nice, policy)} over the process's threads, from /proc/PID/task/TID/stat."""
    states = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # Fields 19 (nice) and 41 (policy) of proc(5), counted after "pid (comm)".
        states.add((int(fields[16]), int(fields[38])))
    return states


def thread_slices(pid: int) -> set[int | None]:
    return {slice_ns(task) for task in Path(f"/proc/{pid}/task").iterdir()}


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    async with open_broker(settings) as opened:
        yield opened


async def wait_for_states(pid: int, expected: set[tuple[int, int]]) -> None:
    # The child changes its priority on its own clock; /proc is all there is to watch.
    with trio.fail_after(10):
        while True:
            if thread_states(pid) == expected:
                return
            await trio.sleep(0.02)


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> None:
    output = b""
    with trio.fail_after(30):
        while marker not in output:
            chunk = await stream.receive_some()
            assert chunk, f"child exited early: {output!r}"
            output += chunk


async def drain(broker: Broker, queue: str, count: int) -> None:
    # Prefetch 1: RabbitMQ delivers the next message as each is acked, so the queue's ready
    # count dips by at most one below what is left until the consumer is gone.
    async with broker.consume(queue, prefetch=1) as consumer:
        for _ in range(count):
            with trio.fail_after(10):
                await consumer.ack(await consumer.receive())


async def test_backlog_lowers_every_threads_priority_and_restores_it(
    settings: Settings, broker: Broker, namespace: Namespace, tmp_path: Path
) -> None:
    queue = namespace.queue("priority")
    script = tmp_path / "watcher.py"
    script.write_text(WATCHER)
    env = {**os.environ, SETTINGS_ENV: settings.to_env(), "PYTHONPATH": str(REPO)}
    # In a session of its own, as the supervisor starts a channel: an autogroup of its own.
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script), queue],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    base = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        assert proc.stdout is not None
        await read_until(proc.stdout, b"ready")
        normal = {(base, SCHED_OTHER)}
        assert thread_states(proc.pid) == normal
        default_slices = thread_slices(proc.pid)
        assert BACKLOG_SLICE_NS not in default_slices
        slices = CUSTOM_SLICES and None not in default_slices
        grouped = group_nice(proc.pid) is not None
        if grouped:
            assert group_nice(proc.pid) == 0

        for n in range(HIGH):
            await broker.publish(queue, b"%d" % n)
        # At the threshold, not past it: nothing changes.
        await trio.sleep(0.2)
        assert thread_states(proc.pid) == normal

        await broker.publish(queue, b"one more")
        await wait_for_states(proc.pid, {(base + BACKLOG_NICE, SCHED_BATCH)})
        # Its owner hears of it (the channel process makes its writes linger).
        await read_until(proc.stdout, b"backlog True")
        if grouped:
            assert group_nice(proc.pid) == BACKLOG_GROUP_NICE
        if slices:
            assert thread_slices(proc.pid) == {BACKLOG_SLICE_NS}

        # Down to LOW + 2 (LOW + 1 while drain's next delivery is in flight): still a
        # backlog (hysteresis).
        await drain(broker, queue, HIGH - LOW - 1)
        await trio.sleep(0.2)
        assert thread_states(proc.pid) == {(base + BACKLOG_NICE, SCHED_BATCH)}

        await drain(broker, queue, 2)
        await wait_for_states(proc.pid, normal)
        await read_until(proc.stdout, b"backlog False")
        if grouped:
            assert group_nice(proc.pid) == 0
        if slices:
            assert thread_slices(proc.pid) == default_slices
    finally:
        assert proc.stdin is not None
        await proc.stdin.aclose()
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await broker.delete_queue(queue)
    assert proc.returncode == 0


State = tuple[int, int, "int | None", "int | None"]


@dataclass
class Flip:
    """FLIP's report: (nice, policy, autogroup nice, time slice) before, lowered and after."""

    before: State
    lowered: State
    after: State
    used_nice: bool
    base_group_nice: int | None


def run_flip(*args: str, new_session: bool) -> Flip:
    result = subprocess.run(
        [sys.executable, "-c", FLIP, *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
        start_new_session=new_session,
    )
    report = json.loads(result.stdout)
    if "skip" in report:
        pytest.skip(report["skip"])
    before, lowered, after, used_nice, base_group_nice = report
    return Flip(tuple(before), tuple(lowered), tuple(after), used_nice, base_group_nice)


@pytest.mark.parametrize("new_session", [True, False], ids=["own session", "caller's session"])
def test_lowering_is_undone_in_process(new_session: bool) -> None:
    """The same process, directly: lower() then restore() (as the process is run here)."""
    ours = group_nice()
    flip = run_flip(new_session=new_session)
    assert flip.before == flip.after
    nice, policy, group, slice_ns = flip.lowered
    assert policy == SCHED_BATCH
    assert nice == (flip.before[0] + BACKLOG_NICE if flip.used_nice else flip.before[0])
    if CUSTOM_SLICES and slice_ns is not None:
        assert slice_ns == BACKLOG_SLICE_NS != flip.before[3]
    if flip.before[2] is None:  # no autogroup: a kernel without them, or the root group
        assert flip.base_group_nice is None
    elif new_session:
        assert flip.base_group_nice == flip.before[2] == 0
        assert group == BACKLOG_GROUP_NICE
    else:
        # Its autogroup is this test's whole session: not its to change.
        assert flip.base_group_nice is None
        assert group == flip.before[2]
    assert group_nice() == ours


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become an unprivileged user")
@pytest.mark.parametrize(
    ("nice_limit", "uses_nice"),
    [
        # RLIMIT_NICE 0 (the usual default): nice could not be set back, so only the policy.
        (0, False),
        # RLIMIT_NICE 20 lets it return to nice 0 (systemd LimitNICE=+0): both.
        (20, True),
    ],
)
def test_unprivileged_process_changes_only_what_it_can_undo(
    nice_limit: int, uses_nice: bool
) -> None:
    nobody = pwd.getpwnam("nobody")
    ids = (str(nice_limit), str(nobody.pw_uid), str(nobody.pw_gid))
    flip = run_flip(*ids, new_session=True)
    assert flip.used_nice is uses_nice
    grouped = flip.before[2] is not None
    default_slice = flip.before[3]
    # Its autogroup's nice it may always set back to 0, whatever its RLIMIT_NICE, and its
    # time slice to the default.
    assert flip.before == flip.after == (0, SCHED_OTHER, 0 if grouped else None, default_slice)
    lowered_group = BACKLOG_GROUP_NICE if grouped else None
    lowered_slice = BACKLOG_SLICE_NS if CUSTOM_SLICES and default_slice else default_slice
    assert flip.lowered == (
        (BACKLOG_NICE if uses_nice else 0),
        SCHED_BATCH,
        lowered_group,
        lowered_slice,
    )
