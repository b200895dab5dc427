"""The smpp channel type's pure parts: config, text encoding and parts, receipts, session."""

from __future__ import annotations

import codecs
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from channel_proc.transports.smpp.config import LongMessageMode, SmppConfig
from channel_proc.transports.smpp.pdu import (
    COMMAND_IDS,
    STATUS_CODES,
    Pdu,
    PduError,
    decode,
    encode,
)
from channel_proc.transports.smpp.receipts import (
    Kind,
    classify,
    id_candidates,
    normalise_id,
)
from channel_proc.transports.smpp.session import (
    Answered,
    BindMode,
    PeerUnbound,
    Replied,
    Requested,
    Session,
    SessionState,
    Unreadable,
)
from channel_proc.transports.smpp.text import (
    Concatenation,
    decode_text,
    split_udh,
    submit_parts,
)
from ipc.payloads import DeliveryStatus
from tests.fakes.fake_smsc import receipt_text

BASE: dict[str, Any] = {"twisted_endpoint": "tcp:127.0.0.1:2775", "system_id": "s", "password": "p"}


def config(**overrides: Any) -> SmppConfig:
    return SmppConfig.model_validate({**BASE, **overrides})


# --- config ----------------------------------------------------------------------------

VUMI_CONFIG: dict[str, Any] = {
    "twisted_endpoint": "tcp:host=smsc.example.com:port=2775",
    "system_id": "junebug",
    "password": "secret",
    "system_type": "www",
    "interface_version": "34",
    "service_type": "",
    "address_range": "",
    "source_addr_ton": 5,
    "source_addr_npi": 0,
    "dest_addr_ton": 1,
    "dest_addr_npi": 1,
    "registered_delivery": True,
    "smpp_bind_timeout": 30,
    "smpp_enquire_link_interval": 55,
    "initial_reconnect_delay": 5,
    "throttle_delay": 0.1,
    "mt_tps": 10,
    "submit_sm_expiry": 86400,
    "third_party_id_expiry": 604800,
    "deliver_sm_decoding_error": "ESME_RDELIVERYFAILURE",
    "disable_ack": False,
    "disable_delivery_report": False,
    "redis_manager": {"host": "localhost"},
    "split_bind_prefix": "",
    "delivery_report_processor": "vumi.transports.smpp.processors.DeliveryReportProcessor",
    "delivery_report_processor_config": {
        "delivery_report_use_esm_class": True,
        "delivery_report_status_mapping": {"DELIVRD": "delivered", "UNDELIV": "failed"},
    },
    "deliver_short_message_processor_config": {
        "data_coding_overrides": {"0": "latin-1", "4": "utf-8"},
        "allow_empty_messages": True,
    },
    "submit_short_message_processor_config": {
        "submit_sm_encoding": "latin-1",
        "submit_sm_data_coding": 3,
        "send_multipart_sar": True,
        "multipart_sar_reference_rollover": 256,
    },
    "bind_type": "transmitter_receiver",
    "window": 20,
}


def test_config_accepts_a_vumi_smpp_channel_config() -> None:
    options = SmppConfig.model_validate(VUMI_CONFIG).options
    assert (options.host, options.port) == ("smsc.example.com", 2775)
    assert options.long_mode is LongMessageMode.SAR
    assert options.status_mapping == {"DELIVRD": "delivered", "UNDELIV": "failed"}
    assert codecs.lookup(options.data_codings[0]).name == "iso8859-1"
    assert options.data_codings[4] == "utf-8"
    assert options.allow_empty_messages is True
    assert options.submit_data_coding == 3
    assert options.sar_rollover == 256


def test_config_accepts_flat_processor_keys() -> None:
    options = config(send_multipart_udh=True, data_coding_overrides={"8": "utf-16-be"}).options
    assert options.long_mode is LongMessageMode.UDH


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"unknown_key": 1}, "Extra inputs are not permitted"),
        ({"deliver_short_message_processor_config": {"typo": 1}}, "Extra inputs"),
        ({"twisted_endpoint": "udp:1.2.3.4:99"}, "not a TCP endpoint"),
        ({"twisted_endpoint": None}, "twisted_endpoint (or host and port) is required"),
        ({"send_long_messages": True, "send_multipart_udh": True}, "mutually exclusive"),
        ({"delivery_report_regex": "(unclosed"}, "does not compile"),
        ({"deliver_sm_decoding_error": "ESME_NOPE"}, "not an SMPP command status"),
        ({"data_coding_overrides": {"x": "latin-1"}}, "not an integer"),
        ({"data_coding_overrides": {"0": "no-such-codec"}}, "unknown character encoding"),
        ({"delivery_report_status_mapping": {"X": "gone"}}, "delivered/failed/pending"),
        ({"submit_short_message_processor": "my.Processor"}, "only vumi's default"),
        (
            {
                "send_multipart_sar": True,
                "submit_short_message_processor_config": {"send_multipart_sar": False},
            },
            "given twice",
        ),
        ({"window": 0}, "greater than or equal to 1"),
        ({"bind_type": "receiver"}, "transceiver"),
    ],
)
def test_config_errors(overrides: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error.replace("(", r"\(").replace(")", r"\)")):
        config(**overrides)


def test_config_schema_refuses_unknown_keys() -> None:
    schema = SmppConfig.model_json_schema()
    assert schema["additionalProperties"] is False
    assert {"system_id", "password", "bind_type", "window"} <= set(schema["properties"])
    assert set(schema["required"]) == {"system_id", "password"}


@pytest.mark.parametrize(
    ("endpoint", "where"),
    [
        ("tcp:127.0.0.1:2775", ("127.0.0.1", 2775)),
        ("tcp:host=smsc:port=99", ("smsc", 99)),
        ("tcp:port=99:host=smsc:timeout=5", ("smsc", 99)),
    ],
)
def test_config_endpoint_forms(endpoint: str, where: tuple[str, int]) -> None:
    options = config(twisted_endpoint=endpoint).options
    assert (options.host, options.port) == where


def test_config_host_and_port_fallback() -> None:
    options = config(twisted_endpoint=None, host="h", port=1).options
    assert (options.host, options.port) == ("h", 1)


def test_config_secret_is_not_in_repr() -> None:
    assert "p'" not in repr(config(password="p"))


# --- text ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "overrides", "data_coding", "short_message"),
    [
        ("Hello @£$", {}, 0, b"Hello \x00\x01\x02"),
        ("€[]", {}, 0, b"\x1be\x1b<\x1b>"),
        ("Привет", {}, 8, "Привет".encode("utf-16-be")),
        ("café", {"submit_sm_encoding": "latin-1", "submit_sm_data_coding": 3}, 3, b"caf\xe9"),
        ("café", {"submit_sm_encoding": "latin1"}, 3, b"caf\xe9"),
        (
            "café",
            {"submit_sm_data_coding": 0, "data_coding_overrides": {"0": "latin-1"}},
            0,
            b"caf\xe9",
        ),
        ("日本", {"submit_sm_encoding": "latin-1"}, 8, "日本".encode("utf-16-be")),
        ("Hi", {"submit_sm_encoding": "utf-8", "submit_sm_data_coding": 0}, 0, b"Hi"),
        ("", {}, 0, b""),
    ],
    ids=[
        "gsm",
        "gsm-extension",
        "ucs2",
        "latin1",
        "latin1-implied",
        "override",
        "fallback",
        "vumi-default-pair",
        "empty",
    ],
)
def test_outbound_encoding(
    text: str, overrides: dict[str, Any], data_coding: int, short_message: bytes
) -> None:
    [part] = submit_parts(text, config(**overrides).options, reference=1)
    assert (part.data_coding, part.short_message, part.esm_class) == (
        data_coding,
        short_message,
        0,
    )


def test_long_gsm_text_becomes_udh_parts_of_153_septets() -> None:
    parts = submit_parts("a" * 160 + "b", config().options, reference=300)
    assert [len(p.short_message) for p in parts] == [6 + 153, 6 + 8]
    assert [p.short_message[:6] for p in parts] == [
        bytes((5, 0, 3, 300 % 256, 2, 1)),
        bytes((5, 0, 3, 300 % 256, 2, 2)),
    ]
    assert {p.esm_class for p in parts} == {0x40}


def test_gsm_escape_is_never_split_across_parts() -> None:
    parts = submit_parts("a" * 152 + "€" + "b" * 10, config().options, reference=1)
    assert parts[0].short_message.endswith(b"a")
    assert parts[1].short_message[6:8] == b"\x1be"


def test_ucs2_parts_keep_surrogate_pairs_whole() -> None:
    parts = submit_parts("ж" * 66 + "😀" + "ж" * 3, config().options, reference=1)
    assert [len(p.short_message) - 6 for p in parts] == [132, 10]


def test_sar_parts_carry_tlvs() -> None:
    options = config(send_multipart_sar=True, multipart_sar_reference_rollover=100).options
    parts = submit_parts("x" * 200, options, reference=250)
    assert [dict(p.options) for p in parts] == [
        {"sar_msg_ref_num": 50, "sar_total_segments": 2, "sar_segment_seqnum": 1},
        {"sar_msg_ref_num": 50, "sar_total_segments": 2, "sar_segment_seqnum": 2},
    ]
    assert {p.esm_class for p in parts} == {0}


def test_long_message_payload() -> None:
    [part] = submit_parts("x" * 500, config(send_long_messages=True).options, reference=1)
    assert part.short_message == b""
    assert dict(part.options) == {"message_payload": b"x" * 500}


def test_more_than_255_parts_is_refused() -> None:
    from channel_proc.transports.smpp.text import EncodingError

    with pytest.raises(EncodingError):
        submit_parts("x" * 153 * 256, config().options, reference=1)


@pytest.mark.slow
@given(st.text(max_size=600))
def test_parts_reassemble_to_the_text(text: str) -> None:
    options = config().options
    parts = submit_parts(text, options, reference=7)
    data = b"".join(p.short_message[6:] if p.esm_class else p.short_message for p in parts)
    codec = "gsm03.38" if parts[0].data_coding == 0 else "utf-16-be"
    assert data.decode(codec) == text
    limit = 160 if len(parts) == 1 else 159
    assert all(len(p.short_message) <= max(limit, 140) for p in parts)


@pytest.mark.parametrize(
    ("data", "data_coding", "overrides", "text"),
    [
        (b"Hello \x00", 0, {}, "Hello @"),
        (b"Zo\xc3\xab", 0, {}, "Zoë"),
        (b"caf\xe9", 0, {"data_coding_overrides": {"0": "latin-1"}}, "café"),
        (b"caf\xe9", 3, {}, "café"),
        ("Привет".encode("utf-16-be"), 8, {}, "Привет"),
        (b"hi", 0xF1, {}, "hi"),
    ],
)
def test_inbound_decoding(
    data: bytes, data_coding: int, overrides: dict[str, Any], text: str
) -> None:
    assert decode_text(data, data_coding, config(**overrides).options) == text


@pytest.mark.parametrize(("data", "data_coding"), [(b"\xff\xfe", 4), (b"abc", 8), (b"\xff", 0)])
def test_inbound_undecodable(data: bytes, data_coding: int) -> None:
    overrides = {"data_coding_overrides": {"0": "ascii"}} if data_coding == 0 else {}
    with pytest.raises(UnicodeDecodeError):
        decode_text(data, data_coding, config(**overrides).options)


@pytest.mark.parametrize(
    ("data", "concat", "body"),
    [
        (b"\x05\x00\x03\xff\x03\x01back", Concatenation(255, 3, 1), b"back"),
        (b"\x06\x08\x04\x01\x02\x02\x02 at", Concatenation(258, 2, 2), b" at"),
        (b"\x03\x0a\x01\x00hi", None, b"hi"),
        (b"\x05\x00\x03\x01\x02\x05x", None, b"x"),
    ],
)
def test_udh_parsing(data: bytes, concat: Concatenation | None, body: bytes) -> None:
    assert split_udh(data) == (concat, body)


# --- receipts --------------------------------------------------------------------------


def _deliver(**params: object) -> Pdu:
    return Pdu("deliver_sm", 1, params=params)


@pytest.mark.parametrize(
    ("pdu", "text", "overrides", "kind", "smsc_id", "status"),
    [
        (_deliver(esm_class=4), receipt_text("abc"), {}, Kind.RECEIPT, "abc", "delivered"),
        (_deliver(esm_class=4), receipt_text("a", "UNDELIV"), {}, Kind.RECEIPT, "a", "pending"),
        (_deliver(esm_class=4), receipt_text("a", "REJECTD"), {}, Kind.RECEIPT, "a", "failed"),
        (_deliver(esm_class=4), "not a receipt", {}, Kind.BAD_RECEIPT, None, None),
        (_deliver(esm_class=0), receipt_text("abc"), {}, Kind.MESSAGE, None, None),
        (
            _deliver(receipted_message_id="x1", message_state=5),
            None,
            {},
            Kind.RECEIPT,
            "x1",
            "failed",
        ),
        (
            _deliver(esm_class=0),
            receipt_text("q"),
            {"delivery_report_use_esm_class": False},
            Kind.RECEIPT,
            "q",
            "delivered",
        ),
        (
            _deliver(esm_class=0),
            "ref 77 is OK",
            {
                "delivery_report_use_esm_class": False,
                "delivery_report_regex": r"ref (?P<id>\d+) is (?P<stat>\w+)",
                "delivery_report_status_mapping": {"OK": "delivered"},
            },
            Kind.RECEIPT,
            "77",
            "delivered",
        ),
    ],
)
def test_receipt_classification(
    pdu: Pdu,
    text: str | None,
    overrides: dict[str, Any],
    kind: Kind,
    smsc_id: str | None,
    status: str | None,
) -> None:
    classified = classify(pdu, text, config(**overrides).options)
    assert classified.kind is kind
    if smsc_id is not None and status is not None:
        assert classified.receipt is not None
        assert classified.receipt.smsc_id == smsc_id
        assert classified.receipt.status is DeliveryStatus(status)


@pytest.mark.parametrize(
    ("resp_id", "receipt_id"),
    [
        ("abc123", "abc123"),
        ("ABC123", "abc123"),
        ("000a1b2c", "A1B2C"),
        ("0A1B2C", str(0x0A1B2C)),
        ("12345", "0000012345"),
        ("12345", "3039"),
    ],
)
def test_receipt_ids_match_whatever_their_form(resp_id: str, receipt_id: str) -> None:
    assert normalise_id(resp_id) in id_candidates(receipt_id)


def test_receipt_id_candidates_start_with_the_id_as_written() -> None:
    assert id_candidates("0012") == ["12", "c", "18"]
    assert id_candidates("xyz-1") == ["xyz-1"]


# --- session ---------------------------------------------------------------------------


def test_session_bind_and_submit() -> None:
    session = Session(BindMode.TRANSCEIVER)
    bind = session.bind({"system_id": "s", "password": "p"})
    assert decode(bind.data).command == "bind_transceiver"
    with pytest.raises(RuntimeError):
        session.request("submit_sm")
    [event] = session.receive_data(encode(Pdu("bind_transceiver_resp", bind.pdu.sequence)))
    assert isinstance(event, Answered)
    assert session.state is SessionState.BOUND
    submit = session.request("submit_sm", {"destination_addr": "1"})
    assert submit.pdu.sequence == bind.pdu.sequence + 1
    resp = Pdu("submit_sm_resp", submit.pdu.sequence, params={"message_id": "m"})
    [answered] = session.receive_data(encode(resp))
    assert isinstance(answered, Answered)
    assert answered.request == "submit_sm"
    assert session.outstanding == 0


def test_session_refused_bind_returns_to_open() -> None:
    session = Session(BindMode.TRANSMITTER)
    bind = session.bind({})
    session.receive_data(
        encode(Pdu("bind_transmitter_resp", bind.pdu.sequence, STATUS_CODES["ESME_RINVPASWD"]))
    )
    assert session.state is SessionState.OPEN


def _bound(mode: BindMode = BindMode.TRANSCEIVER) -> Session:
    session = Session(mode)
    bind = session.bind({})
    session.receive_data(encode(Pdu(f"{mode.value}_resp", bind.pdu.sequence)))
    return session


def test_session_answers_enquire_link_and_unbind_itself() -> None:
    session = _bound()
    [reply] = session.receive_data(encode(Pdu("enquire_link", 9)))
    assert isinstance(reply, Replied)
    assert decode(reply.data) == Pdu("enquire_link_resp", 9)
    reply, unbound = session.receive_data(encode(Pdu("unbind", 10)))
    assert isinstance(reply, Replied)
    assert decode(reply.data).command == "unbind_resp"
    assert isinstance(unbound, PeerUnbound)
    assert session.state is SessionState.CLOSED


def test_session_hands_deliver_sm_to_the_application() -> None:
    session = _bound()
    [event] = session.receive_data(encode(Pdu("deliver_sm", 4, params={"source_addr": "1"})))
    assert isinstance(event, Requested)
    assert event.pdu.text("source_addr") == "1"


def test_session_refuses_deliver_sm_on_a_transmitter_bind() -> None:
    session = _bound(BindMode.TRANSMITTER)
    [event] = session.receive_data(encode(Pdu("deliver_sm", 4)))
    assert isinstance(event, Replied)
    assert decode(event.data).status == STATUS_CODES["ESME_RINVBNDSTS"]


def test_session_nacks_unknown_commands() -> None:
    session = _bound()
    frame = bytes.fromhex("00000010 00000099 00000000 00000005".replace(" ", ""))
    [event] = session.receive_data(frame)
    assert isinstance(event, Replied)
    assert decode(event.data) == Pdu("generic_nack", 5, STATUS_CODES["ESME_RINVCMDID"])


def test_session_reports_unreadable_requests() -> None:
    session = _bound()
    # A deliver_sm whose short_message is longer than the PDU: cannot be decoded.
    body = b"\0" * 16 + b"\xff"
    frame = bytes.fromhex("00000021 00000005 00000000 00000006".replace(" ", "")) + body
    [event] = session.receive_data(frame)
    assert isinstance(event, Unreadable)


def test_session_ignores_answers_to_nothing() -> None:
    session = _bound()
    assert session.receive_data(encode(Pdu("submit_sm_resp", 77, params={}))) == []


def _frame(command: str, body: bytes, status: int = 0, sequence: int = 6) -> bytes:
    return struct.pack(">LLLL", 16 + len(body), COMMAND_IDS[command], status, sequence) + body


_DELIVER_HEAD = encode(Pdu("deliver_sm", 1, params={}))[16:]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_frame("deliver_sm", b""), "service_type has no terminating NUL"),
        (_frame("deliver_sm", b"\0\x01"), "body ends before"),
        (_frame("deliver_sm", b"abc"), "no terminating NUL"),
        (_frame("deliver_sm", _DELIVER_HEAD[:-1] + b"\x05ab"), "body ends inside short_message"),
        (_frame("deliver_sm", _DELIVER_HEAD + b"\x04"), "cannot decode deliver_sm"),
        (_frame("deliver_sm", _DELIVER_HEAD + b"\x04\x24\x00\x09ab"), "past the end"),
        (_frame("bind_transceiver", b"esme\0pw\0"), "no terminating NUL"),
        (_frame("submit_sm_resp", b"abc"), "cannot decode submit_sm_resp"),
    ],
    ids=[
        "empty deliver_sm",
        "deliver_sm cut after two bytes",
        "C string without NUL",
        "short_message past the end",
        "half a TLV header",
        "TLV value past the end",
        "bind without its integers",
        "message_id without NUL",
    ],
)
def test_decode_refuses_truncated_bodies(frame: bytes, reason: str) -> None:
    with pytest.raises(PduError, match=reason) as caught:
        decode(frame)
    assert caught.value.sequence == 6


@pytest.mark.parametrize("status", [0, STATUS_CODES["ESME_RSYSERR"]])
def test_decode_accepts_a_response_without_a_body(status: int) -> None:
    pdu = decode(_frame("submit_sm_resp", b"", status))
    assert (pdu.command, pdu.status, pdu.text("message_id")) == ("submit_sm_resp", status, None)


@pytest.mark.parametrize("command", ["replace_sm", "cancel_sm", "outbind", "submit_multi"])
def test_session_nacks_commands_the_codec_cannot_read(command: str) -> None:
    session = _bound()
    [event] = session.receive_data(_frame(command, b""))
    assert isinstance(event, Replied)
    assert decode(event.data) == Pdu("generic_nack", 6, STATUS_CODES["ESME_RINVCMDID"])


def test_session_answers_with_generic_nack_when_the_response_cannot_be_built() -> None:
    session = _bound()
    error = PduError("unreadable", command_id=COMMAND_IDS["replace_sm"], sequence=8)
    reply, data = session.respond(error, STATUS_CODES["ESME_RX_T_APPN"])
    assert reply == Pdu("generic_nack", 8, STATUS_CODES["ESME_RX_T_APPN"])
    assert decode(data) == reply
