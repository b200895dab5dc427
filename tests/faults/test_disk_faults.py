"""Fault 3 for the embedded backend: its disk fills up, or its files become read-only.

Disk full is real: the gateway runs in a private mount namespace (unshare) with its data
dir on a small tmpfs, which the test fills through /proc/PID/root. Read-only is the
database and WAL files made immutable with `chattr +i` (root ignores file modes, not that
flag); the -shm files are left alone, since SQLite maps them and a write to an immutable
mapping is a SIGBUS, not an error. While the disk refuses writes the API answers 503 in
bounded time and nothing accepted is lost; once it takes writes again everything resumes.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

import httpx
import pytest
import trio

from tests.e2e.gateway import ROOT, WAIT, Gateway, cli_args, free_port, wait_for
from tests.fakes.fake_smsc import SubmitAnswer
from tests.fakes.webhook import open_fake_webhook
from tests.faults.harness import (
    create_smpp_channel,
    mo_contents,
    open_sender,
    open_timed_smsc,
    submit_counts,
    wait_all_events,
    wait_all_submitted,
    wait_smpp_bound,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from ipc.settings import Settings
    from tests.fakes.webhook import FakeWebhook
    from tests.faults.harness import Sender, TimedSmsc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE: Final = 10.0
TMPFS_SIZE: Final = "64m"
#: Every refused request must be answered within this (SQLite's busy timeout is 5 s).
BOUND: Final = 8.0
#: How long each fault lasts once the API refuses sends: long enough for the channel
#: process to hit it too.
HOLD: Final = 3.0


class TmpfsGateway(Gateway):
    """The supervisor in its own mount namespace, its data dir a tmpfs of TMPFS_SIZE."""

    async def start(self) -> None:
        assert self.process is None
        self.log_path = Path(self.settings.logging_path).parent / "supervisor.out"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        # unshare execs (no fork), and so does the shell: the pid is the supervisor's.
        script = 'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"'
        # fmt: off
        argv = [
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", script, "sh", TMPFS_SIZE, str(data_dir),
            sys.executable, "-m", "supervisor",
            *cli_args(self.settings, self.port), *self.extra_args,
        ]
        # fmt: on
        with self.log_path.open("ab") as out:
            self.process = await trio.lowlevel.open_process(
                argv, stdout=out, stderr=out, env={**os.environ, "PYTHONPATH": str(ROOT)}
            )

        async def healthy() -> bool:
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"supervisor exited early:\n{self.output()}")
            try:
                async with httpx.AsyncClient() as client:
                    response = await client.get(f"{self.base_url}/health", timeout=2)
            except httpx.TransportError:
                return False
            return response.status_code == 200

        with trio.fail_after(60):
            await wait_for(healthy)

    def data_path(self) -> Path:
        """The data dir as the gateway sees it (its tmpfs), from our mount namespace."""
        assert self.process is not None
        return Path(f"/proc/{self.process.pid}/root{self.settings.data_dir}")


def _can_unshare_mounts() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.fixture
async def tmpfs_gateway(embedded_settings: Settings) -> AsyncIterator[TmpfsGateway]:
    if not _can_unshare_mounts():
        pytest.skip("needs `unshare --mount` and tmpfs mounts (root or CAP_SYS_ADMIN)")
    gateway = TmpfsGateway(embedded_settings, free_port())
    await gateway.start()
    try:
        yield gateway
    finally:
        if gateway.process is not None:
            assert await gateway.stop() == 0, gateway.output()


def fill(path: Path) -> int:
    """Write zeros to `path` until the file system is full; returns the bytes written."""
    written = 0
    # Unbuffered, so that ENOSPC comes from a write here and not from the close.
    with path.open("wb", buffering=0) as filler:
        for size in (1 << 20, 4096):
            chunk = bytes(size)
            try:
                while True:
                    written += filler.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return written


async def steady_until_refused(
    sender: Sender, stop: trio.Event, *, task_status: trio.TaskStatus[None]
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.steady, RATE, stop)
        task_status.started()


async def wait_refused(sender: Sender, description: tuple[str, ...]) -> None:
    """Until the API refuses sends, with 503 and one of the expected descriptions."""

    async def refused() -> bool:
        return len(sender.failures) >= 3

    with trio.fail_after(WAIT):
        await wait_for(refused)
    for failure in sender.failures:
        assert failure.status == 503, failure
        assert any(d in failure.detail for d in description), failure


async def mo_during_fault(smsc: TimedSmsc, content: str) -> bool:
    """An MO while the disk refuses writes; True if the channel acknowledged it (then it
    must reach the mo_url like any other)."""
    with trio.move_on_after(5):
        try:
            response = await smsc.send_deliver_sm(short_message=content.encode())
        except AssertionError:  # the fake's "no client is bound": the channel restarts
            return False
        return response.ok
    return False


async def wait_mo_delivered(hook: FakeWebhook, contents: list[str]) -> None:
    async def delivered() -> bool:
        return set(contents) <= mo_contents(hook)

    with trio.fail_after(WAIT):
        await wait_for(delivered)


def assert_bounded(sender: Sender) -> None:
    slowest = max(took for _, took in sender.timings)
    assert slowest < BOUND, f"a request took {slowest:.1f} s"


async def test_embedded_disk_full_then_freed(tmpfs_gateway: TmpfsGateway) -> None:
    gateway = tmpfs_gateway
    async with open_fake_webhook() as hook, open_timed_smsc() as smsc:
        # Answers come late, so events to store keep arriving during the fault.
        smsc.script_submits(*[SubmitAnswer(delay=0.5)] * 10_000)
        cid = await create_smpp_channel(gateway, smsc, hook)
        await wait_smpp_bound(gateway, cid)
        acknowledged: list[str] = []
        filler = gateway.data_path() / "filler"
        async with open_sender(gateway, cid, hook, "m") as sender:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(steady_until_refused, sender, stop)

                async def some_accepted() -> bool:
                    return len(sender.accepted) >= 10

                with trio.fail_after(WAIT):
                    await wait_for(some_accepted)
                try:
                    written = await trio.to_thread.run_sync(fill, filler)
                    await wait_refused(
                        sender, ("state store unavailable", "queue broker unavailable")
                    )
                    assert any("full" in f.detail for f in sender.failures), sender.failures[0]
                    if await mo_during_fault(smsc, "mo during the fault"):
                        acknowledged.append("mo during the fault")
                    # The fault's duration, not a synchronisation.
                    await trio.sleep(HOLD)
                finally:
                    await trio.to_thread.run_sync(filler.unlink)
                freed_at = trio.current_time()

                async def resumed() -> bool:
                    return sender.settled_since(freed_at)

                with trio.fail_after(60):
                    await wait_for(resumed)
                stop.set()
            with trio.fail_after(60):
                await wait_all_submitted(smsc, sender)
                await wait_all_events(hook, sender)
            await wait_mo_delivered(hook, acknowledged)
        print(
            f"filled {written >> 20} MiB; {len(sender.accepted)} accepted, "
            f"{len(sender.failures)} refused, slowest {max(t for _, t in sender.timings):.2f} s; "
            f"MO during the fault acknowledged: {bool(acknowledged)}"
        )
        assert_bounded(sender)
        assert min(submit_counts(smsc, sender).values()) >= 1


@pytest.fixture
def immutable(embedded_settings: Settings) -> Iterator[list[Path]]:
    """Files made immutable by the test; the flag is always taken off again (else pytest
    could not delete its temporary directory)."""
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr (e2fsprogs)")
    made: list[Path] = []
    yield made
    for path in made:
        if path.exists():
            subprocess.run(["chattr", "-i", str(path)], check=False)


async def test_embedded_files_read_only_then_writable(
    embedded_settings: Settings, immutable: list[Path]
) -> None:
    from tests.e2e.gateway import running_gateway

    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc,
        running_gateway(embedded_settings) as gateway,
    ):
        # Answers come late, so events to store keep arriving during the fault.
        smsc.script_submits(*[SubmitAnswer(delay=0.5)] * 10_000)
        cid = await create_smpp_channel(gateway, smsc, hook)
        await wait_smpp_bound(gateway, cid)
        acknowledged: list[str] = []
        # The state file and every queue file there is by now (one per queue owner).
        data_dir = embedded_settings.data_dir
        databases = [data_dir / "state.sqlite3", *sorted((data_dir / "queues").glob("*.sqlite3"))]
        files = [db.with_name(name) for db in databases for name in (db.name, f"{db.name}-wal")]
        async with open_sender(gateway, cid, hook, "m") as sender:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(steady_until_refused, sender, stop)

                async def some_accepted() -> bool:
                    return len(sender.accepted) >= 10

                with trio.fail_after(WAIT):
                    await wait_for(some_accepted)
                try:
                    for path in files:
                        immutable.append(path)
                        probe = await trio.run_process(
                            ["chattr", "+i", str(path)], check=False, capture_stderr=True
                        )
                        if probe.returncode != 0:
                            pytest.skip(f"chattr +i refused: {probe.stderr.decode().strip()}")
                    await wait_refused(
                        sender, ("state store unavailable", "queue broker unavailable")
                    )
                    if await mo_during_fault(smsc, "mo during the fault"):
                        acknowledged.append("mo during the fault")
                    # The fault's duration, not a synchronisation.
                    await trio.sleep(HOLD)
                finally:
                    for path in files:
                        await trio.run_process(["chattr", "-i", str(path)], check=False)
                writable_at = trio.current_time()

                async def resumed() -> bool:
                    return sender.settled_since(writable_at)

                with trio.fail_after(60):
                    await wait_for(resumed)
                stop.set()
            with trio.fail_after(60):
                await wait_all_submitted(smsc, sender)
                await wait_all_events(hook, sender)
            await wait_mo_delivered(hook, acknowledged)
        print(
            f"{len(sender.accepted)} accepted, {len(sender.failures)} refused, "
            f"slowest {max(t for _, t in sender.timings):.2f} s; "
            f"MO during the fault acknowledged: {bool(acknowledged)}"
        )
        assert_bounded(sender)
        assert min(submit_counts(smsc, sender).values()) >= 1
