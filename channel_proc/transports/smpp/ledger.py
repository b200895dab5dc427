"""What the smpp transport remembers about sent messages, in the link's notes.

- "sent:{message_id}": the SMSC ids of the parts the SMSC accepted, so a message sent
  again after a crash resends only the parts the SMSC did not acknowledge;
- "smsc:{normalised SMSC id}": which message (and part) an SMSC id belongs to, so
  delivery receipts find their message after a restart;
- "receipts:{message_id}": the receipt states of a multipart message's parts.

A receipt that arrives before its submit_sm_resp is kept in memory and matched when
the response comes (both happen on live connections of this process).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from channel_proc.transports.smpp.receipts import id_candidates, normalise_id
from ipc.payloads import DeliveryStatus

if TYPE_CHECKING:
    from channel_proc.transports.base import TransportLink
    from channel_proc.transports.smpp.receipts import Receipt

log = logging.getLogger(__name__)

#: Recently acknowledged SMSC ids kept in memory (most receipts come within minutes).
RECENT_IDS: Final = 20_000
#: Receipts for ids not (yet) known are kept this long, and at most this many.
PENDING_RECEIPT_TTL: Final = 600.0
PENDING_RECEIPTS: Final = 10_000


@dataclass(frozen=True, slots=True)
class IdMatch:
    message_id: str
    part: int
    parts: int


@dataclass(frozen=True, slots=True)
class _Pending:
    receipt: Receipt
    expires: float


class Ledger:
    """The transport's memory of sent messages (durable in notes, hot ids in memory)."""

    def __init__(self, link: TransportLink, id_ttl: float | None) -> None:
        self._link = link
        self._id_ttl = id_ttl
        self._recent: OrderedDict[str, IdMatch] = OrderedDict()
        self._pending: OrderedDict[str, list[_Pending]] = OrderedDict()
        self._pending_count = 0
        self._receipts_lock = trio.Lock()

    # --- sending ----------------------------------------------------------------------

    async def sent_state(self, message_id: str) -> tuple[dict[int, str], int | None]:
        """The parts of this message the SMSC already accepted (index -> SMSC id) and the
        concatenation reference they were sent with (None: never sent)."""
        note = await self._link.note_get(f"sent:{message_id}")
        if note is None:
            return {}, None
        parts = note.get("parts")
        reference = note.get("reference")
        accepted = (
            {int(index): str(smsc_id) for index, smsc_id in parts.items()}
            if isinstance(parts, dict)
            else {}
        )
        return accepted, reference if isinstance(reference, int) else None

    async def part_accepted(
        self,
        message_id: str,
        part: int,
        parts: int,
        smsc_id: str,
        accepted: dict[int, str],
        reference: int,
    ) -> list[Receipt]:
        """Record an accepted part; returns receipts that arrived before this response."""
        norm = normalise_id(smsc_id)
        match = IdMatch(message_id, part, parts)
        # Synchronously, with no checkpoint in between: a receipt handler that has just
        # missed this id either finds it here or has already parked its receipt.
        self._remember(norm, match)
        early = [p.receipt for p in self._pending.pop(norm, [])]
        self._pending_count -= len(early)
        await self._link.note_put_many(
            {
                f"smsc:{norm}": {"message_id": message_id, "part": part, "parts": parts},
                f"sent:{message_id}": {
                    "parts": {str(i): sid for i, sid in accepted.items()},
                    "total": parts,
                    "reference": reference,
                },
            },
            self._id_ttl,
        )
        return early

    def _remember(self, norm: str, match: IdMatch) -> None:
        self._recent[norm] = match
        self._recent.move_to_end(norm)
        while len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    # --- receipts ---------------------------------------------------------------------

    async def match(self, receipt: Receipt) -> IdMatch | None:
        """The message a receipt is about; None when unknown (the receipt is then parked)."""
        candidates = id_candidates(receipt.smsc_id)
        found = self._recent_match(candidates)
        if found is not None:
            return found
        for candidate in candidates:
            note = await self._link.note_get(f"smsc:{candidate}")
            if note is not None and isinstance(note.get("message_id"), str):
                return IdMatch(
                    str(note["message_id"]),
                    _int(note.get("part"), 0),
                    _int(note.get("parts"), 1),
                )
        # The response may have been recorded while we read the store.
        found = self._recent_match(candidates)
        if found is None:
            self._park(receipt, candidates)
        return found

    def _recent_match(self, candidates: list[str]) -> IdMatch | None:
        for candidate in candidates:
            found = self._recent.get(candidate)
            if found is not None:
                return found
        return None

    def _park(self, receipt: Receipt, candidates: list[str]) -> None:
        now = trio.current_time()
        self._expire_pending(now)
        entry = _Pending(receipt, now + PENDING_RECEIPT_TTL)
        for candidate in candidates:
            self._pending.setdefault(candidate, []).append(entry)
            self._pending_count += 1
        log.info(
            "receipt for unknown SMSC id %s (%s) kept until its submit_sm_resp arrives",
            receipt.smsc_id,
            receipt.state,
        )

    def _expire_pending(self, now: float) -> None:
        while self._pending:
            key, entries = next(iter(self._pending.items()))
            if entries[-1].expires > now and self._pending_count < PENDING_RECEIPTS:
                return
            del self._pending[key]
            self._pending_count -= len(entries)
            for entry in entries:
                log.warning(
                    "dropped receipt for SMSC id %s (%s): no message of ours has that id",
                    entry.receipt.smsc_id,
                    entry.receipt.state,
                )

    async def multipart_status(
        self, match: IdMatch, status: DeliveryStatus
    ) -> DeliveryStatus | None:
        """The status to report for a message of several parts after one part's receipt:
        failed as soon as a part fails, delivered once every part is, pending once."""
        key = f"receipts:{match.message_id}"
        async with self._receipts_lock:
            note = await self._link.note_get(key) or {}
            states = _str_dict(note.get("states"))
            reported = _str_list(note.get("reported"))
            states[str(match.part)] = status.value
            values = set(states.values())
            result: DeliveryStatus | None = None
            if DeliveryStatus.FAILED.value in reported:
                # A failed message stays failed, whatever later receipts of its parts say.
                result = None
            elif DeliveryStatus.FAILED.value in values:
                result = DeliveryStatus.FAILED
            elif len(states) >= match.parts and values == {DeliveryStatus.DELIVERED.value}:
                result = DeliveryStatus.DELIVERED
            elif status is DeliveryStatus.PENDING and not reported:
                result = DeliveryStatus.PENDING
            if result is not None and result.value in reported:
                result = None
            if result is not None:
                reported.append(result.value)
            await self._link.note_put(key, {"states": states, "reported": reported}, self._id_ttl)
        return result


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) else default


def _str_dict(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _str_list(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []
