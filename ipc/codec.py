"""Encode and decode: the only module that turns our types into bytes and back."""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from ipc.errors import ProtocolError
from ipc.messages import Message
from ipc.payloads import VumiEvent, VumiMessage

_MESSAGE: TypeAdapter[Message] = TypeAdapter(Message)


def encode_ipc(msg: Message) -> bytes:
    return msg.model_dump_json().encode()


def decode_ipc(data: bytes) -> Message:
    try:
        return _MESSAGE.validate_json(data)
    except ValidationError as exc:
        raise ProtocolError(f"undecodable IPC message: {exc.error_count()} error(s)") from exc


def encode_payload(payload: VumiMessage | VumiEvent) -> bytes:
    return payload.model_dump_json().encode()


def decode_vumi_message(data: bytes) -> VumiMessage:
    """Raises ProtocolError for anything that is not a vumi user_message."""
    try:
        return VumiMessage.model_validate_json(data)
    except ValidationError as exc:
        raise ProtocolError(f"not a vumi message: {exc.errors()[0]['msg']}") from exc


def decode_vumi_event(data: bytes) -> VumiEvent:
    try:
        return VumiEvent.model_validate_json(data)
    except ValidationError as exc:
        raise ProtocolError(f"not a vumi event: {exc.errors()[0]['msg']}") from exc
