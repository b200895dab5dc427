"""Shared harness for transport tests: a real memory-channel TransportLink and case tables.

Each kind's test file declares InboundCase / OutboundCase tables and drives its fake
provider; the harness runs the transport and reads what it produced.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from channel_proc.events import StatusReported
from ipc.payloads import VumiEvent, VumiMessage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from channel_proc.transports.base import StatusLevel, Transport
    from channel_proc.transports.errors import SendError

#: How long a harness read waits before the test fails.
READ_TIMEOUT = 5.0


class MemoryLink:
    """A TransportLink whose output lands in bounded memory channels the test reads."""

    def __init__(self, size: int = 64) -> None:
        self.inbound_send, self.inbound_recv = trio.open_memory_channel[VumiMessage](size)
        self.events_send, self.events_recv = trio.open_memory_channel[VumiEvent](size)
        self.status_send, self.status_recv = trio.open_memory_channel[StatusReported](size)
        #: The transport's notes (a real store's JSON round trip; TTLs on trio's clock).
        self.notes_data: dict[str, tuple[dict[str, object], float | None]] = {}

    async def inbound(self, msg: VumiMessage) -> None:
        await self.inbound_send.send(msg)

    async def delivery_report(self, event: VumiEvent) -> None:
        await self.events_send.send(event)

    def status(
        self,
        component: str,
        level: StatusLevel,
        type: str,
        message: str,
        details: Mapping[str, object] | None = None,
    ) -> None:
        self.status_send.send_nowait(
            StatusReported(
                component=component, level=level, type=type, message=message, details=details or {}
            )
        )

    async def note_put(
        self, key: str, value: Mapping[str, object], ttl: float | None = None
    ) -> None:
        await self.note_put_many({key: value}, ttl)

    async def note_put_many(
        self, notes: Mapping[str, Mapping[str, object]], ttl: float | None = None
    ) -> None:
        expires = None if ttl is None else trio.current_time() + ttl
        for key, value in notes.items():
            self.notes_data[key] = (json.loads(json.dumps(dict(value))), expires)
        await trio.lowlevel.checkpoint()

    async def note_get(self, key: str) -> dict[str, object] | None:
        await trio.lowlevel.checkpoint()
        return self._live_notes().get(key)

    async def note_delete(self, key: str) -> bool:
        await trio.lowlevel.checkpoint()
        live = key in self._live_notes()
        self.notes_data.pop(key, None)
        return live

    async def notes(self, prefix: str) -> dict[str, dict[str, object]]:
        await trio.lowlevel.checkpoint()
        return {k: v for k, v in sorted(self._live_notes().items()) if k.startswith(prefix)}

    def _live_notes(self) -> dict[str, dict[str, object]]:
        now = trio.current_time()
        return {
            key: value
            for key, (value, expires) in self.notes_data.items()
            if expires is None or expires > now
        }

    async def next_inbound(self) -> VumiMessage:
        with trio.fail_after(READ_TIMEOUT):
            return await self.inbound_recv.receive()

    async def wait_status(self, type_: str) -> StatusReported:
        """The next status of type `type_` (earlier ones of other types are skipped)."""
        with trio.fail_after(READ_TIMEOUT):
            while True:
                report = await self.status_recv.receive()
                if report.type == type_:
                    return report

    def pending_inbound(self) -> list[VumiMessage]:
        """Inbound messages produced and not read yet (no waiting)."""
        found = []
        while True:
            try:
                found.append(self.inbound_recv.receive_nowait())
            except trio.WouldBlock:
                return found


def build(
    kind: type[Transport[Any]], config: Mapping[str, object]
) -> tuple[Transport[Any], MemoryLink]:
    link = MemoryLink()
    return kind(kind.config_type.model_validate(config), link), link


@asynccontextmanager
async def running_transport(
    kind: type[Transport[Any]], config: Mapping[str, object]
) -> AsyncIterator[tuple[Transport[Any], MemoryLink]]:
    """Run the transport for the block (started() awaited), then cancel it."""
    transport, link = build(kind, config)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(READ_TIMEOUT):
            await nursery.start(transport.run)
        yield transport, link
        nursery.cancel_scope.cancel()


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundCase:
    """What the provider (or client) sends, and the inbound messages expected from it."""

    label: str
    provider_input: tuple[bytes, ...]
    #: For each inbound message in order, the fields it must have (others are not checked).
    expected: tuple[Mapping[str, object], ...]
    config: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundCase:
    """An outbound message, and what the provider receives or which SendError is raised."""

    label: str
    message: Mapping[str, object]
    provider_output: bytes = b""
    error: type[SendError] | None = None
    config: Mapping[str, object] = field(default_factory=dict)


def assert_fields(msg: VumiMessage | VumiEvent, expected: Mapping[str, object]) -> None:
    dumped = msg.model_dump(mode="json")
    actual = {key: dumped.get(key) for key in expected}
    assert actual == dict(expected)
