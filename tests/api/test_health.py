"""GET /health: store and broker checks, the RabbitMQ queue report (11, Q17 fixed), and 503s."""

from __future__ import annotations

import base64
import socket
from contextlib import closing
from typing import TYPE_CHECKING, Any

import trio

from ipc.settings import RedisSettings
from tests.api.fake_management import FakeManagement, serving
from tests.api.harness import open_api

if TYPE_CHECKING:
    from pathlib import Path

    from ipc.settings import Settings
    from tests.api.harness import Api

JsonObject = dict[str, Any]


async def _health(api: Api) -> tuple[int, JsonObject]:
    response = await api.client.get("/health")
    payload: JsonObject = await response.get_json()
    return response.status_code, payload


def _queue(name: str, messages: int, stats: JsonObject | None = None) -> JsonObject:
    body: JsonObject = {"name": name, "messages": messages, "vhost": "/"}
    if stats is not None:
        body["message_stats"] = stats
    return body


async def test_fake_management_answers_404_for_unknown_queues() -> None:
    fake = FakeManagement(queues={"q": _queue("q", 1)})
    async with serving(fake) as address:
        host, port = address.split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(b"GET /api/queues/%2F/x HTTP/1.1\r\nHost: a\r\n\r\n")
            head = await stream.receive_some()
    assert head.startswith(b"HTTP/1.1 404")
    assert fake.requests == [("/api/queues/%2F/x", None)]


async def test_queue_report_marks_stuck_queues(
    embedded_settings: Settings, socket_dir: Path
) -> None:
    fake = FakeManagement()
    async with serving(fake) as address:
        settings = embedded_settings.model_copy(update={"rabbitmq_management_interface": address})
        async with open_api(settings, socket_dir) as api:
            channel_id = await api.create_channel()
            inbound, outbound, event = api.namespace.channel_queues(channel_id)
            fake.queues[inbound] = _queue(inbound, 3, {"ack_details": {"rate": 0.0}})
            fake.queues[outbound] = _queue(outbound, 7)
            # Q17: statistics without ack_details mean no rate, not an error.
            fake.queues[event] = _queue(event, 2, {"publish_details": {"rate": 1.0}})
            status, payload = await _health(api)
    assert status == 500
    assert payload["description"] == "queues stuck"
    assert payload["result"] == [
        {"name": inbound, "stuck": True, "messages": 3, "rate": 0.0},
        {"name": outbound, "stuck": False, "messages": 7},
        {"name": event, "stuck": False, "messages": 2},
    ]
    token = base64.b64encode(b"guest:guest").decode()
    assert sorted(fake.requests) == sorted(
        (f"/api/queues/%2F/{queue}", f"Basic {token}") for queue in (inbound, outbound, event)
    )


async def test_queue_report_ok_skips_missing_queues(
    embedded_settings: Settings, socket_dir: Path
) -> None:
    fake = FakeManagement()
    async with serving(fake) as address:
        settings = embedded_settings.model_copy(update={"rabbitmq_management_interface": address})
        async with open_api(settings, socket_dir) as api:
            channel_id = await api.create_channel()
            inbound = api.namespace.inbound_queue(channel_id)
            fake.queues[inbound] = _queue(inbound, 4, {"ack_details": {"rate": 1.5}})
            status, payload = await _health(api)
    assert status == 200
    assert payload["description"] == "queues ok"
    assert payload["result"] == [{"name": inbound, "stuck": False, "messages": 4, "rate": 1.5}]


def _closed_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_failed_management_request_is_503(
    embedded_settings: Settings, socket_dir: Path
) -> None:
    settings = embedded_settings.model_copy(
        update={"rabbitmq_management_interface": f"127.0.0.1:{_closed_port()}"}
    )
    async with open_api(settings, socket_dir) as api:
        await api.create_channel()
        status, payload = await _health(api)
    assert status == 503
    assert payload["description"] == "rabbitmq management interface unavailable"
    assert payload["result"]["errors"][0]["type"] == "ManagementApiError"


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        async for chunk in source:
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _serve_proxy(
    target_port: int,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A TCP relay; cancelling `scope` cuts every relayed connection and closes the port."""
    with scope:
        await _relay_forever(target_port, task_status)


async def _relay_forever(target_port: int, task_status: trio.TaskStatus[int]) -> None:

    async def relay(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", target_port)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream)
            await _pump(upstream, client)
            nursery.cancel_scope.cancel()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(relay, listeners)


async def test_store_unreachable_is_503(redis_settings: Settings, socket_dir: Path) -> None:
    """Redis goes away under a running API: requests answer 503 naming the store."""
    assert redis_settings.redis is not None
    cut = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_proxy, redis_settings.redis.port, cut)
        settings = redis_settings.model_copy(
            update={"redis": RedisSettings(host="127.0.0.1", port=port)}
        )
        # Nothing is written, and with Redis cut off there is nothing to clean up through.
        async with open_api(settings, socket_dir, cleanup=False) as api:
            response = await api.client.get("/channels/")
            assert response.status_code == 200
            cut.cancel()
            for path in ("/channels/", "/health"):
                response = await api.client.get(path)
                payload = await response.get_json()
                assert response.status_code == 503, path
                assert payload["code"] == "Service Unavailable"
                assert payload["description"] == "state store unavailable"
                assert payload["result"]["errors"][0]["type"] == "StoreUnavailableError"
