"""Delivery receipts: telling them from messages, reading them, and matching SMSC ids (pure).

A deliver_sm/data_sm is a receipt when it carries receipted_message_id and message_state,
or (by default) when its esm_class says so; else, when esm_class is not trusted, when
its text matches the receipt regex. SMSCs write the same id differently in the
submit_sm_resp and the receipt (hex/decimal, zero padding, case), so ids are normalised
and a receipt id also tries the other radix.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Final

from ipc.payloads import DeliveryStatus

if TYPE_CHECKING:
    from channel_proc.transports.smpp.config import SmppOptions
    from channel_proc.transports.smpp.pdu import Pdu

#: message_state TLV values (SMPP 3.4, 5.2.28).
MESSAGE_STATES: Final = {
    1: "ENROUTE",
    2: "DELIVERED",
    3: "EXPIRED",
    4: "DELETED",
    5: "UNDELIVERABLE",
    6: "ACCEPTED",
    7: "UNKNOWN",
    8: "REJECTED",
}
#: Any of esm_class bits 5-2 set: an SMSC delivery receipt or another acknowledgement.
ESM_RECEIPT_MASK: Final = 0b00111100
_HEX_DIGITS: Final = frozenset("0123456789abcdef")


class Kind(Enum):
    MESSAGE = "message"
    RECEIPT = "receipt"
    #: esm_class says receipt but the text does not parse: acknowledge and drop.
    BAD_RECEIPT = "bad_receipt"


@dataclass(frozen=True, slots=True)
class Receipt:
    smsc_id: str
    #: The SMSC's word for the state ("DELIVRD", "DELIVERED", ...).
    state: str
    status: DeliveryStatus


@dataclass(frozen=True, slots=True)
class Classified:
    kind: Kind
    receipt: Receipt | None = None


def _status(state: str, options: SmppOptions) -> DeliveryStatus:
    return DeliveryStatus(options.status_mapping.get(state, DeliveryStatus.PENDING.value))


def classify(pdu: Pdu, text: str | None, options: SmppOptions) -> Classified:
    """Is this deliver_sm/data_sm a receipt? `text` is its decoded content (None: undecodable)."""
    receipted = pdu.text("receipted_message_id")
    state_code = pdu.params.get("message_state")
    if receipted and isinstance(state_code, int):
        state = MESSAGE_STATES.get(state_code, "UNKNOWN")
        return Classified(Kind.RECEIPT, Receipt(receipted, state, _status(state, options)))
    if options.receipt_use_esm_class:
        if not pdu.integer("esm_class") & ESM_RECEIPT_MASK:
            return Classified(Kind.MESSAGE)
        receipt = parse_receipt_text(text or _ascii(pdu), options)
        return Classified(Kind.RECEIPT, receipt) if receipt else Classified(Kind.BAD_RECEIPT)
    receipt = parse_receipt_text(text, options) if text is not None else None
    return Classified(Kind.RECEIPT, receipt) if receipt else Classified(Kind.MESSAGE)


def _ascii(pdu: Pdu) -> str:
    # Receipt texts are ASCII written by the SMSC, whatever data_coding claims.
    data = pdu.octets("short_message") or pdu.octets("message_payload") or b""
    return data.decode("latin-1")


def parse_receipt_text(text: str | None, options: SmppOptions) -> Receipt | None:
    match = options.receipt_regex.search(text or "")
    if match is None:
        return None
    fields = match.groupdict()
    smsc_id, state = fields.get("id"), fields.get("stat")
    if not smsc_id or state is None:
        return None
    return Receipt(smsc_id, state, _status(state, options))


def normalise_id(smsc_id: str) -> str:
    """Case and zero padding do not matter: "000A1b" and "a1B" are the same id."""
    stripped = smsc_id.strip().lower().lstrip("0")
    return stripped or "0"


def id_candidates(smsc_id: str) -> list[str]:
    """The normalised forms under which a submit_sm_resp may have given this receipt's id:
    as written, then read as decimal and written in hex, then read as hex in decimal."""
    norm = normalise_id(smsc_id)
    candidates = [norm]
    if norm.isdigit():
        candidates.append(format(int(norm), "x"))
    if set(norm) <= _HEX_DIGITS and len(norm) <= 32:
        candidates.append(str(int(norm, 16)))
    return list(dict.fromkeys(candidates))
