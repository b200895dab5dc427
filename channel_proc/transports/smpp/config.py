"""The `config` of an smpp channel: vumi SmppTransceiverTransport's keys, plus bind_type/window.

Unknown keys are refused (extra="forbid"), so a typo is a 400 at the API rather than a
setting silently ignored. The processor settings are accepted flat (the old layout) or
nested under `*_processor_config` (vumi's new layout).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Self

import gsm0338  # type: ignore[import-untyped]  # registers the "gsm03.38" codec; no type hints
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from channel_proc.transports.smpp.pdu import STATUS_CODES

assert gsm0338  # imported for its codec registration

#: vumi's default delivery receipt text format ("id:... stat:DELIVRD ...").
DEFAULT_RECEIPT_REGEX: Final = (
    r"id:(?P<id>[^ ]{,65})"
    r"(?: +sub:(?P<sub>[^ ]+))?"
    r"(?: +dlvrd:(?P<dlvrd>[^ ]+))?"
    r"(?: +submit date:(?P<submit_date>\d*))?"
    r"(?: +done date:(?P<done_date>\d*))?"
    r" +stat:(?P<stat>[A-Z]{5,7})"
    r"(?: +err:(?P<err>[^ ]+))?"
    r" +[Tt]ext:(?P<text>.{,20})"
    r".*"
)

#: vumi's default mapping from a receipt state to delivered/failed/pending.
DEFAULT_STATUS_MAPPING: Final[dict[str, str]] = {
    "delivered": "delivered",
    "failed": "failed",
    "pending": "pending",
    "ENROUTE": "pending",
    "DELIVERED": "delivered",
    "EXPIRED": "failed",
    "DELETED": "failed",
    "UNDELIVERABLE": "failed",
    "ACCEPTED": "delivered",
    "UNKNOWN": "pending",
    "REJECTED": "failed",
    "DELIVRD": "delivered",
    "REJECTD": "failed",
    "FAILED": "failed",
    "0": "delivered",
}

#: data_coding -> Python codec for inbound text (vumi's table, plus GSM 03.38 for 0).
DEFAULT_DATA_CODINGS: Final[dict[int, str]] = {
    0: "gsm03.38",
    1: "ascii",
    3: "latin-1",
    5: "iso2022_jp",
    6: "iso8859_5",
    7: "iso8859_8",
    8: "utf-16-be",
    9: "shift_jis",
    10: "iso2022_jp",
}

#: Encoding names vumi users wrote for submit_sm_encoding that Python does not know.
ENCODING_ALIASES: Final[dict[str, str]] = {
    "gsm": "gsm03.38",
    "gsm0338": "gsm03.38",
    "gsm-03.38": "gsm03.38",
    "gsm_default": "gsm03.38",
    "ucs2": "utf-16-be",
    "ucs-2": "utf-16-be",
    "ucs_2": "utf-16-be",
}

#: The only processor classes: ours behave as vumi's defaults.
_VUMI_PROCESSORS: Final = {
    "delivery_report_processor": "DeliveryReportProcessor",
    "deliver_short_message_processor": "DeliverShortMessageProcessor",
    "submit_short_message_processor": "SubmitShortMessageProcessor",
}
_PROCESSOR_MODULES: Final = (
    "vumi.transports.smpp.processors.",
    "vumi.transports.smpp.processors.default.",
)


class BindType(StrEnum):
    TRANSCEIVER = "transceiver"
    TRANSMITTER_RECEIVER = "transmitter_receiver"


class LongMessageMode(StrEnum):
    UDH = "udh"
    SAR = "sar"
    PAYLOAD = "payload"


def codec_name(name: str) -> str:
    """The Python codec for an encoding name (vumi spellings accepted).

    Raises:
        ValueError: no such codec.
    """
    normalised = ENCODING_ALIASES.get(name.strip().lower(), name.strip())
    try:
        return codecs.lookup(normalised).name
    except LookupError as exc:
        raise ValueError(f"unknown character encoding {name!r}") from exc


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeliveryReportProcessorConfig(_Strict):
    delivery_report_regex: str | None = None
    delivery_report_status_mapping: dict[str, str] | None = None
    delivery_report_use_esm_class: bool | None = None


class DeliverShortMessageProcessorConfig(_Strict):
    data_coding_overrides: dict[str, str] | None = None
    allow_empty_messages: bool | None = None


class SubmitShortMessageProcessorConfig(_Strict):
    submit_sm_encoding: str | None = None
    submit_sm_data_coding: Annotated[int, Field(ge=0, le=255)] | None = None
    send_long_messages: bool | None = None
    send_multipart_sar: bool | None = None
    send_multipart_udh: bool | None = None
    multipart_sar_reference_rollover: Annotated[int, Field(ge=2, le=0x10000)] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SmppOptions:
    """The configuration resolved once: defaults applied, nested and flat keys merged."""

    host: str
    port: int
    receipt_regex: re.Pattern[str]
    status_mapping: dict[str, str]
    receipt_use_esm_class: bool
    data_codings: dict[int, str]
    #: data_coding 0 that is not GSM 03.38 is read as UTF-8 (unless 0 is overridden).
    utf8_fallback: bool
    allow_empty_messages: bool
    #: The explicit outbound codec and data_coding; None: GSM 03.38, else UCS-2.
    submit_codec: str | None
    submit_data_coding: int | None
    long_mode: LongMessageMode
    sar_rollover: int
    deliver_sm_decoding_error: int


_NonNegative = Annotated[float, Field(ge=0)]
_Ton = Annotated[int, Field(ge=0, le=255)]


class SmppConfig(_Strict):
    """The `config` of an smpp channel (vumi's SmppTransportConfig keys, and our additions)."""

    twisted_endpoint: Annotated[
        str | None,
        Field(description="Where the SMSC listens: 'tcp:host:port' or 'tcp:host=H:port=P'"),
    ] = None
    host: Annotated[str | None, Field(description="Deprecated: use twisted_endpoint")] = None
    port: Annotated[int | None, Field(ge=1, le=65535, description="Deprecated")] = None
    system_id: Annotated[str, Field(max_length=15)]
    password: Annotated[SecretStr, Field(description="At most 8 characters are sent")]
    system_type: Annotated[str, Field(max_length=12)] = ""
    interface_version: str = "34"
    service_type: Annotated[str, Field(max_length=5)] = ""
    address_range: Annotated[str, Field(max_length=40)] = ""
    source_addr_ton: _Ton = 0
    source_addr_npi: _Ton = 0
    dest_addr_ton: _Ton = 0
    dest_addr_npi: _Ton = 1
    registered_delivery: bool | Annotated[int, Field(ge=0, le=255)] = True
    smpp_bind_timeout: Annotated[float, Field(gt=0)] = 30
    smpp_enquire_link_interval: Annotated[float, Field(gt=0)] = 55
    initial_reconnect_delay: Annotated[float, Field(gt=0)] = 5
    throttle_delay: _NonNegative = 0.1
    mt_tps: _NonNegative = 0
    submit_sm_expiry: Annotated[
        float, Field(gt=0, description="Seconds to wait for a submit_sm_resp before rebinding")
    ] = 86400
    third_party_id_expiry: Annotated[
        float | None,
        Field(gt=0, description="Seconds SMSC ids are kept; default: the outbound message TTL"),
    ] = None
    deliver_sm_decoding_error: str = "ESME_RDELIVERYFAILURE"
    disable_ack: bool = False
    disable_delivery_report: bool = False
    # Processor settings, flat (old layout) ...
    delivery_report_regex: str | None = None
    delivery_report_status_mapping: dict[str, str] | None = None
    delivery_report_use_esm_class: bool | None = None
    data_coding_overrides: dict[str, str] | None = None
    allow_empty_messages: bool | None = None
    submit_sm_encoding: str | None = None
    submit_sm_data_coding: Annotated[int, Field(ge=0, le=255)] | None = None
    send_long_messages: bool | None = None
    send_multipart_sar: bool | None = None
    send_multipart_udh: bool | None = None
    multipart_sar_reference_rollover: Annotated[int, Field(ge=2, le=0x10000)] | None = None
    # ... or nested (vumi's processor-aware layout).
    delivery_report_processor: str | None = None
    delivery_report_processor_config: DeliveryReportProcessorConfig | None = None
    deliver_short_message_processor: str | None = None
    deliver_short_message_processor_config: DeliverShortMessageProcessorConfig | None = None
    submit_short_message_processor: str | None = None
    submit_short_message_processor_config: SubmitShortMessageProcessorConfig | None = None
    # vumi keys that have no meaning here: the gateway's store replaces vumi's Redis.
    redis_manager: dict[str, Any] | None = None
    split_bind_prefix: str | None = None
    codec_class: str | None = None
    # Our additions.
    bind_type: BindType = BindType.TRANSCEIVER
    window: Annotated[
        int, Field(ge=1, le=1000, description="submit_sm PDUs awaiting a response at once")
    ] = 10
    multipart_reassembly_timeout: Annotated[
        float, Field(gt=0, description="Seconds to wait for every part of an inbound message")
    ] = 600

    _options: SmppOptions = PrivateAttr()

    @field_validator("deliver_sm_decoding_error")
    @classmethod
    def _known_status(cls, value: str) -> str:
        if value not in STATUS_CODES:
            raise ValueError(f"{value!r} is not an SMPP command status name (e.g. ESME_RSYSERR)")
        return value

    @field_validator(*_VUMI_PROCESSORS)
    @classmethod
    def _default_processor(cls, value: str | None) -> str | None:
        if value is None:
            return value
        module, _, name = value.rpartition(".")
        if name not in _VUMI_PROCESSORS.values() or f"{module}." not in _PROCESSOR_MODULES:
            raise ValueError(f"{value!r}: only vumi's default SMPP processors are supported")
        return value

    @field_validator("codec_class")
    @classmethod
    def _default_codec(cls, value: str | None) -> str | None:
        if value not in (None, "vumi.codecs.VumiCodec"):
            raise ValueError("only vumi.codecs.VumiCodec is supported")
        return value

    @model_validator(mode="after")
    def _resolved(self) -> Self:
        self._options = self._resolve()
        return self

    @property
    def options(self) -> SmppOptions:
        return self._options

    def _pick(self, nested: BaseModel | None, name: str) -> Any:
        flat = getattr(self, name)
        inner = getattr(nested, name) if nested is not None else None
        if flat is not None and inner is not None and flat != inner:
            raise ValueError(f"{name} is given twice, flat and in a *_processor_config")
        return inner if inner is not None else flat

    def _resolve(self) -> SmppOptions:
        host, port = self._endpoint()
        dr = self.delivery_report_processor_config
        sm = self.deliver_short_message_processor_config
        submit = self.submit_short_message_processor_config
        regex_text = self._pick(dr, "delivery_report_regex") or DEFAULT_RECEIPT_REGEX
        try:
            regex = re.compile(regex_text)
        except re.error as exc:
            raise ValueError(f"delivery_report_regex does not compile: {exc}") from exc
        mapping = self._pick(dr, "delivery_report_status_mapping")
        if mapping is not None:
            bad = sorted(v for v in mapping.values() if v not in ("delivered", "failed", "pending"))
            if bad:
                raise ValueError(
                    f"delivery_report_status_mapping values must be delivered/"
                    f"failed/pending, not {', '.join(bad)}"
                )
        use_esm = self._pick(dr, "delivery_report_use_esm_class")
        data_codings = dict(DEFAULT_DATA_CODINGS)
        overrides = self._pick(sm, "data_coding_overrides") or {}
        for key, name in overrides.items():
            try:
                coding = int(key)
            except ValueError as exc:
                raise ValueError(f"data_coding_overrides key {key!r} is not an integer") from exc
            data_codings[coding] = codec_name(name)
        encoding = self._pick(submit, "submit_sm_encoding")
        data_coding = self._pick(submit, "submit_sm_data_coding")
        submit_codec = None
        if encoding is not None and encoding.lower().replace("-", "") not in ("utf8", "utf_8"):
            submit_codec = codec_name(encoding)
        elif data_coding is not None and data_coding in data_codings:
            submit_codec = data_codings[data_coding]
        elif encoding is not None:
            # vumi's default pair (utf-8, 0) means "the SMSC default": GSM 03.38 here.
            submit_codec = None
        return SmppOptions(
            host=host,
            port=port,
            receipt_regex=regex,
            status_mapping=dict(DEFAULT_STATUS_MAPPING if mapping is None else mapping),
            receipt_use_esm_class=True if use_esm is None else use_esm,
            data_codings=data_codings,
            utf8_fallback=0 not in {int(key) for key in overrides},
            allow_empty_messages=bool(self._pick(sm, "allow_empty_messages")),
            submit_codec=submit_codec,
            submit_data_coding=data_coding,
            long_mode=self._long_mode(submit),
            sar_rollover=self._pick(submit, "multipart_sar_reference_rollover") or 0x10000,
            deliver_sm_decoding_error=STATUS_CODES[self.deliver_sm_decoding_error],
        )

    def _long_mode(self, submit: SubmitShortMessageProcessorConfig | None) -> LongMessageMode:
        chosen = [
            mode
            for name, mode in (
                ("send_long_messages", LongMessageMode.PAYLOAD),
                ("send_multipart_sar", LongMessageMode.SAR),
                ("send_multipart_udh", LongMessageMode.UDH),
            )
            if self._pick(submit, name)
        ]
        if len(chosen) > 1:
            raise ValueError(
                "send_long_messages, send_multipart_sar and send_multipart_udh are mutually"
                " exclusive"
            )
        # Nothing chosen: long messages are split with UDH rather than refused.
        return chosen[0] if chosen else LongMessageMode.UDH

    def _endpoint(self) -> tuple[str, int]:
        if self.twisted_endpoint is None:
            if self.host is None or self.port is None:
                raise ValueError("twisted_endpoint (or host and port) is required")
            return self.host, self.port
        return parse_client_endpoint(self.twisted_endpoint)


_ENDPOINT_OPTIONS: Final = frozenset({"host", "port", "timeout", "bindAddress"})


def parse_client_endpoint(text: str) -> tuple[str, int]:
    """Host and port of a twisted client endpoint: "tcp:host:port" or "tcp:host=H:port=P".

    Raises:
        ValueError: not a TCP client endpoint.
    """
    kind, _, rest = text.partition(":")
    if kind != "tcp" or not rest:
        raise ValueError(f"{text!r} is not a TCP endpoint like 'tcp:smsc.example.com:2775'")
    options: dict[str, str] = {}
    positional = ("host", "port")
    for index, part in enumerate(rest.split(":")):
        key, sep, value = part.partition("=")
        if not sep:
            if index >= len(positional):
                raise ValueError(f"{text!r}: unexpected {part!r}")
            key, value = positional[index], part
        if key not in _ENDPOINT_OPTIONS:
            raise ValueError(f"{text!r}: unknown option {key!r}")
        options[key] = value
    if not options.get("host") or "port" not in options:
        raise ValueError(f"{text!r}: host and port are required")
    try:
        port = int(options["port"])
    except ValueError as exc:
        raise ValueError(f"{text!r}: port is not a number") from exc
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port {port} is out of range")
    return options["host"], port
