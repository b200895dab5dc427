"""Message text <-> short_message bytes: encodings, long-message parts, UDH and SAR (pure).

Outbound text is GSM 03.38 (with its extension table) when it fits, else UCS-2,
unless the channel names an encoding. Long texts become UDH or SAR parts, or one
message_payload. Inbound bytes are decoded by data_coding, with the channel's overrides.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from channel_proc.transports.smpp.config import LongMessageMode

if TYPE_CHECKING:
    from channel_proc.transports.smpp.config import SmppOptions

GSM: Final = "gsm03.38"
UCS2: Final = "utf-16-be"
DATA_CODING_GSM: Final = 0
DATA_CODING_UCS2: Final = 8
#: Data codings for an explicitly chosen codec, when submit_sm_data_coding is not given.
CODEC_DATA_CODINGS: Final = {GSM: 0, "ascii": 1, "latin-1": 3, "iso8859-1": 3, UCS2: 8}

ESM_UDHI: Final = 0x40
IEI_CONCAT_8BIT: Final = 0x00
IEI_CONCAT_16BIT: Final = 0x08

#: Octets (GSM: septets, one per octet unpacked) in one message and in one part.
_SINGLE_LIMIT: Final = {True: 160, False: 140}
_PART_LIMIT: Final = {True: 153, False: 134}
MAX_PARTS: Final = 255
#: What fits in short_message at all (sm_length is one octet; vumi used 254).
MAX_SHORT_MESSAGE: Final = 254


class EncodingError(ValueError):
    """The text cannot be sent as configured (e.g. more than 255 parts)."""


@dataclass(frozen=True, slots=True)
class EncodedText:
    """Text as octets, with the data_coding that tells the SMSC how to read them."""

    units: tuple[bytes, ...]
    data_coding: int
    septets: bool

    @property
    def data(self) -> bytes:
        return b"".join(self.units)


@dataclass(frozen=True, slots=True)
class SubmitPart:
    """The content fields of one submit_sm (the rest come from the channel's config)."""

    short_message: bytes = b""
    esm_class: int = 0
    data_coding: int = 0
    #: TLVs: sar_* or message_payload.
    options: tuple[tuple[str, object], ...] = ()


def _units(text: str, codec: str) -> tuple[bytes, ...]:
    """The text encoded character by character, so parts never split a character.

    Raises:
        UnicodeEncodeError: a character the codec cannot encode.
    """
    if codec == UCS2:
        # A character outside the BMP is a surrogate pair: 4 octets, never split.
        return tuple(char.encode(UCS2) for char in text)
    if codec == GSM and "\x1b" in text:
        # ESC is the GSM escape prefix, not a character a message can carry.
        raise UnicodeEncodeError(GSM, text, text.index("\x1b"), text.index("\x1b") + 1, "ESC")
    encoder = codecs.getencoder(codec)
    return tuple(encoder(char)[0] for char in text)


def encode_text(text: str, options: SmppOptions) -> EncodedText:
    """GSM 03.38, else UCS-2; or the channel's codec (UCS-2 when it cannot hold the text)."""
    codec = options.submit_codec or GSM
    data_coding = options.submit_data_coding
    if data_coding is None:
        data_coding = CODEC_DATA_CODINGS.get(codec, DATA_CODING_GSM)
    try:
        units = _units(text, codec)
    except UnicodeEncodeError:
        return EncodedText(_units(text, UCS2), DATA_CODING_UCS2, septets=False)
    return EncodedText(units, data_coding, septets=codec == GSM)


def split_units(encoded: EncodedText, limit: int) -> list[bytes]:
    parts: list[bytes] = []
    current = bytearray()
    for unit in encoded.units:
        if len(current) + len(unit) > limit:
            parts.append(bytes(current))
            current.clear()
        current += unit
    parts.append(bytes(current))
    return parts


def submit_parts(text: str, options: SmppOptions, reference: int) -> list[SubmitPart]:
    """The submit_sm content of each part of `text`.

    `reference` numbers the concatenated message (the caller keeps a counter).

    Raises:
        EncodingError: the text needs more than 255 parts.
    """
    encoded = encode_text(text, options)
    coding = encoded.data_coding
    data = encoded.data
    if len(data) <= _SINGLE_LIMIT[encoded.septets]:
        return [SubmitPart(short_message=data, data_coding=coding)]
    if options.long_mode is LongMessageMode.PAYLOAD:
        return [SubmitPart(data_coding=coding, options=(("message_payload", data),))]
    chunks = split_units(encoded, _PART_LIMIT[encoded.septets])
    total = len(chunks)
    if total > MAX_PARTS:
        raise EncodingError(f"the text needs {total} parts; at most {MAX_PARTS} can be sent")
    if options.long_mode is LongMessageMode.SAR:
        ref = reference % options.sar_rollover
        return [
            SubmitPart(
                short_message=chunk,
                data_coding=coding,
                options=(
                    ("sar_msg_ref_num", ref),
                    ("sar_total_segments", total),
                    ("sar_segment_seqnum", index),
                ),
            )
            for index, chunk in enumerate(chunks, start=1)
        ]
    ref8 = reference % 256
    return [
        SubmitPart(
            short_message=bytes((5, IEI_CONCAT_8BIT, 3, ref8, total, index)) + chunk,
            esm_class=ESM_UDHI,
            data_coding=coding,
        )
        for index, chunk in enumerate(chunks, start=1)
    ]


# --- inbound ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Concatenation:
    """Where one part belongs: (reference, total, index) from a UDH or the sar_* TLVs."""

    reference: int
    total: int
    index: int


def split_udh(data: bytes) -> tuple[Concatenation | None, bytes]:
    """The concatenation header (if any) of a short_message with UDHI set, and the text octets.

    Raises:
        ValueError: a header longer than the message.
    """
    if not data:
        raise ValueError("UDHI set on an empty message")
    length = data[0]
    if length + 1 > len(data):
        raise ValueError("UDH longer than the message")
    header, body = data[1 : length + 1], data[length + 1 :]
    concat = None
    pos = 0
    while pos + 2 <= len(header):
        iei, size = header[pos], header[pos + 1]
        value = header[pos + 2 : pos + 2 + size]
        if iei == IEI_CONCAT_8BIT and size == 3:
            concat = Concatenation(value[0], value[1], value[2])
        elif iei == IEI_CONCAT_16BIT and size == 4:
            concat = Concatenation(int.from_bytes(value[:2], "big"), value[2], value[3])
        pos += 2 + size
    if concat is not None and not 1 <= concat.index <= concat.total:
        concat = None
    return concat, body


def data_coding_codec(data_coding: int, options: SmppOptions) -> str | None:
    """The codec for an inbound data_coding, None when it carries binary data."""
    codec = options.data_codings.get(data_coding)
    if codec is not None:
        return codec
    # Coding group 1111: bit 2 says 8-bit data (binary) or the GSM default alphabet.
    if data_coding & 0xF0 == 0xF0 and not data_coding & 0x04:
        return options.data_codings.get(0)
    return None


def decode_text(data: bytes, data_coding: int, options: SmppOptions) -> str:
    """Decode inbound octets.

    data_coding 0 is GSM 03.38 by the spec, but many SMSCs send UTF-8 there (vumi read it
    so): without an override, octets that are not GSM are read as UTF-8.

    Raises:
        UnicodeDecodeError: the octets do not decode (or the coding is binary).
    """
    codec = data_coding_codec(data_coding, options)
    if codec is None:
        raise UnicodeDecodeError(
            f"data_coding {data_coding}", data, 0, len(data), "binary or unknown data_coding"
        )
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        if codec == GSM and options.utf8_fallback:
            return data.decode("utf-8")
        raise
