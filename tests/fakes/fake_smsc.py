"""A fake SMSC (SMPP 3.4 server) on a real 127.0.0.1 socket, scripted per test.

It answers binds (checking the password when one is set), submit_sm (by default ROK
with a fresh id; or scripted statuses, delays, ids, or no answer), enquire_link (unless
told not to) and unbind; it sends deliver_sm (messages and receipts) and can drop
connections. Every PDU it receives is recorded. Like the other fakes, it checks at
teardown that every scripted answer was used.

It can also misbehave as a real SMSC does (fault scenario 6): close the connection in
the middle of a PDU, send garbage (`GARBAGE`), ignore enquire_link, answer every
submit_sm with ESME_RTHROTTLED for a while, and flood deliver_sm without waiting for
answers.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from channel_proc.transports.smpp.pdu import (
    COMMAND_IDS,
    STATUS_CODES,
    Pdu,
    PduReader,
    decode,
    encode,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence

ROK: Final = 0
RTHROTTLED: Final = STATUS_CODES["ESME_RTHROTTLED"]
RMSGQFUL: Final = STATUS_CODES["ESME_RMSGQFUL"]
RINVPASWD: Final = STATUS_CODES["ESME_RINVPASWD"]
RINVDSTADR: Final = STATUS_CODES["ESME_RINVDSTADR"]
BIND_COMMANDS: Final = frozenset({"bind_transceiver", "bind_transmitter", "bind_receiver"})
#: How long the fake waits for a client's answer before the test fails.
ANSWER_TIMEOUT: Final = 10.0
#: deliver_sm PDUs written in one send_all by a flood (enough to fill the socket buffers).
FLOOD_BATCH: Final = 200


def _header(length: int, command_id: int, sequence: int = 1, status: int = 0) -> bytes:
    return struct.pack(">LLLL", length, command_id, status, sequence)


#: A deliver_sm whose body stops after two bytes: framed correctly, but undecodable.
_SHORT_DELIVER_SM: Final = _header(18, COMMAND_IDS["deliver_sm"], 77) + b"\x00\x01"

#: Byte strings no SMSC should send, by name. The first four break the framing (the
#: client must drop the connection); the next three are framed but unreadable (the client
#: answers them and carries on); `truncated_body` announces more bytes than ever come.
GARBAGE: Final[dict[str, bytes]] = {
    "random": random.Random(6).randbytes(512),
    "command_length_0": _header(0, COMMAND_IDS["enquire_link"]),
    "command_length_3": b"\x00\x00\x00\x03\xff\xff\xff",
    "command_length_2_31": _header(2**31, COMMAND_IDS["deliver_sm"]) + b"\x00" * 64,
    "unknown_command_id": _header(16, 0x0000_0F0F, 78),
    # An SMPP 3.4 command (replace_sm) that the codec has no layout for.
    "unsupported_command": _header(16, COMMAND_IDS["replace_sm"], 80),
    "short_body": _SHORT_DELIVER_SM,
    "truncated_body": _header(400, COMMAND_IDS["deliver_sm"], 79) + b"\x00" * 20,
}
#: Which of GARBAGE leave the stream readable (framed PDUs the client can answer).
FRAMED_GARBAGE: Final = frozenset({"unknown_command_id", "unsupported_command", "short_body"})


@dataclass(frozen=True, slots=True)
class SubmitAnswer:
    """How to answer one submit_sm: status, after `delay` s, with `message_id` (None: the
    next generated id); `respond=False` never answers it."""

    status: int = ROK
    delay: float = 0.0
    message_id: str | None = None
    respond: bool = True


@dataclass(slots=True)
class FloodResult:
    """What a deliver_sm flood got: the command_status each content was answered with,
    and the contents nobody answered (the connection went first)."""

    answered: dict[bytes, int] = field(default_factory=dict)
    unanswered: list[bytes] = field(default_factory=list)

    @property
    def acked(self) -> list[bytes]:
        return [content for content, status in self.answered.items() if status == ROK]

    @property
    def not_acked(self) -> list[bytes]:
        refused = [content for content, status in self.answered.items() if status != ROK]
        return refused + self.unanswered


def receipt_text(smsc_id: str, stat: str = "DELIVRD", err: str = "000") -> str:
    """A delivery receipt text in the common (vumi/Kannel) format."""
    return (
        f"id:{smsc_id} sub:001 dlvrd:001 submit date:2401011200 done date:2401011201"
        f" stat:{stat} err:{err} text:hello"
    )


@dataclass(eq=False)
class SmscConnection:
    """One client connection as the fake sees it."""

    stream: trio.SocketStream
    bind: str | None = None
    system_id: str | None = None
    closed: bool = False
    write_lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def receives(self) -> bool:
        return self.bind in ("bind_transceiver", "bind_receiver")

    @property
    def sends(self) -> bool:
        return self.bind in ("bind_transceiver", "bind_transmitter")


class FakeSmsc:
    """Scripted SMSC. Tests read `received` / `submits` and drive it with the send_* methods."""

    def __init__(
        self,
        *,
        password: str | None = None,
        system_id: str = "fakesmsc",
        id_format: Callable[[int], str] = str,
        auto_receipt: str | None = None,
    ) -> None:
        #: When set, binds with another password are refused with ESME_RINVPASWD.
        self.password = password
        self.system_id = system_id
        #: When set ("DELIVRD", ...), each accepted submit_sm is followed by a receipt.
        self.auto_receipt = auto_receipt
        self.answer_enquire_link = True
        #: submit_sm received before this time (trio clock) are answered ESME_RTHROTTLED.
        self.throttled_until = -1.0
        #: How many submit_sm were answered ESME_RTHROTTLED by `throttle_for`.
        self.throttled = 0
        self.received: list[Pdu] = []
        #: Every submit_sm answered ESME_ROK on a connection that was still open.
        self.accepted: list[Pdu] = []
        self.connections: list[SmscConnection] = []
        self._ids: Iterator[int] = itertools.count(1)
        self._id_format = id_format
        self._sequence = itertools.count(1)
        self._submit_script: deque[SubmitAnswer] = deque()
        self._bind_script: deque[int | None] = deque()
        #: sequence of a request we sent -> what to call with the client's answer.
        self._waiters: dict[int, Callable[[Pdu], None]] = {}
        self._changed = trio.Event()
        self._port: int | None = None
        self._nursery: trio.Nursery | None = None

    # --- scripting --------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._port is not None, "the fake SMSC is not serving"
        return self._port

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def script_submits(self, *answers: SubmitAnswer) -> None:
        """Answer the next submit_sm PDUs so, in order (then ROK again)."""
        self._submit_script.extend(answers)

    def script_binds(self, *statuses: int | None) -> None:
        """Answer the next binds with these statuses (None: no answer at all), then by the
        password check."""
        self._bind_script.extend(statuses)

    def throttle_for(self, seconds: float) -> None:
        """Answer every submit_sm with ESME_RTHROTTLED for the next `seconds`."""
        self.throttled_until = trio.current_time() + seconds

    @property
    def throttling(self) -> bool:
        return trio.current_time() < self.throttled_until

    def assert_script_used(self) -> None:
        assert not self._submit_script, f"{len(self._submit_script)} submit answer(s) unused"
        assert not self._bind_script, f"{len(self._bind_script)} bind answer(s) unused"

    # --- what was received ------------------------------------------------------------

    def pdus(self, command: str) -> list[Pdu]:
        return [pdu for pdu in self.received if pdu.command == command]

    @property
    def submits(self) -> list[Pdu]:
        return self.pdus("submit_sm")

    @property
    def bound(self) -> list[SmscConnection]:
        return [c for c in self.connections if c.bind is not None and not c.closed]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds after something was received (caller bounds it)."""
        while not condition():
            await self._changed.wait()

    async def wait_for(self, command: str, count: int = 1) -> list[Pdu]:
        await self.wait_until(lambda: len(self.pdus(command)) >= count)
        return self.pdus(command)

    async def wait_bound(self, count: int = 1) -> list[SmscConnection]:
        await self.wait_until(lambda: len(self.bound) >= count)
        return self.bound

    def _record(self, pdu: Pdu) -> None:
        self.received.append(pdu)
        self._changed.set()
        self._changed = trio.Event()

    # --- driving the client -----------------------------------------------------------

    def next_message_id(self) -> str:
        return self._id_format(next(self._ids))

    async def send_request(self, command: str, params: dict[str, object]) -> Pdu:
        """Send a request to a bound client that receives; return the client's response."""
        conn = self._receiver()
        pdu = Pdu(command, next(self._sequence), params=params)
        answer_send, answer_recv = trio.open_memory_channel[Pdu](1)
        self._waiters[pdu.sequence] = answer_send.send_nowait
        try:
            await self._write(conn, pdu)
            with trio.fail_after(ANSWER_TIMEOUT):
                return await answer_recv.receive()
        finally:
            self._waiters.pop(pdu.sequence, None)

    async def send_deliver_sm(self, **params: object) -> Pdu:
        """A deliver_sm (addresses default to 27820000000 -> 12345); the deliver_sm_resp."""
        full: dict[str, object] = {"source_addr": "27820000000", "destination_addr": "12345"}
        full.update(params)
        return await self.send_request("deliver_sm", full)

    async def send_receipt(
        self, smsc_id: str, stat: str = "DELIVRD", *, tlv_state: int | None = None
    ) -> Pdu:
        """A delivery receipt for `smsc_id`: text with esm_class 4, or the TLVs only."""
        if tlv_state is not None:
            return await self.send_deliver_sm(
                esm_class=4, receipted_message_id=smsc_id, message_state=tlv_state
            )
        return await self.send_deliver_sm(
            esm_class=4, short_message=receipt_text(smsc_id, stat).encode()
        )

    async def send_raw(self, data: bytes) -> None:
        await self._write_bytes(self._receiver(), data)

    async def flood_deliver_sm(self, contents: Sequence[bytes]) -> FloodResult:
        """One deliver_sm per content, written as fast as the client takes them (no waiting
        for answers); returns once each is answered or the connection is gone."""
        conn = self._receiver()
        by_sequence: dict[int, bytes] = {}
        result = FloodResult()
        wire: list[bytes] = []
        for content in contents:
            pdu = Pdu(
                "deliver_sm",
                next(self._sequence),
                params={
                    "source_addr": "27820000000",
                    "destination_addr": "12345",
                    "short_message": content,
                },
            )
            by_sequence[pdu.sequence] = content
            wire.append(encode(pdu))

        def answer(pdu: Pdu) -> None:
            result.answered[by_sequence[pdu.sequence]] = pdu.status

        for sequence in by_sequence:
            self._waiters[sequence] = answer
        try:
            async with trio.open_nursery() as nursery:

                async def write() -> None:
                    for start in range(0, len(wire), FLOOD_BATCH):
                        await self._write_bytes(conn, b"".join(wire[start : start + FLOOD_BATCH]))

                nursery.start_soon(write)
                await self.wait_until(lambda: len(result.answered) == len(wire) or conn.closed)
        finally:
            for sequence in by_sequence:
                self._waiters.pop(sequence, None)
        result.unanswered = [c for c in contents if c not in result.answered]
        return result

    async def drop_mid_pdu(self, pdu: Pdu | None = None) -> None:
        """Write the first half of `pdu` (default: a deliver_sm) to the receiving client,
        then close its connection: a network failure in the middle of a PDU."""
        conn = self._receiver()
        pdu = pdu or Pdu(
            "deliver_sm",
            next(self._sequence),
            params={"source_addr": "27820000000", "short_message": b"cut in half"},
        )
        data = encode(pdu)
        await self._write_bytes(conn, data[: len(data) // 2])
        await self._close(conn)

    async def drop_connections(self) -> None:
        """Close every client connection without an unbind (a network failure)."""
        for conn in self.connections:
            await self._close(conn)

    async def _close(self, conn: SmscConnection) -> None:
        if not conn.closed:
            conn.closed = True
            await conn.stream.aclose()
            self._changed.set()
            self._changed = trio.Event()

    def _receiver(self) -> SmscConnection:
        for conn in reversed(self.connections):
            if conn.receives and not conn.closed:
                return conn
        raise AssertionError("no client is bound to receive")

    # --- serving ----------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self._port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.serve_listeners(self._serve_connection, listeners)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = SmscConnection(stream)
        self.connections.append(conn)
        reader = PduReader()
        try:
            while not conn.closed:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                for frame in reader.feed(data):
                    await self._handle(conn, decode(frame))
        finally:
            conn.closed = True
            self._changed.set()
            self._changed = trio.Event()
            await stream.aclose()

    async def _handle(self, conn: SmscConnection, pdu: Pdu) -> None:
        self._record(pdu)
        if pdu.is_response or pdu.command == "generic_nack":
            waiter = self._waiters.get(pdu.sequence)
            if waiter is not None:
                waiter(pdu)
            return
        if pdu.command in BIND_COMMANDS:
            await self._bind(conn, pdu)
        elif pdu.command == "submit_sm":
            if self.throttling:
                self.throttled += 1
                answer = SubmitAnswer(status=RTHROTTLED)
            elif self._submit_script:
                answer = self._submit_script.popleft()
            else:
                answer = SubmitAnswer()
            assert self._nursery is not None
            self._nursery.start_soon(self._answer_submit, conn, pdu, answer)
        elif pdu.command == "enquire_link":
            if self.answer_enquire_link:
                await self._write(conn, Pdu("enquire_link_resp", pdu.sequence))
        elif pdu.command == "unbind":
            await self._write(conn, Pdu("unbind_resp", pdu.sequence))
            conn.closed = True
        else:
            await self._write(
                conn, Pdu("generic_nack", pdu.sequence, STATUS_CODES["ESME_RINVCMDID"])
            )

    async def _bind(self, conn: SmscConnection, pdu: Pdu) -> None:
        status: int | None
        if self._bind_script:
            status = self._bind_script.popleft()
            if status is None:
                return
        elif self.password is not None and pdu.text("password") != self.password:
            status = RINVPASWD
        else:
            status = ROK
        if status == ROK:
            conn.bind = pdu.command
            conn.system_id = pdu.text("system_id")
        params: dict[str, object] = {"system_id": self.system_id}
        await self._write(conn, Pdu(f"{pdu.command}_resp", pdu.sequence, status, params))
        self._changed.set()
        self._changed = trio.Event()

    async def _answer_submit(self, conn: SmscConnection, pdu: Pdu, answer: SubmitAnswer) -> None:
        if not answer.respond:
            return
        if answer.delay:
            await trio.sleep(answer.delay)
        message_id = ""
        if answer.status == ROK:
            message_id = answer.message_id or self.next_message_id()
        params: dict[str, object] = {"message_id": message_id}
        if answer.status == ROK and not conn.closed:
            self.accepted.append(pdu)
        await self._write(conn, Pdu("submit_sm_resp", pdu.sequence, answer.status, params))
        if answer.status == ROK and self.auto_receipt is not None:
            await self.send_receipt(message_id, self.auto_receipt)

    async def _write(self, conn: SmscConnection, pdu: Pdu) -> bool:
        return await self._write_bytes(conn, encode(pdu))

    async def _write_bytes(self, conn: SmscConnection, data: bytes) -> bool:
        """Whether `data` was written (False: the connection is closed)."""
        if conn.closed:
            return False
        async with conn.write_lock:
            try:
                await conn.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                conn.closed = True
                return False
        return True


@asynccontextmanager
async def open_fake_smsc(
    *,
    check_script: bool = True,
    password: str | None = None,
    id_format: Callable[[int], str] = str,
    auto_receipt: str | None = None,
) -> AsyncIterator[FakeSmsc]:
    """Serve a FakeSmsc for the block; afterwards check every scripted answer was used."""
    smsc = FakeSmsc(password=password, id_format=id_format, auto_receipt=auto_receipt)
    async with trio.open_nursery() as nursery:
        await nursery.start(smsc.serve)
        yield smsc
        nursery.cancel_scope.cancel()
    if check_script:
        smsc.assert_script_used()


def smpp_config(smsc: FakeSmsc, **overrides: object) -> dict[str, object]:
    """An smpp channel config bound to this fake, with test-speed timers."""
    config: dict[str, object] = {
        "twisted_endpoint": smsc.endpoint,
        "system_id": "esme",
        "password": "pw",
        "initial_reconnect_delay": 0.05,
        "smpp_bind_timeout": 5,
        "throttle_delay": 0.05,
    }
    config.update(overrides)
    return config
