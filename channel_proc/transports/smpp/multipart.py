"""Reassembly of inbound multipart messages (UDH or SAR), durable in the link's notes.

Each part is written to the note "parts:{key}" before the SMSC gets its deliver_sm_resp,
so a restart loses no acknowledged part. A message whose parts do not all arrive within
the timeout is delivered with what came, marked incomplete, rather than lost.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from channel_proc.transports.base import TransportLink
    from channel_proc.transports.smpp.text import Concatenation

log = logging.getLogger(__name__)

NOTE_GROUP: Final = "parts"
#: Notes outlive the timeout a little, so a restart right at the deadline still finds them.
NOTE_MARGIN: Final = 3600.0


@dataclass(slots=True)
class Group:
    """The parts of one message received so far."""

    key: str
    source: str
    destination: str
    data_coding: int
    total: int
    deadline: float
    expires_at: float
    parts: dict[int, bytes] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.parts) >= self.total

    def missing(self) -> list[int]:
        return [n for n in range(1, self.total + 1) if n not in self.parts]

    def data(self) -> bytes:
        return b"".join(self.parts[n] for n in sorted(self.parts))

    def to_note(self) -> dict[str, object]:
        return {
            "source": self.source,
            "destination": self.destination,
            "data_coding": self.data_coding,
            "total": self.total,
            "expires_at": self.expires_at,
            "parts": {str(n): data.hex() for n, data in self.parts.items()},
        }

    @classmethod
    def from_note(cls, key: str, note: dict[str, object]) -> Group:
        """Raises ValueError/TypeError for a note that is not ours."""
        parts = note["parts"]
        if not isinstance(parts, dict):
            raise TypeError("parts is not an object")
        expires_at = float(str(note["expires_at"]))
        return cls(
            key=key,
            source=str(note["source"]),
            destination=str(note["destination"]),
            data_coding=int(str(note["data_coding"])),
            total=int(str(note["total"])),
            deadline=trio.current_time() + max(0.0, expires_at - time.time()),
            expires_at=expires_at,
            parts={int(n): bytes.fromhex(str(data)) for n, data in parts.items()},
        )


def group_key(kind: str, source: str, destination: str, concat: Concatenation) -> str:
    return f"{kind}|{source}|{destination}|{concat.reference}|{concat.total}"


class Reassembler:
    """Collects parts; `add` returns the group once complete, `run` expires stale groups."""

    def __init__(self, link: TransportLink, timeout: float) -> None:
        self._link = link
        self._timeout = timeout
        self._groups: dict[str, Group] = {}
        self._lock = trio.Lock()
        self._wakeup = trio.Event()

    async def restore(self) -> None:
        """Load the groups a previous run had stored."""
        notes = await self._link.notes(f"{NOTE_GROUP}:")
        for note_key, note in notes.items():
            key = note_key.removeprefix(f"{NOTE_GROUP}:")
            try:
                self._groups[key] = Group.from_note(key, note)
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("ignored unreadable multipart note %s: %s", key, exc)
        if notes:
            log.info("restored %d incomplete multipart message(s)", len(self._groups))
        self._wakeup.set()

    async def add(
        self,
        key: str,
        concat: Concatenation,
        data: bytes,
        *,
        source: str,
        destination: str,
        data_coding: int,
    ) -> Group | None:
        """Store one part durably; the complete group when this was its last part.

        The caller delivers a complete group and then calls `done`.
        """
        async with self._lock:
            group = self._groups.get(key)
            if group is None:
                group = Group(
                    key=key,
                    source=source,
                    destination=destination,
                    data_coding=data_coding,
                    total=concat.total,
                    deadline=trio.current_time() + self._timeout,
                    expires_at=time.time() + self._timeout,
                )
                self._groups[key] = group
                self._wakeup.set()
            group.parts[concat.index] = data
            if group.complete:
                del self._groups[key]
                return group
            await self._link.note_put(
                f"{NOTE_GROUP}:{key}", group.to_note(), self._timeout + NOTE_MARGIN
            )
            return None

    async def done(self, group: Group) -> None:
        await self._link.note_delete(f"{NOTE_GROUP}:{group.key}")

    async def run(self, deliver_incomplete: Callable[[Group], Awaitable[None]]) -> None:
        """Hand over groups whose time is up, until cancelled."""
        while True:
            self._wakeup = trio.Event()
            deadline = min((g.deadline for g in self._groups.values()), default=math.inf)
            with trio.move_on_at(deadline):
                await self._wakeup.wait()
            now = trio.current_time()
            for group in [g for g in self._groups.values() if g.deadline <= now]:
                async with self._lock:
                    if self._groups.pop(group.key, None) is None:
                        continue
                log.warning(
                    "multipart message from %s incomplete after %.0f s (missing parts %s)",
                    group.source,
                    self._timeout,
                    group.missing(),
                )
                await deliver_incomplete(group)
                await self.done(group)
