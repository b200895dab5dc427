"""GET /channels/{cid}/logs?n=N: a channel's latest log entries, newest first (behaviour 9.3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from quart import Blueprint, request

from api.deps import api_context
from api.errors import ApiUsageError, envelope
from api.logs import read_logs
from api.routes.channels import load_channel

if TYPE_CHECKING:
    from quart import Response

blueprint = Blueprint("logs", __name__)


def _requested_count(max_logs: int) -> int:
    """`n` clamped to 0..max_logs (fixes Q13); max_logs when absent; 400 when not an integer."""
    values = request.args.getlist("n")
    if not values:
        return max_logs
    try:
        n = int(values[0])
    except ValueError:
        raise ApiUsageError(f"n must be an integer, got {values[0]!r}") from None
    return max(0, min(n, max_logs))


@blueprint.get("/channels/<channel_id>/logs")
async def channel_logs(channel_id: str) -> Response:
    settings = api_context().settings
    n = _requested_count(settings.max_logs)
    await load_channel(channel_id)
    entries = await trio.to_thread.run_sync(read_logs, settings.logging_path, channel_id, n)
    return envelope(200, "logs retrieved", entries)
