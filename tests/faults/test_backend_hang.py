"""Fault 3, the quiet kind: RabbitMQ or Redis stops answering without closing anything.

RabbitMQ's connections stay open through a relay that stops moving bytes; Redis is paused
with SIGSTOP. Under a steady send rate, every API request still ends in bounded time, with
503 naming the backend, and everything resumes once the backend answers again: every
message the API accepted is sent, with its event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import httpx
import pytest
import trio

from ipc.broker_amqp import OPERATION_TIMEOUT
from ipc.state_redis import SOCKET_TIMEOUT, THREAD_WAIT
from tests.e2e.gateway import WAIT, running_gateway, wait_for
from tests.fakes.webhook import open_fake_webhook
from tests.faults.harness import (
    REQUEST_TIMEOUT,
    create_smpp_channel,
    open_sender,
    open_timed_smsc,
    wait_all_events,
    wait_all_submitted,
    wait_smpp_bound,
)

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.faults.harness import PrivateRedis, RelayProxy, Sender

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE: Final = 10.0
#: Beyond the backend's own timeout: the rest of the request, on a busy 2-core machine.
SLACK: Final = 4.0
#: The longest a request may wait on a paused Redis: for a thread, then for its answer.
REDIS_BOUND: Final = THREAD_WAIT + SOCKET_TIMEOUT + SLACK
AMQP_BOUND: Final = OPERATION_TIMEOUT + SLACK


async def timed(
    gateway: Gateway, method: str, path: str, body: Any = None
) -> tuple[int, Any, float]:
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        began = trio.current_time()
        response = await client.request(method, f"{gateway.base_url}{path}", json=body)
        return response.status_code, response.json(), trio.current_time() - began


#: How long each hang lasts beyond the probes: requests sent in the middle of an outage
#: longer than one backend timeout must be refused in bounded time too.
HOLD: Final = 3.0


async def hold_and_probe(gateway: Gateway, cid: str, bound: float, description: str) -> None:
    """While the backend hangs, a send and a health check each get 503 within `bound` s;
    then the hang goes on for HOLD seconds under the steady sender."""
    probes = [
        ("POST", f"/channels/{cid}/messages/", {"to": "2782", "content": "probe"}),
        ("GET", "/health", None),
    ]
    results: list[tuple[int, Any, float]] = []

    async def one(method: str, path: str, body: Any) -> None:
        results.append(await timed(gateway, method, path, body))

    async with trio.open_nursery() as nursery:
        for method, path, body in probes:
            nursery.start_soon(one, method, path, body)
    for status, answer, took in results:
        assert (status, answer["description"]) == (503, description), answer
        assert took < bound, f"answered in {took:.1f} s"
    # The fault's duration, not a synchronisation: nothing is waited for.
    await trio.sleep(HOLD)


async def wait_recovered(sender: Sender, since: float) -> None:
    """Until every send made before `since` is answered and sends succeed again, so that
    one outage's requests are not timed across the next."""

    async def recovered() -> bool:
        return sender.settled_since(since)

    with trio.fail_after(60):
        await wait_for(recovered)


async def test_hanging_rabbitmq_and_redis_get_bounded_503s(
    outage_settings: Settings, amqp_relay: RelayProxy, redis_server: PrivateRedis
) -> None:
    async with (
        open_fake_webhook() as hook,
        open_timed_smsc() as smsc,
        running_gateway(outage_settings) as gateway,
    ):
        cid = await create_smpp_channel(gateway, smsc, hook)
        await wait_smpp_bound(gateway, cid)
        async with open_sender(gateway, cid, hook, "m") as sender:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.steady, RATE, stop)

                async def some_accepted() -> bool:
                    return len(sender.accepted) >= 10

                with trio.fail_after(WAIT):
                    await wait_for(some_accepted)

                amqp_relay.stall()
                try:
                    await hold_and_probe(gateway, cid, AMQP_BOUND, "queue broker unavailable")
                finally:
                    amqp_relay.resume()
                await wait_recovered(sender, trio.current_time())

                redis_server.pause()
                try:
                    await hold_and_probe(gateway, cid, REDIS_BOUND, "state store unavailable")
                finally:
                    redis_server.resume()
                await wait_recovered(sender, trio.current_time())
                stop.set()
            with trio.fail_after(60):
                await wait_all_submitted(smsc, sender)
                await wait_all_events(hook, sender)
        assert sender.failures, "no send was refused while a backend hung"
        slowest = max(took for _, took in sender.timings)
        print(
            f"{len(sender.accepted)} accepted, {len(sender.failures)} refused, "
            f"slowest answer {slowest:.1f} s"
        )
        for failure in sender.failures:
            assert failure.status == 503, failure
        assert slowest < max(AMQP_BOUND, REDIS_BOUND)
