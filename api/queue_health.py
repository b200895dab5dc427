"""The queue report of GET /health when `rabbitmq_management_interface` is set (behaviour 11).

This is the only place the API talks HTTP to anything: RabbitMQ's management API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import trio

from api.errors import ManagementApiError
from ipc.settings import AmqpSettings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ipc.settings import Settings

JsonObject = dict[str, Any]

#: The original's bound on concurrent management requests.
MAX_CONCURRENT_REQUESTS = 20
REQUEST_TIMEOUT = 10.0


def _queue_url(interface: str, vhost: str, queue: str) -> str:
    base = interface if "://" in interface else f"http://{interface}"
    return f"{base.rstrip('/')}/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"


def queue_item(body: object) -> JsonObject | None:
    """One report item from a management API queue body; None when it describes no queue.

    A queue with messages waiting and an ack rate of zero is stuck. Without ack
    statistics there is no rate, and the queue is never called stuck (fixes Q17).
    """
    if not isinstance(body, dict) or "messages" not in body:
        return None
    item: JsonObject = {"name": body.get("name"), "stuck": False, "messages": body["messages"]}
    stats = body.get("message_stats")
    ack_details = stats.get("ack_details") if isinstance(stats, dict) else None
    if isinstance(ack_details, dict) and "rate" in ack_details:
        rate = ack_details["rate"]
        item["rate"] = rate
        messages = item["messages"]
        if isinstance(messages, int | float) and messages > 0 and rate == 0:
            item["stuck"] = True
    return item


async def _fetch(client: httpx.AsyncClient, url: str) -> object:
    try:
        response = await client.get(url)
    except httpx.HTTPError as exc:
        raise ManagementApiError(f"GET {url} failed: {exc!r}") from exc
    if response.status_code == httpx.codes.NOT_FOUND:
        # A queue nobody has declared yet: nothing to report, as the original.
        return None
    if response.is_error:
        raise ManagementApiError(f"GET {url} answered {response.status_code}")
    try:
        return response.json()
    except ValueError as exc:
        raise ManagementApiError(f"GET {url} did not answer JSON") from exc


async def queue_report(settings: Settings, queues: Sequence[str]) -> list[JsonObject]:
    """Ask the management interface about each queue; items in the order of `queues`.

    Raises ManagementApiError when a request fails.
    """
    interface = settings.rabbitmq_management_interface
    if interface is None:
        raise ValueError("rabbitmq_management_interface is not set")
    amqp = settings.amqp or AmqpSettings()
    auth = httpx.BasicAuth(amqp.username, amqp.password.get_secret_value())
    bodies: list[object] = [None] * len(queues)
    limiter = trio.CapacityLimiter(MAX_CONCURRENT_REQUESTS)

    async def fetch_one(index: int, url: str) -> None:
        async with limiter:
            bodies[index] = await _fetch(client, url)

    async with (
        httpx.AsyncClient(auth=auth, timeout=REQUEST_TIMEOUT) as client,
        trio.open_nursery() as nursery,
    ):
        for index, queue in enumerate(queues):
            nursery.start_soon(fetch_one, index, _queue_url(interface, amqp.vhost, queue))
    return [item for body in bodies if (item := queue_item(body)) is not None]
