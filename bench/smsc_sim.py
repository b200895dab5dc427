"""A fast SMSC simulator for load benchmarks (not a test fake: it checks little, counts much).

It accepts any bind, answers each submit_sm at once with a fresh decimal id, follows it
with a delivery receipt (deliver_sm, esm_class 4) when registered_delivery asks for one,
and can flood deliver_sm (MO) with up to `mo_window` unanswered at a time. PDUs are framed
and built with `struct` over fixed layouts so the simulator stays cheap next to the
gateway it measures; tests/fakes/fake_smsc.py is the faithful one.

`SimulatorProcess` runs one in its own OS process (`python -m bench.smsc_sim`), so that a
simulator answering hundreds of submit_sm a second does not share a trio loop (and a core's
time slice) with what the benchmark measures; the far end is not the gateway.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

HEADER: Final = struct.Struct(">LLLL")
BIND_TRANSCEIVER: Final = 0x00000009
BIND_TRANSMITTER: Final = 0x00000002
BIND_RECEIVER: Final = 0x00000001
BINDS: Final = frozenset({BIND_TRANSCEIVER, BIND_TRANSMITTER, BIND_RECEIVER})
SUBMIT_SM: Final = 0x00000004
DELIVER_SM: Final = 0x00000005
UNBIND: Final = 0x00000006
ENQUIRE_LINK: Final = 0x00000015
GENERIC_NACK: Final = 0x80000000
DELIVER_SM_RESP: Final = 0x80000005
RESPONSE_BIT: Final = 0x80000000
ESME_RINVCMDID: Final = 0x00000003
RECEIVE_SIZE: Final = 262144


def _cstring(body: bytes, offset: int) -> tuple[bytes, int]:
    end = body.index(b"\0", offset)
    return body[offset:end], end + 1


def parse_submit(body: bytes) -> tuple[bytes, bytes, int]:
    """(destination_addr, short_message, registered_delivery) of a submit_sm body."""
    _, at = _cstring(body, 0)  # service_type
    _, at = _cstring(body, at + 2)  # source_addr after its ton/npi
    destination, at = _cstring(body, at + 2)
    at += 3  # esm_class, protocol_id, priority_flag
    _, at = _cstring(body, at)  # schedule_delivery_time
    _, at = _cstring(body, at)  # validity_period
    registered = body[at]
    sm_length = body[at + 4]
    short_message = body[at + 5 : at + 5 + sm_length]
    return destination, short_message, registered


def deliver_sm(sequence: int, source: bytes, destination: bytes, text: bytes, esm: int) -> bytes:
    """A deliver_sm PDU (GSM default alphabet, data_coding 0) with `text` as short_message."""
    body = b"".join(
        (
            b"\0",  # service_type
            b"\x01\x01",
            source,
            b"\0",
            b"\x01\x01",
            destination,
            b"\0",
            bytes((esm, 0, 0)),  # esm_class, protocol_id, priority_flag
            b"\0\0",  # schedule_delivery_time, validity_period
            bytes((0, 0, 0, 0, len(text))),  # registered, replace, coding, default id, length
            text,
        )
    )
    return HEADER.pack(16 + len(body), DELIVER_SM, 0, sequence) + body


def receipt_text(smsc_id: str) -> bytes:
    return (
        f"id:{smsc_id} sub:001 dlvrd:001 submit date:2401011200 done date:2401011201"
        " stat:DELIVRD err:000 text:"
    ).encode()


@dataclass
class SimStats:
    """What the simulator saw; times are time.perf_counter()."""

    binds: int = 0
    submits: int = 0
    first_submit: float = 0.0
    last_submit: float = 0.0
    #: short_message -> times seen (duplicates show resends).
    contents: Counter[bytes] = field(default_factory=Counter)
    receipts_sent: int = 0
    mo_sent: int = 0
    mo_acked: int = 0
    first_mo: float = 0.0
    last_mo_ack: float = 0.0
    changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def reset(self) -> None:
        self.submits = self.receipts_sent = self.mo_sent = self.mo_acked = 0
        self.first_submit = self.last_submit = self.first_mo = self.last_mo_ack = 0.0
        self.contents.clear()


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.receives = False
        self.out = bytearray()
        self.wake = trio.Event()
        self.closed = False
        self.mo_room: trio.Semaphore | None = None

    def queue(self, data: bytes) -> None:
        self.out += data
        self.wake.set()


class SmscSimulator:
    """Serve on 127.0.0.1; read `stats`; `flood_mo` sends MO traffic to the latest receiver."""

    def __init__(self, *, receipts: bool = True, mo_window: int = 100, timed: bool = False) -> None:
        self.receipts = receipts
        self.mo_window = mo_window
        self.timed = timed
        self.stats = SimStats()
        #: With `timed`: short_message -> when first submitted (time.perf_counter()).
        self.submitted_at: dict[bytes, float] = {}
        self.port = 0
        self._ids = 0
        self._sequence = 0
        self._receivers: list[_Connection] = []

    def _next_sequence(self) -> int:
        self._sequence = self._sequence % 0x7FFFFFFF + 1
        return self._sequence

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve_connection, listeners)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = _Connection(stream)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn)
                await self._reader(conn)
                nursery.cancel_scope.cancel()
        finally:
            conn.closed = True
            if conn in self._receivers:
                self._receivers.remove(conn)
            await stream.aclose()

    async def _writer(self, conn: _Connection) -> None:
        # One write per batch of queued PDUs: the gateway reads them as they come.
        while True:
            if not conn.out:
                conn.wake = trio.Event()
                await conn.wake.wait()
            data, conn.out = bytes(conn.out), bytearray()
            try:
                await conn.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                conn.closed = True
                return

    async def _reader(self, conn: _Connection) -> None:
        buffer = bytearray()
        while True:
            try:
                data = await conn.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            buffer += data
            start = 0
            while len(buffer) - start >= 16:
                length, command, status, sequence = HEADER.unpack_from(buffer, start)
                if len(buffer) - start < length:
                    break
                body = bytes(buffer[start + 16 : start + length])
                start += length
                if self._handle(conn, command, status, sequence, body):
                    del buffer[:start]
                    return
            del buffer[:start]

    def _handle(self, conn: _Connection, command: int, status: int, seq: int, body: bytes) -> bool:
        """Answer one PDU; True when the connection is to be closed."""
        stats = self.stats
        if command == SUBMIT_SM:
            now = time.perf_counter()
            if not stats.submits:
                stats.first_submit = now
            stats.submits += 1
            stats.last_submit = now
            destination, text, registered = parse_submit(body)
            stats.contents[text] += 1
            if self.timed:
                self.submitted_at.setdefault(text, now)
            self._ids += 1
            smsc_id = str(self._ids)
            conn.queue(
                HEADER.pack(16 + len(smsc_id) + 1, SUBMIT_SM | RESPONSE_BIT, 0, seq)
                + smsc_id.encode()
                + b"\0"
            )
            if self.receipts and registered & 1:
                stats.receipts_sent += 1
                target = self._receivers[-1] if self._receivers else conn
                target.queue(
                    deliver_sm(
                        self._next_sequence(), destination, b"12345", receipt_text(smsc_id), 4
                    )
                )
            stats.notify()
        elif command == DELIVER_SM_RESP:
            stats.mo_acked += 1
            stats.last_mo_ack = time.perf_counter()
            if conn.mo_room is not None:
                conn.mo_room.release()
            stats.notify()
        elif command in BINDS:
            stats.binds += 1
            if command != BIND_TRANSMITTER:
                conn.receives = True
                conn.mo_room = trio.Semaphore(self.mo_window)
                self._receivers.append(conn)
            conn.queue(HEADER.pack(16 + 4, command | RESPONSE_BIT, 0, seq) + b"sim\0")
            stats.notify()
        elif command == ENQUIRE_LINK:
            conn.queue(HEADER.pack(16, ENQUIRE_LINK | RESPONSE_BIT, 0, seq))
        elif command == UNBIND:
            conn.queue(HEADER.pack(16, UNBIND | RESPONSE_BIT, 0, seq))
            return True
        elif not command & RESPONSE_BIT:
            conn.queue(HEADER.pack(16, GENERIC_NACK, ESME_RINVCMDID, seq))
        return False

    async def flood_mo(self, count: int, *, source_base: int = 27830000000) -> None:
        """Send `count` deliver_sm to the latest receiving bind, `mo_window` unanswered at most."""
        if not self._receivers:
            raise RuntimeError("no receiving bind to send MO traffic to")
        conn = self._receivers[-1]
        assert conn.mo_room is not None
        stats = self.stats
        stats.first_mo = time.perf_counter()
        for n in range(count):
            await conn.mo_room.acquire()
            if conn.closed:
                raise RuntimeError("the receiving bind closed during the MO flood")
            source = str(source_base + n).encode()
            conn.queue(deliver_sm(self._next_sequence(), source, b"12345", b"mo %d" % n, 0))
            stats.mo_sent += 1

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Until `condition()` holds after a change (the caller bounds it)."""
        while not condition():
            await self.stats.changed.wait()


# --- the simulator in its own process -------------------------------------------------------
#
# The parent talks to the child over its stdin/stdout, one JSON line each way per request.
# Times cross the boundary as time.perf_counter() values: on Linux that is CLOCK_MONOTONIC,
# one clock for every process on the machine. Short messages cross as latin-1 text (bytes
# 0-255 round-trip exactly).

STATS_FIELDS: Final = ("binds", "submits", "first_submit", "last_submit", "receipts_sent")
POLL_INTERVAL: Final = 0.05


def _answer(sim: SmscSimulator, command: str) -> object:
    stats = sim.stats
    if command == "stats":
        return {name: getattr(stats, name) for name in STATS_FIELDS}
    if command == "contents":
        return {text.decode("latin-1"): n for text, n in stats.contents.items()}
    if command == "submitted_at":
        return {text.decode("latin-1"): at for text, at in sim.submitted_at.items()}
    if command == "reset":
        stats.reset()
        sim.submitted_at.clear()
        return {}
    return {"error": f"unknown command {command!r}"}


async def _serve_child(receipts: bool, timed: bool) -> None:
    """The child's side: serve, print the port, answer requests until stdin closes."""
    sim = SmscSimulator(receipts=receipts, timed=timed)
    async with (
        trio.open_nursery() as nursery,
        trio.lowlevel.FdStream(os.dup(0)) as stdin,
        trio.lowlevel.FdStream(os.dup(1)) as stdout,
    ):
        await nursery.start(sim.serve)
        await stdout.send_all(b"%d\n" % sim.port)
        buffer = b""
        while True:
            data = await stdin.receive_some(65536)
            if not data:
                # The parent is gone (or done with us): no orphan simulators.
                nursery.cancel_scope.cancel()
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                reply = _answer(sim, line.decode().strip())
                await stdout.send_all(json.dumps(reply).encode() + b"\n")


class SimulatorProcess:
    """An `SmscSimulator` in a child process; `stats()` and friends ask it over a pipe.

    `nursery.start(sim.serve)` returns once it listens (`port` is set); cancelling `serve`
    ends the child. MO floods are not offered: the benchmarks that flood MO (bench.smpp_load)
    keep the in-process simulator.
    """

    def __init__(self, *, receipts: bool = True, timed: bool = False) -> None:
        self.receipts = receipts
        self.timed = timed
        self.port = 0
        self.pid = 0
        self._process: trio.Process | None = None
        self._lines = b""
        self._lock = trio.Lock()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        command = [sys.executable, "-m", "bench.smsc_sim"]
        if not self.receipts:
            command.append("--no-receipts")
        if self.timed:
            command.append("--timed")
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            self._process = process
            self.pid = process.pid
            self.port = int(await self._read_line())
            task_status.started()
            await process.wait()
            raise RuntimeError(f"the SMSC simulator exited with {process.returncode}")
        finally:
            # Closing its stdin tells the child to exit; kill it if it does not at once.
            with trio.CancelScope(shield=True):
                if process.stdin is not None:
                    await process.stdin.aclose()
                with trio.move_on_after(2):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    def _pipes(self) -> tuple[trio.abc.SendStream, trio.abc.ReceiveStream]:
        process = self._process
        if process is None or process.stdin is None or process.stdout is None:
            raise RuntimeError("the SMSC simulator is not running")
        return process.stdin, process.stdout

    async def _read_line(self) -> bytes:
        _, stdout = self._pipes()
        while b"\n" not in self._lines:
            data = await stdout.receive_some(1 << 20)
            if not data:
                raise RuntimeError("the SMSC simulator closed its output")
            self._lines += data
        line, self._lines = self._lines.split(b"\n", 1)
        return line

    async def _request(self, command: str) -> Any:
        async with self._lock:
            stdin, _ = self._pipes()
            await stdin.send_all(command.encode() + b"\n")
            return json.loads(await self._read_line())

    async def stats(self) -> SimStats:
        """A snapshot of the counters (without `contents`: ask `contents()`)."""
        values = await self._request("stats")
        stats = SimStats()
        for name in STATS_FIELDS:
            setattr(stats, name, values[name])
        return stats

    async def contents(self) -> Counter[bytes]:
        values: dict[str, int] = await self._request("contents")
        return Counter({text.encode("latin-1"): n for text, n in values.items()})

    async def submitted_at(self) -> dict[bytes, float]:
        """short_message -> first submit_sm (time.perf_counter()); needs `timed`."""
        values: dict[str, float] = await self._request("submitted_at")
        return {text.encode("latin-1"): at for text, at in values.items()}

    async def reset(self) -> None:
        await self._request("reset")

    async def wait_until(self, condition: Callable[[SimStats], bool]) -> SimStats:
        """Poll until `condition(stats)` holds (the caller bounds it); the last snapshot."""
        while True:
            stats = await self.stats()
            if condition(stats):
                return stats
            await trio.sleep(POLL_INTERVAL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.smsc_sim",
        description="serve the SMSC simulator on 127.0.0.1 (port on stdout); "
        "requests on stdin; used by SimulatorProcess",
    )
    parser.add_argument("--no-receipts", action="store_true")
    parser.add_argument("--timed", action="store_true", help="note when each text is submitted")
    args = parser.parse_args(argv)
    trio.run(_serve_child, not args.no_receipts, args.timed)


if __name__ == "__main__":
    main()
