"""SMPP 3.4 PDUs as values: framing, encoding and decoding (sans-IO).

The field layouts come from smpplib's PDU classes, used without its socket client:
this module is the only one that imports smpplib, and it hands out plain `Pdu`
values (strings as str, octet strings as bytes) so nothing else sees the library.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import smpplib.command  # type: ignore[import-untyped]  # smpplib ships no type hints
import smpplib.consts  # type: ignore[import-untyped]
import smpplib.exceptions  # type: ignore[import-untyped]
import smpplib.ptypes  # type: ignore[import-untyped]
import smpplib.smpp  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from collections.abc import Mapping

HEADER: Final = struct.Struct(">LLLL")
HEADER_SIZE: Final = HEADER.size
#: A message_payload may hold 64 KiB; anything longer is a broken peer, not a message.
MAX_PDU_LENGTH: Final = 70_000
MAX_SEQUENCE: Final = 0x7FFFFFFF

ESME_ROK: Final = 0

#: command_status -> name ("ESME_RTHROTTLED"), from smpplib's constants.
STATUS_NAMES: Final[dict[int, str]] = {
    value: name.removeprefix("SMPP_")
    for name, value in vars(smpplib.consts).items()
    if name.startswith("SMPP_ESME_") and isinstance(value, int)
}
STATUS_CODES: Final[dict[str, int]] = {name: code for code, name in STATUS_NAMES.items()}

COMMAND_IDS: Final[dict[str, int]] = dict(smpplib.command_codes.commands)
COMMAND_NAMES: Final[dict[int, str]] = {code: name for name, code in COMMAND_IDS.items()}

#: Fields shown in log lines: ids and shapes, never credentials or message text.
_LOGGED_FIELDS: Final = (
    "system_id",
    "message_id",
    "receipted_message_id",
    "message_state",
    "esm_class",
    "data_coding",
    "sm_length",
    "sar_msg_ref_num",
    "sar_segment_seqnum",
    "sar_total_segments",
)


def status_name(status: int) -> str:
    return STATUS_NAMES.get(status, f"0x{status:08X}")


class PduError(Exception):
    """A frame that is not a PDU we can read. `sequence`/`command_id` are 0 when unknown."""

    def __init__(self, reason: str, *, command_id: int = 0, sequence: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id
        self.sequence = sequence

    @property
    def command(self) -> str | None:
        return COMMAND_NAMES.get(self.command_id)


class FramingError(PduError):
    """The byte stream cannot be split into PDUs any more: the connection must be closed."""


@dataclass(frozen=True, slots=True)
class Pdu:
    """One PDU: its header and the parameters that are present (mandatory and TLVs)."""

    command: str
    sequence: int
    status: int = ESME_ROK
    params: Mapping[str, object] = field(default_factory=dict)

    @property
    def is_response(self) -> bool:
        return bool(COMMAND_IDS[self.command] & 0x80000000)

    @property
    def ok(self) -> bool:
        return self.status == ESME_ROK

    def text(self, name: str) -> str | None:
        value = self.params.get(name)
        return value if isinstance(value, str) else None

    def integer(self, name: str, default: int = 0) -> int:
        value = self.params.get(name)
        return value if isinstance(value, int) else default

    def octets(self, name: str) -> bytes | None:
        value = self.params.get(name)
        return value if isinstance(value, bytes) else None

    def summary(self) -> str:
        """One log line's worth: command, sequence, status and ids (never the password)."""
        parts = [self.command, f"seq={self.sequence}"]
        if self.is_response or self.status:
            parts.append(f"status={status_name(self.status)}")
        parts.extend(
            f"{name}={self.params[name]}" for name in _LOGGED_FIELDS if name in self.params
        )
        return " ".join(parts)


class _Sequencer:
    """What smpplib's PDU classes ask their client for; we always pass sequences ourselves."""

    sequence = 0

    def next_sequence(self) -> int:
        return 0


_SEQUENCER: Final = _Sequencer()


def encode(pdu: Pdu) -> bytes:
    """The wire bytes of `pdu`.

    Raises:
        ValueError: a parameter this command does not have, or a value that does not fit.
    """
    try:
        obj = smpplib.smpp.make_pdu(pdu.command, client=_SEQUENCER, sequence=pdu.sequence)
    except smpplib.exceptions.UnknownCommandError as exc:
        raise ValueError(f"unknown SMPP command {pdu.command!r}") from exc
    # smpplib reads an unset sequence from its client; set both header fields explicitly.
    obj.sequence = pdu.sequence
    obj.status = pdu.status
    for name, value in pdu.params.items():
        if name not in obj.params:
            raise ValueError(f"{pdu.command} has no parameter {name!r}")
        # smpplib writes C-octet strings with latin-1: ours are ASCII addresses and ids.
        setattr(obj, name, value)
    try:
        data: bytes = obj.generate()
    except (struct.error, TypeError, UnicodeError) as exc:
        raise ValueError(f"cannot encode {pdu.command}: {exc}") from exc
    return data


def _value(param: Any, raw: object) -> object:
    if param.type is str and isinstance(raw, bytes):
        # C-octet strings are ASCII by the spec; latin-1 never fails on stray bytes.
        return raw.decode("latin-1")
    return raw


def _check_body(obj: Any, body: bytes, *, is_response: bool) -> None:
    """Raise ValueError unless `body` holds every mandatory parameter whole and then whole
    TLVs.

    Hand-written because smpplib's parser is lenient: it stops quietly where a body ends
    early, rereads from the start when a C-octet string has no NUL, and cuts a TLV or
    short_message that runs past the end, so garbage would decode as a message. A response
    may have no body at all (SMPP 3.4 omits it when command_status is not ESME_ROK, and
    some SMSCs do when it is).
    """
    if is_response and not body:
        return
    pos = 0
    ints: dict[str, int] = {}
    for name in obj.params_order:
        if obj.field_is_optional(name):
            break
        param = obj.params[name]
        if param.type is int:
            end = pos + param.size
            if end > len(body):
                raise ValueError(f"body ends before {name}")
            ints[name] = int.from_bytes(body[pos:end], "big")
        elif param.type is str:
            nul = body.find(b"\0", pos)
            if nul < 0:
                raise ValueError(f"{name} has no terminating NUL")
            end = nul + 1
        else:
            end = pos + ints.get(param.len_field, 0)
            if end > len(body):
                raise ValueError(f"body ends inside {name}")
        pos = end
    while pos < len(body):
        if pos + 4 > len(body):
            raise ValueError("body ends inside a TLV header")
        tag, length = struct.unpack_from(">HH", body, pos)
        pos += 4 + length
        if pos > len(body):
            raise ValueError(f"TLV 0x{tag:04X} runs past the end of the body")


def decode(frame: bytes) -> Pdu:
    """Decode one complete frame (as split by PduReader).

    Raises:
        PduError: an unknown or unsupported command, or a body that does not parse;
            `sequence` and `command_id` (0 for a command we cannot answer in kind) come
            from the header so the caller can still answer it.
    """
    _, command_id, status, sequence = HEADER.unpack_from(frame)
    command = COMMAND_NAMES.get(command_id)
    if command is None:
        raise PduError(f"unknown command id 0x{command_id:08X}", sequence=sequence)
    try:
        obj = smpplib.smpp.parse_pdu(frame, client=_SEQUENCER, allow_unknown_opt_params=True)
    except smpplib.exceptions.UnknownCommandError as exc:
        # SMPP 3.4 commands smpplib has no layout for (replace_sm, outbind, ...): we can
        # neither read nor answer them in kind, so they are treated as unknown ids.
        raise PduError(f"unsupported command {command}", sequence=sequence) from exc
    except (struct.error, KeyError, IndexError, ValueError, TypeError) as exc:
        raise PduError(
            f"cannot decode {command}: {exc!r}", command_id=command_id, sequence=sequence
        ) from exc
    if obj is None:
        raise PduError(f"unsupported command {command}", sequence=sequence)
    try:
        _check_body(obj, frame[HEADER_SIZE:], is_response=bool(command_id & 0x80000000))
    except ValueError as exc:
        raise PduError(
            f"cannot decode {command}: {exc}", command_id=command_id, sequence=sequence
        ) from exc
    params = {
        name: _value(param, raw)
        for name, param in obj.params.items()
        if (raw := getattr(obj, name, None)) is not None and param.type is not smpplib.ptypes.flag
    }
    # smpplib fills sm_length even when absent; keep only what carries information.
    if params.get("sm_length") == 0 and not params.get("short_message"):
        params.pop("short_message", None)
    return Pdu(command, sequence, status, params)


@dataclass(slots=True)
class PduReader:
    """Bytes in, complete PDU frames out."""

    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Every frame completed by `data`, in order.

        Raises:
            FramingError: a command_length that cannot be right (the stream is unusable).
        """
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        start = 0
        while len(buffer) - start >= 4:
            (length,) = struct.unpack_from(">L", buffer, start)
            if not HEADER_SIZE <= length <= MAX_PDU_LENGTH:
                raise FramingError(f"invalid command_length {length}")
            if len(buffer) - start < length:
                break
            frames.append(bytes(buffer[start : start + length]))
            start += length
        del buffer[:start]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)
