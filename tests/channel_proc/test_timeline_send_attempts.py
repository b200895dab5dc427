"""The outbound actor's "send_attempt" timeline entries, on both backends: one per attempt,
with its number, result, reason, provider ids and latency, as the API renders them; and the
message id on the log lines written while the message is sent."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from api.timeline import split_entries
from channel_proc.logs import ChannelLogHandler, JsonLineFormatter, Redactor
from channel_proc.outbound import TIMELINE_STAGE
from channel_proc.transports.base import SendReceipt
from channel_proc.transports.errors import (
    ConnectionFailed,
    ProviderRejected,
    ProviderThrottled,
    SendError,
)
from ipc.payloads import EventType, VumiMessage
from tests.channel_proc.outbound_support import FakeProvider, publish_outbound, running_outbound
from tests.channel_proc.support import WAIT, drain_queue, wait_for
from tests.channel_proc.test_outbound import FlakyTransport

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from channel_proc.transports.base import Transport
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.state import StateStore
    from tests.channel_proc.outbound_support import RunningOutbound

JsonObject = dict[str, Any]
TTL = 3600.0
transport_log = logging.getLogger("tests.timeline.transport")


def running(
    broker: Broker,
    namespace: Namespace,
    cid: str,
    transport: Transport[Any],
    store: StateStore,
) -> AbstractAsyncContextManager[RunningOutbound]:
    """The actor, keeping its records (and so the timeline) in `store`."""
    return running_outbound(broker, namespace, cid, transport, store=store, record_ttl=TTL)


async def attempts_of(store: StateStore, cid: str, message_id: str, count: int) -> list[JsonObject]:
    """The message's send_attempt entries as GET .../messages/{id} shows them, once there
    are `count`."""
    found: list[JsonObject] = []

    async def recorded() -> bool:
        record = await store.get_outbound(cid, message_id, TTL)
        _, timeline = split_entries(record.events if record else [], cid)
        found[:] = [entry for entry in timeline if entry["stage"] == TIMELINE_STAGE]
        return len(found) >= count

    with trio.fail_after(WAIT):
        await wait_for(recorded)
    return found


async def test_timeline_send_attempt_submitted(
    broker: Broker, namespace: Namespace, channel_id: str, store: StateStore
) -> None:
    transport = FlakyTransport([])
    msg = VumiMessage(to_addr="+1", content="hi")
    await publish_outbound(broker, namespace, channel_id, msg)
    async with running(broker, namespace, channel_id, transport, store):
        [entry] = await attempts_of(store, channel_id, msg.message_id, 1)
    details = entry["details"]
    assert details["attempt"] == 1
    assert details["result"] == "submitted"
    assert details["provider_message_ids"] == [f"provider-{msg.message_id}"]
    assert details["retry"] is False
    assert details["parts"] == 1
    assert 0 <= details["latency_seconds"] < WAIT


async def test_timeline_send_attempts_throttled_error_then_submitted(
    broker: Broker, namespace: Namespace, channel_id: str, store: StateStore
) -> None:
    errors: list[SendError] = [ProviderThrottled("slow down"), ConnectionFailed("link down")]
    transport = FlakyTransport(errors)
    msg = VumiMessage(to_addr="+1", content="hi")
    await publish_outbound(broker, namespace, channel_id, msg)
    async with running(broker, namespace, channel_id, transport, store):
        entries = await attempts_of(store, channel_id, msg.message_id, 3)
    summary = [
        (e["details"]["attempt"], e["details"]["result"], e["details"].get("reason"))
        for e in entries
    ]
    assert summary == [
        (1, "throttled", "slow down"),
        (2, "transport_error", "link down"),
        (3, "submitted", None),
    ]
    assert [e["details"]["retry"] for e in entries] == [True, True, False]
    assert entries[0]["details"]["code"] == "throttled"
    assert transport.attempts == [msg.message_id] * 3


async def test_timeline_send_attempt_rejected(
    broker: Broker, namespace: Namespace, channel_id: str, store: StateStore
) -> None:
    transport = FlakyTransport([ProviderRejected("unknown subscriber", code="invalid_dest")])
    msg = VumiMessage(to_addr="+1", content="hi")
    await publish_outbound(broker, namespace, channel_id, msg)
    async with running(broker, namespace, channel_id, transport, store):
        [entry] = await attempts_of(store, channel_id, msg.message_id, 1)
        (body,) = await drain_queue(broker, namespace.event_queue(channel_id), 1)
    assert entry["details"] == {
        "attempt": 1,
        "result": "rejected",
        "reason": "unknown subscriber",
        "code": "invalid_dest",
        "retry": False,
        "parts": 1,
        "latency_seconds": entry["details"]["latency_seconds"],
    }
    assert json.loads(body)["event_type"] == EventType.NACK


class LoggingTransport(FakeProvider):
    """Logs while it sends (as a transport's own lines do), then accepts."""

    kind: ClassVar[str] = "logging"

    async def send(self, msg: VumiMessage) -> SendReceipt:
        transport_log.info("submitting %s", msg.content)
        await trio.lowlevel.checkpoint()
        transport_log.info("submitted %s", msg.content)
        return SendReceipt()


async def test_timeline_send_log_lines_carry_the_message_id(
    broker: Broker, namespace: Namespace, channel_id: str, store: StateStore, tmp_path: Path
) -> None:
    handler = ChannelLogHandler(tmp_path / "chan", max_bytes=0, max_files=0)
    handler.setFormatter(JsonLineFormatter(channel_id, Redactor()))
    transport_log.addHandler(handler)
    transport_log.setLevel(logging.INFO)
    messages = [VumiMessage(to_addr="+1", content=f"m{n}") for n in range(3)]
    try:
        for msg in messages:
            await publish_outbound(broker, namespace, channel_id, msg)
        async with running(broker, namespace, channel_id, LoggingTransport(), store):
            await drain_queue(broker, namespace.event_queue(channel_id), 3)
    finally:
        transport_log.removeHandler(handler)
        handler.close()
    lines = [json.loads(line) for line in (tmp_path / "chan").read_text().splitlines()]
    ids = {msg.content: msg.message_id for msg in messages}
    assert len(lines) == 6
    for line in lines:
        assert line["message_id"] == ids[line["message"].split()[-1]]
