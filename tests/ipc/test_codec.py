"""The IPC codec: every Message type survives encode/decode; anything else is a ProtocolError."""

from __future__ import annotations

import json
import typing
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipc import messages as m
from ipc.codec import decode_ipc, encode_ipc
from ipc.errors import ProtocolError

if TYPE_CHECKING:
    from pydantic import BaseModel

_ids = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_text = st.text(max_size=20)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_json_objects = st.dictionaries(_text, st.dictionaries(_text, _json_values, max_size=3), max_size=3)

#: One strategy per member of the Message union. Types whose fields are all concrete are
#: inferred by hypothesis; those holding JSON objects (typed Any) get explicit values.
_STRATEGIES: dict[type[BaseModel], st.SearchStrategy[BaseModel]] = {
    m.Hello: st.from_type(m.Hello),
    m.StartChannel: st.from_type(m.StartChannel),
    m.StopChannel: st.from_type(m.StopChannel),
    m.RestartChannel: st.from_type(m.RestartChannel),
    m.ListChildren: st.from_type(m.ListChildren),
    m.GetCatalog: st.from_type(m.GetCatalog),
    m.GetStatus: st.from_type(m.GetStatus),
    m.Drain: st.from_type(m.Drain),
    m.Ping: st.from_type(m.Ping),
    m.Ok: st.from_type(m.Ok),
    m.ChildrenReply: st.builds(
        m.ChildrenReply, id=_ids, children=st.lists(st.from_type(m.ChildInfo), max_size=4)
    ),
    m.CatalogReply: st.builds(m.CatalogReply, id=_ids, config_schemas=_json_objects),
    m.StatusReply: st.builds(
        m.StatusReply,
        id=_ids,
        channel_id=_text,
        components=_json_objects,
        queued_outbound=st.integers(min_value=0),
        queued_inbound=st.integers(min_value=0),
        queued_events=st.integers(min_value=0),
    ),
    m.ErrorReply: st.from_type(m.ErrorReply),
}


def _union_members() -> set[type[BaseModel]]:
    union, _field = typing.get_args(m.Message)
    return set(typing.get_args(union))


def test_every_message_type_has_a_strategy() -> None:
    assert set(_STRATEGIES) == _union_members()


@pytest.mark.parametrize("msg_type", list(_STRATEGIES), ids=lambda t: t.__name__)
@given(data=st.data())
def test_round_trip(msg_type: type[BaseModel], data: st.DataObject) -> None:
    msg = data.draw(_STRATEGIES[msg_type])
    decoded = decode_ipc(encode_ipc(msg))  # type: ignore[arg-type]  # each strategy builds one Message type
    assert type(decoded) is msg_type
    assert decoded == msg


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"{}",
        b'{"type": "no_such_type", "id": 1}',
        b'{"type": "ping"}',  # a request without its id
        b'{"type": "ping", "id": 1, "extra": true}',
        b'{"type": "ping", "id": "one"}',
        b'{"type": "hello", "role": "emperor", "pid": 1}',
        b'{"type": "ok", "id": 1}{"type": "ok", "id": 2}',
    ],
)
def test_rejects_junk(junk: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_ipc(junk)


@given(junk=st.binary())
def test_rejects_arbitrary_bytes(junk: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_ipc(junk)


@given(obj=st.dictionaries(_text, _json_values, max_size=4), tag=_text)
def test_rejects_objects_with_unknown_tags(obj: dict[str, object], tag: str) -> None:
    known = {t.model_fields["type"].default for t in _union_members()}
    obj["type"] = tag if tag not in known else tag + "?"
    with pytest.raises(ProtocolError):
        decode_ipc(json.dumps(obj).encode())
