"""GET /health and /health/: the store and broker answer, and optionally the queue report (11)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import Blueprint

from api.deps import api_context, queue_broker, state_store
from api.errors import envelope
from api.queue_health import queue_report

if TYPE_CHECKING:
    from quart import Response

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
@blueprint.get("/health/")
async def health() -> Response:
    context = api_context()
    store = state_store()
    # StoreUnavailableError / BrokerUnavailableError become a 503 naming the failed dependency.
    await store.ping()
    await queue_broker().ping()
    if context.settings.rabbitmq_management_interface is None:
        return envelope(200, "health ok", {})
    queues = [
        queue
        for channel_id in await store.list_channels()
        for queue in context.namespace.channel_queues(channel_id)
    ]
    report = await queue_report(context.settings, queues)
    if any(item["stuck"] for item in report):
        return envelope(500, "queues stuck", report)
    return envelope(200, "queues ok", report)
