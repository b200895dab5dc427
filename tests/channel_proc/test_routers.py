"""Routers in the channel process: the from_address rules (table-driven), the registry and
loader, and the dispatcher with destination forwarders on both backends against a fake webhook.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from channel_proc.counters import Counters
from channel_proc.lifecycle import Shutdown
from channel_proc.routers import (
    ROUTERS,
    available_routers,
    check_router_class,
    load_router_class,
    router_schemas,
)
from channel_proc.routers.actor import RouterActor
from channel_proc.routers.base import RouterConfigError
from channel_proc.routers.destination import DestinationForwarder
from channel_proc.routers.from_address import (
    FromAddressConfig,
    FromAddressDestinationConfig,
    FromAddressRouter,
)
from channel_proc.routers.loading import load_routing
from channel_proc.transports.errors import ConfigError
from channel_proc.webhook import delivery_id
from ipc.codec import encode_payload
from ipc.exit_codes import EXIT_OK
from ipc.messages import ROUTER_CHANNEL_KEYWORD, ROUTER_DEFAULT_KEYWORD, RouterSchemas
from ipc.names import (
    ROUTERS_SCOPE,
    amqp_event_key,
    amqp_inbound_key,
    amqp_outbound_queue,
    destinations_scope,
)
from ipc.payloads import EventType, VumiEvent, VumiMessage, api_event
from ipc.settings import Settings
from supervisor.run import child_env
from tests.channel_proc.support import WAIT, StatusInbox, drain_queue, wait_for, wait_for_length

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from channel_proc.routers.loading import Routing
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.state import StateStore
    from tests.fakes.webhook import FakeWebhook

REPO = Path(__file__).resolve().parents[2]
CID = "65227a53-b785-4679-a8e6-b53115b7995a"

# --- from_address rules (pure) ------------------------------------------------------------


def make_router(**destinations: dict[str, Any]) -> FromAddressRouter:
    return FromAddressRouter(
        "r1",
        FromAddressConfig.model_validate({"channel": CID.upper()}),
        {
            did: FromAddressDestinationConfig.model_validate(config)
            for did, config in destinations.items()
        },
    )


THREE: dict[str, dict[str, Any]] = {
    "a": {"regular_expression": "^12345$"},
    "b": {"regular_expression": "^1234"},
    "c": {"regular_expression": "^never$", "default": True},
}


@pytest.mark.parametrize(
    ("destinations", "to_addr", "expected"),
    [
        pytest.param(THREE, "12345", ["a", "b"], id="every-match"),
        pytest.param(THREE, "12346", ["b"], id="one-match"),
        pytest.param(THREE, "999", ["c"], id="default"),
        pytest.param(THREE, None, ["c"], id="no-address-default"),
        pytest.param({"a": THREE["a"]}, "999", [], id="no-default-dropped"),
        pytest.param({"a": THREE["a"]}, None, [], id="no-address-dropped"),
        pytest.param({}, "12345", [], id="no-destinations"),
        pytest.param(
            {"u": {"regular_expression": r"^\*123\*4567\*1#$"}},
            "*123*4567*1#",
            ["u"],
            id="ussd-code",
        ),
    ],
)
def test_from_address_inbound(
    destinations: dict[str, dict[str, Any]], to_addr: str | None, expected: list[str]
) -> None:
    router = make_router(**destinations)
    msg = VumiMessage(to_addr=to_addr, from_addr="+27820000000")
    assert router.inbound_destinations(CID, msg) == expected


ACK = VumiEvent(event_type=EventType.ACK, user_message_id="m1")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        pytest.param({"destination_id": "a", "from": "12346"}, ["a"], id="back-to-sender"),
        pytest.param({"destination_id": "gone", "from": "12346"}, ["b"], id="sender-deleted"),
        pytest.param({"from": "12345"}, ["a", "b"], id="channel-send-by-from"),
        pytest.param({"from": "777"}, ["c"], id="channel-send-default"),
        pytest.param({"from": None}, ["c"], id="no-from-default"),
        pytest.param(None, ["c"], id="no-record-default"),
    ],
)
def test_from_address_events(record: dict[str, Any] | None, expected: list[str]) -> None:
    assert make_router(**THREE).event_destinations(CID, ACK, record) == expected


def test_from_address_channels_are_canonical_and_one_default_at_most() -> None:
    router = make_router(**THREE)
    assert router.channels() == [CID]
    assert router.outbound_channel() == CID
    assert router.default_destinations() == ["c"]
    with pytest.raises(RouterConfigError, match="more than one default"):
        make_router(x={"regular_expression": "1", "default": True}, **THREE)


def test_router_schemas_mark_channels_and_defaults() -> None:
    schemas = RouterSchemas.model_validate(router_schemas(ROUTERS)["from_address"])
    channel = schemas.config["properties"]["channel"]
    assert channel[ROUTER_CHANNEL_KEYWORD] is True
    assert channel["format"] == "uuid"
    assert schemas.config["required"] == ["channel"]
    assert schemas.config["additionalProperties"] is False
    destination = schemas.destination_config["properties"]
    assert destination["default"][ROUTER_DEFAULT_KEYWORD] is True
    assert destination["regular_expression"]["format"] == "regex"
    assert schemas.destination_config["required"] == ["regular_expression"]


# --- registry -----------------------------------------------------------------------------


def test_available_routers_add_and_replace() -> None:
    path = "channel_proc.routers.from_address:FromAddressRouter"
    added = available_routers(Settings(routers={"by_code": path}))
    assert added == {"from_address": FromAddressRouter, "by_code": FromAddressRouter}
    replaced = available_routers(Settings(routers={"only": path}, replace_routers=True))
    assert replaced == {"only": FromAddressRouter}
    assert available_routers(Settings(replace_routers=True)) == {}


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("nosuch.module:Thing", "cannot import 'nosuch.module'"),
        ("channel_proc.routers:Nope", "has no 'Nope'"),
        ("channel_proc.routers.base:Router", "is abstract"),
        ("channel_proc.transports.telnet:TelnetTransport", "is not a channel_proc Router"),
        ("justaname", "is not 'module:Class'"),
    ],
)
def test_load_router_class_errors(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_router_class(path)


def test_check_router_class_needs_pydantic_models() -> None:
    class Bare(FromAddressRouter):
        destination_config_type = dict  # type: ignore[assignment]

    with pytest.raises(ConfigError, match="destination_config_type"):
        check_router_class(Bare, "Bare")


@pytest.mark.slow
async def test_describe_format_2_lists_channel_and_router_types(tmp_path: Path) -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "channel_proc", "describe", "--format", "2"],
        env=child_env(Settings(data_dir=tmp_path)),
        cwd=str(REPO),
        capture_stdout=True,
        capture_stderr=True,
    )
    assert result.returncode == EXIT_OK
    document = json.loads(result.stdout)
    assert document["format"] == 2
    assert "telnet" in document["channels"]
    assert document["routers"] == router_schemas(ROUTERS)


# --- loading from the store ---------------------------------------------------------------


async def store_router(
    store: StateStore, channel_id: str, destinations: dict[str, dict[str, Any]], **extra: Any
) -> str:
    router_id = str(uuid.uuid4())
    properties = {"type": "from_address", "config": {"channel": channel_id}, **extra}
    await store.kv_put(
        ROUTERS_SCOPE, router_id, {"properties": properties, "channels": [channel_id]}
    )
    for did, destination in destinations.items():
        await store.kv_put(destinations_scope(router_id), did, destination)
    return router_id


async def forget_router(store: StateStore, broker: Broker, namespace: Namespace, rid: str) -> None:
    for did in await store.kv_items(destinations_scope(rid)):
        await store.delete_channel(did)
        for queue in (*namespace.channel_queues(did), namespace.dead_letter_queue(did)):
            await broker.delete_queue(queue)
    await store.kv_delete(ROUTERS_SCOPE, rid)
    await store.delete_channel(rid)


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
async def test_load_routing(settings: Settings, store: StateStore, channel_id: str) -> None:
    assert await load_routing(store, settings, channel_id) is None
    did = str(uuid.uuid4())
    destination = {"config": {"regular_expression": "^1$"}, "mo_url_token": "t", "label": "x"}
    rid = await store_router(store, channel_id, {did: destination})
    routing = await load_routing(store, settings, channel_id)
    assert routing is not None
    assert (routing.router_id, routing.channel_id, routing.home) == (rid, channel_id, True)
    assert list(routing.destinations) == [did]
    assert routing.destinations[did].properties.mo_url_token == "t"
    assert routing.destinations[did].raw == destination
    assert routing.router.channels() == [channel_id]


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
@pytest.mark.parametrize(
    ("router", "destinations", "message"),
    [
        ({"type": "nope"}, {}, "unknown router type 'nope'"),
        ({"config": {"channel": "x"}}, {}, "invalid config: channel"),
        ({}, {"d": {"config": {}}}, "destination d: invalid config: regular_expression"),
        ({}, {"d": {"config": {"regular_expression": "^1"}, "mo_url": "::"}}, "mo_url"),
        (
            {},
            {
                "d1": {"config": {"regular_expression": "1", "default": True}},
                "d2": {"config": {"regular_expression": "2", "default": True}},
            },
            "more than one default destination",
        ),
    ],
)
async def test_load_routing_refuses_invalid_routers(
    settings: Settings,
    store: StateStore,
    channel_id: str,
    router: dict[str, Any],
    destinations: dict[str, dict[str, Any]],
    message: str,
) -> None:
    await store_router(store, channel_id, destinations, **router)
    with pytest.raises(ConfigError, match=message):
        await load_routing(store, settings, channel_id)


# --- the dispatcher and destination forwarders on both backends --------------------------


@asynccontextmanager
async def running_routing(
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    routing: Routing,
    *,
    channel_signing_secret: str | None = None,
    counters: Counters | None = None,
) -> AsyncIterator[StatusInbox]:
    """The router's dispatcher and its destinations' forwarders, as the channel process runs
    them (with fast retries, sharing `counters`), until the block ends."""
    shutdown = Shutdown(grace=2.0)
    inbox = StatusInbox()
    async with httpx.AsyncClient(timeout=2.0) as http, trio.open_nursery() as nursery:
        actors: list[RouterActor | DestinationForwarder] = [
            RouterActor(
                broker=broker,
                store=store,
                namespace=namespace,
                routing=routing,
                settings=settings,
                shutdown=shutdown,
                counters=counters,
            )
        ]
        actors += [
            DestinationForwarder(
                destination=destination,
                router_id=routing.router_id,
                outbound_channel=routing.router.outbound_channel(),
                broker=broker,
                store=store,
                http=http,
                namespace=namespace,
                settings=settings,
                reporter=inbox.reporter,
                shutdown=shutdown,
                retry_initial=0.01,
                retry_cap=0.05,
                channel_signing_secret=channel_signing_secret,
                counters=counters,
            )
            for destination in routing.destinations.values()
        ]
        with trio.fail_after(WAIT):
            for actor in actors:
                await nursery.start(actor.run)
        yield inbox
        shutdown.request("test block ended")


@pytest.fixture
async def routed(
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    channel_id: str,
    webhook: FakeWebhook,
) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A from_address router on the channel: a (^12345$, token), b (^12346$), c (default)."""
    ids = {name: str(uuid.uuid4()) for name in "abc"}
    destinations = {
        ids["a"]: {
            "config": {"regular_expression": "^12345$"},
            "mo_url": webhook.url("/a/mo"),
            "mo_url_token": "token-a",
        },
        ids["b"]: {"config": {"regular_expression": "^12346$"}, "mo_url": webhook.url("/b/mo")},
        ids["c"]: {
            "config": {"regular_expression": "^none$", "default": True},
            "mo_url": webhook.url("/c/mo"),
        },
    }
    rid = await store_router(store, channel_id, destinations)
    try:
        yield rid, ids
    finally:
        await forget_router(store, broker, namespace, rid)


async def rate_since(store: StateStore, owner: str, label: str, since: int) -> int:
    """Sum of the label's counters from bucket `since` to now (a bucket may roll over)."""
    total = 0
    for bucket in range(since, int(time.time() / 10.0) + 1):
        total += (await store.get_rates(owner, [label], bucket))[label]
    return total


async def test_inbound_reaches_only_its_destination(
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    channel_id: str,
    webhook: FakeWebhook,
    routed: tuple[str, dict[str, str]],
) -> None:
    rid, ids = routed
    bucket = int(time.time() / 10.0)
    messages = {
        name: VumiMessage(
            to_addr=to, from_addr="+27820000000", content=name, transport_name=channel_id
        )
        for name, to in (("a", "12345"), ("b", "12346"), ("c", "99999"))
    }
    for msg in messages.values():
        await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))
    routing = await load_routing(store, settings, channel_id)
    assert routing is not None
    async with running_routing(settings, namespace, store, broker, routing):
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(3)
    by_path = {request.path: request for request in webhook.requests}
    assert sorted(by_path) == ["/a/mo", "/b/mo", "/c/mo"]
    for name, msg in messages.items():
        request = by_path[f"/{name}/mo"]
        assert request.json()["message_id"] == msg.message_id
        # The channel it arrived on, as the original.
        assert request.json()["channel_id"] == channel_id
        stored = msg.model_dump(mode="json")
        assert await store.get_inbound(ids[name], msg.message_id, 60) == stored
        assert await store.get_inbound(channel_id, msg.message_id, 60) == stored
        assert await rate_since(store, ids[name], "inbound", bucket) == 1
    assert by_path["/a/mo"].headers["authorization"] == "Token token-a"
    assert "authorization" not in by_path["/b/mo"].headers
    assert await rate_since(store, channel_id, "inbound", bucket) == 3
    assert await rate_since(store, rid, "inbound", bucket) == 3
    for owner in (channel_id, *ids.values()):
        assert await broker.queue_length(namespace.inbound_queue(owner)) == 0


async def test_events_go_back_to_the_destination_that_sent_the_message(
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    channel_id: str,
    webhook: FakeWebhook,
    routed: tuple[str, dict[str, str]],
) -> None:
    rid, ids = routed
    # Sent by a (whose regex would not match "12346"), and through the channel from "12346".
    by_a = {"message_id": "m-a", "from": "12346", "event_url": webhook.url("/a/ev"),
            "destination_id": ids["a"], "router_id": rid}  # fmt: skip
    by_channel = {"message_id": "m-ch", "from": "12346", "event_url": webhook.url("/ch/ev")}
    await store.put_outbound(channel_id, "m-a", by_a, 60)
    await store.put_outbound(ids["a"], "m-a", by_a, 60)
    await store.put_outbound(channel_id, "m-ch", by_channel, 60)
    events = {
        mid: VumiEvent(event_type=EventType.ACK, user_message_id=mid, transport_name=channel_id)
        for mid in ("m-a", "m-ch")
    }
    for event in events.values():
        await broker.publish(namespace.event_queue(channel_id), encode_payload(event))
    routing = await load_routing(store, settings, channel_id)
    assert routing is not None
    async with running_routing(settings, namespace, store, broker, routing):
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(2)
    by_path = {request.path: request.json() for request in webhook.requests}
    assert by_path == {
        "/a/ev": api_event(events["m-a"], ids["a"]),
        "/ch/ev": api_event(events["m-ch"], ids["b"]),
    }
    for mid, owner in (("m-a", ids["a"]), ("m-ch", ids["b"])):
        for where in (channel_id, owner):
            record = await store.get_outbound(where, mid, 60)
            assert record is not None
            kept = [e for e in record.events if e["message_type"] == "event"]
            assert [e["event_id"] for e in kept] == [events[mid].event_id]
    record = await store.get_outbound(ids["c"], "m-a", 60)
    assert record is None


async def test_a_failing_destination_does_not_hold_up_the_others(
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    channel_id: str,
    webhook: FakeWebhook,
    routed: tuple[str, dict[str, str]],
) -> None:
    _, ids = routed
    webhook.fail_path("/a/mo")
    first = VumiMessage(to_addr="12345", from_addr="+1", content="to a")
    second = VumiMessage(to_addr="12346", from_addr="+1", content="to b")
    for msg in (first, second):
        await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))
    routing = await load_routing(store, settings, channel_id)
    assert routing is not None
    async with running_routing(settings, namespace, store, broker, routing) as inbox:
        with trio.fail_after(WAIT):
            await webhook.wait_for_requests(1, path="/b/mo", delivered_only=True)
            await webhook.wait_for_requests(2, path="/a/mo")
        assert webhook.on_path("/a/mo") == []
        webhook.come_up()
        with trio.fail_after(WAIT):
            [delivered] = await webhook.wait_for_requests(1, path="/a/mo", delivered_only=True)
        assert delivered.json()["message_id"] == first.message_id
        await wait_for_length(broker, namespace.inbound_queue(ids["a"]), 0)
    components = {report.component for report in inbox.reports()}
    assert f"destination:{ids['a']}:mo_url" in components


async def test_unmatched_without_default_is_logged_and_dropped(
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    channel_id: str,
    webhook: FakeWebhook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    did = str(uuid.uuid4())
    rid = await store_router(
        store, channel_id, {did: {"config": {"regular_expression": "^1$"}, "mo_url": webhook.url()}}
    )
    try:
        msg = VumiMessage(to_addr="2", from_addr="+1")
        await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))
        routing = await load_routing(store, settings, channel_id)
        assert routing is not None
        async with running_routing(settings, namespace, store, broker, routing):
            await wait_for_length(broker, namespace.inbound_queue(channel_id), 0)

            async def logged() -> bool:
                return any("dropped" in r.getMessage() for r in caplog.records)

            with trio.fail_after(WAIT):
                await wait_for(logged)
        [record] = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert record.name == f"junebug.router.{rid}"
        assert msg.message_id in record.getMessage()
        assert webhook.requests == []
        assert await broker.queue_length(namespace.inbound_queue(did)) == 0
    finally:
        await forget_router(store, broker, namespace, rid)


@pytest.mark.parametrize("settings", ["redis+rabbitmq"], indirect=True)
async def test_destination_amqp_queue_in_and_out(
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    channel_id: str,
) -> None:
    amqp_queue = f"jbtest-{uuid.uuid4().hex[:12]}"
    queues = [
        amqp_inbound_key(amqp_queue),
        amqp_event_key(amqp_queue),
        amqp_outbound_queue(amqp_queue),
    ]
    for queue in queues:
        await broker.declare_queue(queue)
    did = str(uuid.uuid4())
    rid = await store_router(
        store,
        channel_id,
        {did: {"config": {"regular_expression": "^1$"}, "amqp_queue": amqp_queue}},
    )
    try:
        inbound = VumiMessage(to_addr="1", from_addr="+1", transport_name=channel_id)
        outbound = VumiMessage(to_addr="+1", from_addr="1", content="from the app")
        await broker.publish(namespace.inbound_queue(channel_id), encode_payload(inbound))
        await broker.publish(amqp_outbound_queue(amqp_queue), encode_payload(outbound))
        routing = await load_routing(store, settings, channel_id)
        assert routing is not None
        async with running_routing(settings, namespace, store, broker, routing):
            assert await drain_queue(broker, amqp_inbound_key(amqp_queue), 1) == [
                encode_payload(inbound)
            ]
            relayed = await drain_queue(broker, namespace.outbound_queue(channel_id), 1)
            assert relayed == [encode_payload(outbound)]
            # Its event comes back to the destination's queue: the relay recorded the sender.
            event = VumiEvent(event_type=EventType.ACK, user_message_id=outbound.message_id)
            await broker.publish(namespace.event_queue(channel_id), encode_payload(event))
            assert await drain_queue(broker, amqp_event_key(amqp_queue), 1) == [
                encode_payload(event)
            ]
        for owner in (channel_id, did):
            record = await store.get_outbound(owner, outbound.message_id, 60)
            assert record is not None
            assert record.message is not None
            assert record.message["destination_id"] == did
    finally:
        await forget_router(store, broker, namespace, rid)
        for queue in queues:
            await broker.delete_queue(queue)


async def test_destination_webhooks_templates_signatures_and_counters(
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    channel_id: str,
    webhook: FakeWebhook,
) -> None:
    """A destination signs with its own signing_secret, else the channel's; its mo_url may be
    a template; the dispatcher counts the channel's traffic once, the destination forwarders
    count their webhook failures; attempts land in the destination's timeline."""
    own, inherits = str(uuid.uuid4()), str(uuid.uuid4())
    rid = await store_router(
        store,
        channel_id,
        {
            own: {
                "config": {"regular_expression": "^1$"},
                "mo_url": webhook.url("/own/{channel_id}/{message_id}?to={to}"),
                "signing_secret": "destination-secret",
            },
            inherits: {"config": {"regular_expression": "^2$"}, "mo_url": webhook.url("/inh")},
        },
    )
    try:
        to_own = VumiMessage(to_addr="1", from_addr="+1", transport_name=channel_id)
        to_inherits = VumiMessage(to_addr="2", from_addr="+1", transport_name=channel_id)
        webhook.fail_next(1, status=500)
        for msg in (to_own, to_inherits):
            await broker.publish(namespace.inbound_queue(channel_id), encode_payload(msg))
        routing = await load_routing(store, settings, channel_id)
        assert routing is not None
        counters = Counters()
        async with running_routing(
            settings,
            namespace,
            store,
            broker,
            routing,
            channel_signing_secret="channel-secret",
            counters=counters,
        ):
            with trio.fail_after(WAIT):
                await webhook.wait_for_requests(2, delivered_only=True)
            for did in (own, inherits):
                await wait_for_length(broker, namespace.inbound_queue(did), 0)
        [own_request] = webhook.on_path(f"/own/{channel_id}/{to_own.message_id}?to=1")
        [inherits_request] = webhook.on_path("/inh")
        secrets = {"destination-secret": own_request, "channel-secret": inherits_request}
        for secret, request in secrets.items():
            digest = hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
            assert request.headers["x-junebug-signature"] == f"sha256={digest}"
        assert own_request.headers["x-junebug-delivery"] == delivery_id("mo_url", to_own.message_id)
        assert counters.value("messages_in_total") == 2
        assert counters.value("webhook_failures_total", "mo_url") == 1
        failed_attempts = 0
        for did, msg in ((own, to_own), (inherits, to_inherits)):
            record = await store.get_outbound(did, msg.message_id, 60)
            assert record is not None
            attempts = [e["details"] for e in record.events if e["message_type"] == "timeline"]
            assert attempts[-1]["delivered"] is True
            assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
            failed_attempts += len(attempts) - 1
        assert failed_attempts == 1
    finally:
        await forget_router(store, broker, namespace, rid)
