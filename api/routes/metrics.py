"""GET /metrics: Prometheus text exposition of every channel (api.metrics), not in the envelope
(scrapers read it as it is); it needs the bearer token when the API has tokens."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from quart import Blueprint, Response

from api.deps import api_context, queue_broker, state_store
from api.metrics import collect_samples, render

blueprint = Blueprint("metrics", __name__)


@blueprint.get("/metrics")
async def metrics() -> Response:
    samples = await collect_samples(state_store(), queue_broker(), api_context().namespace)
    return Response(render(samples), content_type=CONTENT_TYPE_PLAIN_0_0_4)
