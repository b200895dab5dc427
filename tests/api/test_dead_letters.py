"""Dead letters through the API, on both backends: what the channel process dead-letters
(channel_proc.deadletter) is listed, replayed onto its source queue, and deleted; for
channels and router destinations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from channel_proc.deadletter import dead_letter
from ipc.broker import MAX_PRIORITY
from ipc.codec import decode_vumi_event, decode_vumi_message, encode_payload
from ipc.payloads import EventType, VumiEvent, VumiMessage
from tests.api.test_routers import call, error_of, make_destination, make_router

if TYPE_CHECKING:
    from tests.api.harness import Api

JsonObject = dict[str, Any]


async def bury(api: Api, owner_id: str, body: bytes, kind: str, reason: str = "gave up") -> str:
    """Dead-letter `body` as the channel process does, taken from owner's `kind` queue."""
    queue = {
        "inbound": api.namespace.inbound_queue,
        "event": api.namespace.event_queue,
        "outbound": api.namespace.outbound_queue,
    }[kind](owner_id)
    letter_id = await dead_letter(
        api.broker,
        api.namespace,
        owner_id,
        body,
        source_queue=queue,
        reason=reason,
        store=api.store,
        queue_copy=False,
    )
    assert letter_id is not None
    return letter_id


async def take(api: Api, queue: str, count: int) -> list[bytes]:
    """The next `count` bodies on `queue`, acked."""
    bodies = []
    async with api.broker.consume(queue, prefetch=count) as consumer:
        for _ in range(count):
            with trio.fail_after(5):
                delivery = await consumer.receive()
            bodies.append(delivery.body)
            await consumer.ack(delivery)
    return bodies


async def test_dead_letters_are_listed_oldest_first_with_their_bodies(api: Api) -> None:
    cid = await api.create_channel()
    msg = VumiMessage(from_addr="+1", to_addr="2", content="hi")
    event = VumiEvent(event_type=EventType.ACK, user_message_id="m1", sent_message_id="p")
    first = await bury(api, cid, encode_payload(msg), "inbound", "mo_url gave up")
    second = await bury(api, cid, encode_payload(event), "event")
    third = await bury(api, cid, b"\xffjunk", "outbound", "undecodable")
    status, payload = await call(api, "GET", f"/channels/{cid}/dead_letters")
    assert status == 200, payload
    letters = payload["result"]
    assert [letter["id"] for letter in letters] == [first, second, third]
    assert [letter["source"] for letter in letters] == ["inbound", "event", "outbound"]
    assert letters[0]["reason"] == "mo_url gave up"
    assert letters[0]["queue"] == api.namespace.inbound_queue(cid)
    assert letters[0]["body"] == msg.model_dump(mode="json")
    assert letters[1]["body"]["event_id"] == event.event_id
    assert letters[2]["body"] is None
    assert letters[2]["raw_body"] == "/2p1bms="
    assert all(letter["owner_id"] == cid for letter in letters)
    assert all(letter["dead_lettered_at"] for letter in letters)


async def test_dead_lettering_the_same_body_twice_keeps_one(api: Api) -> None:
    """A redelivery after a crash between dead-lettering and the ack makes no duplicate."""
    cid = await api.create_channel()
    body = encode_payload(VumiMessage(from_addr="+1", to_addr="2", content="hi"))
    assert await bury(api, cid, body, "inbound") == await bury(api, cid, body, "inbound")
    _, payload = await call(api, "GET", f"/channels/{cid}/dead_letters")
    assert len(payload["result"]) == 1


async def test_replay_all_puts_each_back_on_its_source_queue_in_order(api: Api) -> None:
    cid = await api.create_channel()
    messages = [VumiMessage(from_addr="+1", to_addr="2", content=str(n)) for n in range(3)]
    for msg in messages:
        await bury(api, cid, encode_payload(msg), "inbound")
    event = VumiEvent(event_type=EventType.NACK, user_message_id="m", nack_reason="x")
    await bury(api, cid, encode_payload(event), "event")
    outbound = VumiMessage(from_addr="2", to_addr="+1", content="out")
    await bury(api, cid, encode_payload(outbound), "outbound")
    status, payload = await call(api, "POST", f"/channels/{cid}/dead_letters/replay")
    assert status == 200, payload
    assert len(payload["result"]["replayed"]) == 5
    inbound = await take(api, api.namespace.inbound_queue(cid), 3)
    assert [decode_vumi_message(body).content for body in inbound] == ["0", "1", "2"]
    (replayed_event,) = await take(api, api.namespace.event_queue(cid), 1)
    assert decode_vumi_event(replayed_event).event_id == event.event_id
    # The outbound queue is a priority queue: replaying declared it as such.
    await api.broker.declare_queue(api.namespace.outbound_queue(cid), max_priority=MAX_PRIORITY)
    (sent,) = await take(api, api.namespace.outbound_queue(cid), 1)
    assert decode_vumi_message(sent).message_id == outbound.message_id
    _, payload = await call(api, "GET", f"/channels/{cid}/dead_letters")
    assert payload["result"] == []


async def test_replay_by_ids_replays_only_those(api: Api) -> None:
    cid = await api.create_channel()
    bodies = [encode_payload(VumiMessage(from_addr="+1", to_addr="2", content=c)) for c in "ab"]
    keep, chosen = [await bury(api, cid, body, "inbound") for body in bodies]
    status, payload = await call(
        api, "POST", f"/channels/{cid}/dead_letters/replay", {"ids": [chosen]}
    )
    assert status == 200, payload
    assert payload["result"] == {"replayed": [chosen]}
    assert await take(api, api.namespace.inbound_queue(cid), 1) == [bodies[1]]
    _, payload = await call(api, "GET", f"/channels/{cid}/dead_letters")
    assert [letter["id"] for letter in payload["result"]] == [keep]


async def test_replay_of_an_unknown_id_replays_nothing(api: Api) -> None:
    cid = await api.create_channel()
    known = await bury(api, cid, b'{"x": 1}', "inbound")
    status, payload = await call(
        api, "POST", f"/channels/{cid}/dead_letters/replay", {"ids": [known, "nope"]}
    )
    assert status == 400
    description, kind, message = error_of(payload)
    assert (description, kind) == ("api usage error", "ApiUsageError")
    assert "nope" in message
    assert await api.broker.queue_length(api.namespace.inbound_queue(cid)) == 0
    _, payload = await call(api, "GET", f"/channels/{cid}/dead_letters")
    assert [letter["id"] for letter in payload["result"]] == [known]


@pytest.mark.parametrize(
    "body",
    [{"ids": "one"}, {"ids": [1]}, {"other": []}, ["x"]],
    ids=["ids-not-list", "id-not-string", "unknown-key", "not-object"],
)
async def test_replay_refuses_a_bad_body(http_api: Api, body: object) -> None:
    cid = await http_api.create_channel()
    status, payload = await call(http_api, "POST", f"/channels/{cid}/dead_letters/replay", body)
    assert status == 400
    assert payload["result"]["errors"][0]["type"] == "invalid_body"


async def test_replay_refuses_invalid_json(http_api: Api) -> None:
    cid = await http_api.create_channel()
    response = await http_api.client.post(f"/channels/{cid}/dead_letters/replay", data=b"{nope")
    assert response.status_code == 400
    assert (await response.get_json())["description"] == "json decode error"


async def test_delete_forgets_one_and_404s_after(api: Api) -> None:
    cid = await api.create_channel()
    letter = await bury(api, cid, b'{"x": 1}', "event")
    status, payload = await call(api, "DELETE", f"/channels/{cid}/dead_letters/{letter}")
    assert (status, payload["result"]) == (200, {})
    status, payload = await call(api, "DELETE", f"/channels/{cid}/dead_letters/{letter}")
    assert status == 404
    assert error_of(payload)[:2] == ("dead letter not found", "DeadLetterNotFound")
    _, payload = await call(api, "GET", f"/channels/{cid}/dead_letters")
    assert payload["result"] == []


async def test_dead_letters_of_an_unknown_channel_are_404(http_api: Api) -> None:
    for method, path in (
        ("GET", "/channels/nope/dead_letters"),
        ("POST", "/channels/nope/dead_letters/replay"),
        ("DELETE", "/channels/nope/dead_letters/x"),
    ):
        status, payload = await call(http_api, method, path)
        assert status == 404, (method, path)
        assert error_of(payload)[1] == "ChannelNotFound"


async def test_deleting_the_channel_removes_its_dead_letters(api: Api) -> None:
    cid = await api.create_channel()
    await bury(api, cid, b'{"x": 1}', "inbound")
    status, _ = await call(api, "DELETE", f"/channels/{cid}")
    assert status == 200
    assert await api.store.kv_items(f"{cid}:dead_letters") == {}


async def test_destination_dead_letters_list_replay_delete(api: Api) -> None:
    _, rid = await make_router(api)
    did = await make_destination(api, rid)
    base = f"/routers/{rid}/destinations/{did}/dead_letters"
    bodies = [encode_payload(VumiMessage(from_addr="+1", to_addr="123", content=c)) for c in "ab"]
    first, second = [await bury(api, did, body, "inbound") for body in bodies]
    status, payload = await call(api, "GET", base)
    assert status == 200, payload
    assert [letter["id"] for letter in payload["result"]] == [first, second]
    status, payload = await call(api, "DELETE", f"{base}/{second}")
    assert status == 200, payload
    status, payload = await call(api, "POST", f"{base}/replay", {})
    assert (status, payload["result"]) == (200, {"replayed": [first]})
    assert await take(api, api.namespace.inbound_queue(did), 1) == [bodies[0]]
    status, payload = await call(api, "GET", f"/routers/{rid}/destinations/nope/dead_letters")
    assert status == 404
