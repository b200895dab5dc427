"""GET /health with `rabbitmq_management_interface` (docs 1.8.5, behaviour 11) through the real
gateway and RabbitMQ's real management plugin.

Needs the plugin: `rabbitmq-plugins enable rabbitmq_management` (it listens on 15672).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio

from tests.e2e.gateway import free_port, remember_channel, running_gateway, wait_for
from tests.e2e.test_getting_started import assert_envelope, connect_telnet, mo_messages
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MANAGEMENT: Final = os.environ.get("JUNEBUG_TEST_RABBITMQ_MANAGEMENT", "127.0.0.1:15672")
#: RabbitMQ refreshes queue statistics every 5 s; a rate falls to 0 a sample or two later.
STATS_WAIT: Final = 45

JsonObject = dict[str, Any]


@pytest.fixture
async def management(redis_settings: Settings) -> str:
    """The management interface's host:port; skipped (with the fix) when it does not answer."""
    amqp = redis_settings.amqp
    assert amqp is not None
    auth = (amqp.username, amqp.password.get_secret_value())
    try:
        async with httpx.AsyncClient(auth=auth, timeout=5) as client:
            response = await client.get(f"http://{MANAGEMENT}/api/overview")
    except httpx.TransportError:
        pytest.skip(
            f"the RabbitMQ management plugin does not answer on {MANAGEMENT}: run "
            "`rabbitmq-plugins enable rabbitmq_management` (or set "
            "JUNEBUG_TEST_RABBITMQ_MANAGEMENT=host:port)"
        )
    assert response.status_code == 200, response.text
    return MANAGEMENT


async def health_until(gateway: Gateway, status: int, check: Any = None) -> JsonObject:
    """GET /health until it answers `status` (and `check(body)` holds); the last body."""
    last: JsonObject = {}

    async def answered() -> bool:
        response = await gateway.request("GET", "/health")
        last.clear()
        last.update(response.json())
        return response.status_code == status and (check is None or check(last))

    with trio.fail_after(STATS_WAIT):
        await wait_for(answered)
    return last


def item(body: JsonObject, queue: str) -> JsonObject | None:
    return next((i for i in body["result"] if i["name"] == queue), None)


async def test_health_reports_queues_ok_then_stuck(
    redis_settings: Settings, management: str
) -> None:
    namespace_prefix = redis_settings.namespace
    telnet_port = free_port()
    flags = ["--rabbitmq-management-interface", management]
    async with (
        open_fake_webhook() as hook,
        running_gateway(redis_settings, extra_args=flags) as gateway,
    ):
        response = await gateway.request(
            "POST",
            "/channels/",
            {
                "type": "telnet",
                "config": {"twisted_endpoint": f"tcp:{telnet_port}"},
                "mo_url": hook.url("/mo"),
            },
        )
        assert response.status_code == 201, response.json()
        cid = response.json()["result"]["id"]
        remember_channel(redis_settings, cid)
        queues = {f"{namespace_prefix}.{cid}.{kind}" for kind in ("inbound", "outbound", "event")}
        inbound = f"{namespace_prefix}.{cid}.inbound"

        # Healthy: one message delivered and acked; nothing waiting.
        user = await connect_telnet(gateway, cid, telnet_port)
        await mo_messages(hook, 1)

        def all_ok_and_acked(body: JsonObject) -> bool:
            found = item(body, inbound)
            # RabbitMQ's management API gives a new queue's counts only from its first
            # statistics emission (every 5 s, each queue on its own timer): until then the
            # report leaves that queue out, as the original did.
            listed = {i["name"] for i in body["result"]} == queues
            return listed and found is not None and "rate" in found and found["messages"] == 0

        healthy = await health_until(gateway, 200, all_ok_and_acked)
        assert_envelope(healthy, 200, "queues ok")
        assert {i["name"] for i in healthy["result"]} == queues
        for entry in healthy["result"]:
            assert entry["stuck"] is False
            assert set(entry) - {"rate"} == {"name", "stuck", "messages"}

        # mo_url goes down: inbound messages wait, and nothing is acked any more.
        hook.fail_path("/mo")
        for n in range(3):
            await user.type(f"line {n}")

        def inbound_stuck(body: JsonObject) -> bool:
            found = item(body, inbound)
            return found is not None and found["stuck"] is True

        stuck = await health_until(gateway, 500, inbound_stuck)
        assert_envelope(stuck, 500, "queues stuck")
        found = item(stuck, inbound)
        assert found is not None
        assert found["messages"] > 0
        assert found["rate"] == 0
        assert {i["name"] for i in stuck["result"]} == queues

        # mo_url comes back: the backlog drains and the queues are ok again.
        hook.come_up()
        recovered = await health_until(gateway, 200, all_ok_and_acked)
        assert_envelope(recovered, 200, "queues ok")
        await user.stream.aclose()
