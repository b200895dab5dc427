"""AMQP integration (docs 1.9) through the real gateway, with an external AMQP application.

The application is a plain aiormq program of its own (not our ipc adapter): it binds the
documented routing keys on exchange `vumi` to queues it names itself, reads vumi JSON from
them and publishes vumi JSON to `{amqp_queue}.outbound`.
"""

from __future__ import annotations

import asyncio  # noqa: TID251 - the external application is an asyncio program of its own
import json
import re
import uuid
from typing import TYPE_CHECKING, Any, Final

import aiormq  # noqa: TID251 - the external application's own AMQP client, not ipc's adapter
import pytest
import trio
from pamqp.commands import Basic

from ipc.names import EXCHANGE
from tests.e2e.gateway import WAIT, free_port, remember_channel, running_gateway, wait_for
from tests.e2e.test_getting_started import assert_envelope, connect_telnet, mo_messages
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from ipc.settings import AmqpSettings, Settings
    from tests.e2e.gateway import Gateway

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Seconds the application waits for messages before the test fails.
RECEIVE_TIMEOUT: Final = 20.0
VUMI_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
#: Every field of the docs' example message (section 1.9).
DOCS_MESSAGE_FIELDS: Final = frozenset(
    {
        "transport_name",
        "from_addr_type",
        "group",
        "from_addr",
        "timestamp",
        "in_reply_to",
        "provider",
        "to_addr",
        "routing_metadata",
        "message_id",
        "content",
        "to_addr_type",
        "message_version",
        "transport_type",
        "helper_metadata",
        "transport_metadata",
        "session_event",
        "message_type",
    }
)

JsonObject = dict[str, Any]


class ExternalApp:
    """An application on the other end of `amqp_queue`, as docs 1.9 tell users to write it.

    Each call runs a short asyncio program (its own connection) in a worker thread.
    """

    def __init__(self, amqp: AmqpSettings, amqp_queue: str) -> None:
        password = amqp.password.get_secret_value()
        self._url = f"amqp://{amqp.username}:{password}@{amqp.hostname}:{amqp.port}/"
        self.amqp_queue = amqp_queue

    def own_queue(self, kind: str) -> str:
        """The queue the app binds `{amqp_queue}.{kind}` to: a name of its own choosing."""
        return f"app-{self.amqp_queue}-{kind}"

    async def _run(self, program: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return await trio.to_thread.run_sync(lambda: asyncio.run(program()))

    async def bind(self) -> None:
        async def program() -> None:
            conn = await aiormq.connect(self._url)
            try:
                channel = await conn.channel()
                await channel.exchange_declare(EXCHANGE, exchange_type="direct", durable=True)
                for kind in ("inbound", "event"):
                    queue = self.own_queue(kind)
                    await channel.queue_declare(queue, durable=True)
                    await channel.queue_bind(
                        queue, EXCHANGE, routing_key=f"{self.amqp_queue}.{kind}"
                    )
            finally:
                await conn.close()

        await self._run(program)

    async def receive(self, kind: str, count: int) -> list[JsonObject]:
        """Consume and ack `count` messages from the app's `kind` queue."""

        async def program() -> list[JsonObject]:
            conn = await aiormq.connect(self._url)
            try:
                channel = await conn.channel()
                await channel.basic_qos(prefetch_count=count)
                received: list[Any] = []
                enough = asyncio.get_running_loop().create_future()

                async def on_message(message: Any) -> None:
                    received.append(message)
                    if len(received) == count and not enough.done():
                        enough.set_result(None)

                await channel.basic_consume(self.own_queue(kind), on_message, no_ack=False)
                await asyncio.wait_for(enough, RECEIVE_TIMEOUT)
                for message in received:
                    await channel.basic_ack(message.delivery_tag)
                return [json.loads(message.body) for message in received]
            finally:
                await conn.close()

        result: list[JsonObject] = await self._run(program)
        return result

    async def send(self, message: JsonObject) -> None:
        """Publish a vumi message for `{amqp_queue}.outbound` (persistent, confirmed)."""

        async def program() -> None:
            conn = await aiormq.connect(self._url)
            try:
                channel = await conn.channel(publisher_confirms=True)
                await channel.basic_publish(
                    json.dumps(message).encode(),
                    exchange=EXCHANGE,
                    routing_key=f"{self.amqp_queue}.outbound",
                    properties=Basic.Properties(delivery_mode=2, content_type="application/json"),
                    mandatory=True,
                )
            finally:
                await conn.close()

        await self._run(program)

    async def delete_queues(self) -> None:
        """The app's queues, and those the gateway declared for the routing keys."""

        async def program() -> None:
            conn = await aiormq.connect(self._url)
            try:
                channel = await conn.channel()
                for kind in ("inbound", "event", "outbound"):
                    await channel.queue_delete(self.own_queue(kind))
                    await channel.queue_delete(f"{self.amqp_queue}.{kind}")
            finally:
                await conn.close()

        await self._run(program)


def amqp_settings(settings: Settings) -> AmqpSettings:
    assert settings.amqp is not None, "these tests need the RabbitMQ backend"
    return settings.amqp


async def create_channel(gateway: Gateway, telnet_port: int, **extra: Any) -> str:
    response = await gateway.request(
        "POST",
        "/channels/",
        {"type": "telnet", "config": {"twisted_endpoint": f"tcp:{telnet_port}"}, **extra},
    )
    body = response.json()
    assert response.status_code == 201, body
    for key, value in extra.items():
        assert body["result"][key] == value
    channel_id: str = body["result"]["id"]
    remember_channel(gateway.settings, channel_id)
    return channel_id


def assert_vumi_inbound(msg: JsonObject, channel_id: str, session_event: str) -> None:
    assert set(msg) >= DOCS_MESSAGE_FIELDS
    assert msg["message_type"] == "user_message"
    assert msg["message_version"] == "20110921"
    assert msg["transport_name"] == channel_id
    assert msg["transport_type"] == "telnet"
    assert msg["session_event"] == session_event
    assert re.fullmatch(r"[0-9a-f]{32}", msg["message_id"])
    assert VUMI_TIMESTAMP.match(msg["timestamp"])
    assert msg["in_reply_to"] is None
    assert msg["group"] is None
    for field in ("helper_metadata", "transport_metadata", "routing_metadata"):
        assert isinstance(msg[field], dict)


async def test_amqp_queue_channel_talks_vumi_to_an_external_app(redis_settings: Settings) -> None:
    app = ExternalApp(amqp_settings(redis_settings), f"jbtest-app-{uuid.uuid4().hex[:10]}")
    telnet_port = free_port()
    await app.bind()
    try:
        async with running_gateway(redis_settings) as gateway:
            cid = await create_channel(gateway, telnet_port, amqp_queue=app.amqp_queue)
            user = await connect_telnet(gateway, cid, telnet_port)

            # Inbound: the session start, then a typed line, as vumi JSON on `.inbound`.
            (new,) = await app.receive("inbound", 1)
            assert_vumi_inbound(new, cid, "new")
            assert new["from_addr"] == user.address
            assert new["to_addr"] == f"0.0.0.0:{telnet_port}"
            assert new["content"] is None
            await user.type("Hi app")
            (resume,) = await app.receive("inbound", 1)
            assert_vumi_inbound(resume, cid, "resume")
            assert resume["content"] == "Hi app"

            # Outbound: a reply the app publishes reaches the telnet user...
            reply_id = uuid.uuid4().hex
            await app.send(
                {
                    "message_type": "user_message",
                    "message_version": "20110921",
                    "message_id": reply_id,
                    "timestamp": "2016-03-18 11:49:37.000000",
                    "to_addr": resume["from_addr"],
                    "from_addr": resume["to_addr"],
                    "in_reply_to": resume["message_id"],
                    "session_event": "resume",
                    "content": "Hello from the app",
                    "transport_name": cid,
                    "transport_type": "telnet",
                    "helper_metadata": {},
                    "transport_metadata": {},
                    "routing_metadata": {},
                }
            )
            assert await user.read_line() == "Hello from the app"

            # ...and its ack comes back on `.event`.
            (ack,) = await app.receive("event", 1)
            assert ack["message_type"] == "event"
            assert ack["event_type"] == "ack"
            assert ack["user_message_id"] == reply_id
            assert ack["transport_name"] == cid
            assert ack["sent_message_id"]
            assert re.fullmatch(r"[0-9a-f]{32}", ack["event_id"])
            assert VUMI_TIMESTAMP.match(ack["timestamp"])

            # The gateway kept the event: the message's status shows it.
            async def status_has_event() -> bool:
                status = await gateway.request("GET", f"/channels/{cid}/messages/{reply_id}")
                return bool(status.json()["result"]["events"])

            with trio.fail_after(WAIT):
                await wait_for(status_has_event)
            status = (await gateway.request("GET", f"/channels/{cid}/messages/{reply_id}")).json()
            assert_envelope(status, 200, "message status")
            assert status["result"]["last_event_type"] == "submitted"

            # Closing the session is an inbound "close" message too.
            await user.stream.aclose()
            (close,) = await app.receive("inbound", 1)
            assert_vumi_inbound(close, cid, "close")
    finally:
        await app.delete_queues()


async def test_channel_with_mo_url_and_amqp_queue_gets_both(redis_settings: Settings) -> None:
    app = ExternalApp(amqp_settings(redis_settings), f"jbtest-app-{uuid.uuid4().hex[:10]}")
    telnet_port = free_port()
    await app.bind()
    try:
        async with open_fake_webhook() as hook, running_gateway(redis_settings) as gateway:
            cid = await create_channel(
                gateway, telnet_port, amqp_queue=app.amqp_queue, mo_url=hook.url("/mo")
            )
            user = await connect_telnet(gateway, cid, telnet_port)
            (posted,) = await mo_messages(hook, 1)
            (published,) = await app.receive("inbound", 1)
            assert posted["message_id"] == published["message_id"]
            assert posted["channel_data"] == {"session_event": "new"}
            assert_vumi_inbound(published, cid, "new")

            # An HTTP send: its events go to event_url and to `.event`.
            response = await gateway.request(
                "POST",
                f"/channels/{cid}/messages/",
                {"to": user.address, "content": "over http", "event_url": hook.url("/ev")},
            )
            assert response.status_code == 201, response.json()
            mid = response.json()["result"]["message_id"]
            assert await user.read_line() == "over http"
            with trio.fail_after(WAIT):
                (event,) = await hook.wait_for_requests(1, path="/ev", delivered_only=True)
            assert (event.json()["event_type"], event.json()["message_id"]) == ("submitted", mid)
            (ack,) = await app.receive("event", 1)
            assert (ack["event_type"], ack["user_message_id"]) == ("ack", mid)
            await user.stream.aclose()
    finally:
        await app.delete_queues()


async def test_amqp_queue_is_refused_on_the_embedded_backend(embedded_settings: Settings) -> None:
    async with running_gateway(embedded_settings) as gateway:
        config = {"twisted_endpoint": f"tcp:{free_port()}"}
        response = await gateway.request(
            "POST", "/channels/", {"type": "telnet", "config": config, "amqp_queue": "app"}
        )
        body = response.json()
        assert_envelope(body, 400, "api usage error")
        (error,) = body["result"]["errors"]
        assert "amqp_queue needs a RabbitMQ broker" in error["message"]
        assert (await gateway.request("GET", "/channels/")).json()["result"] == []

        # Adding it later is refused the same way, and the channel is left as it was.
        cid = await create_channel(gateway, free_port())
        response = await gateway.request("POST", f"/channels/{cid}", {"amqp_queue": "app"})
        assert_envelope(response.json(), 400, "api usage error")
        found = (await gateway.request("GET", f"/channels/{cid}")).json()["result"]
        assert "amqp_queue" not in found
