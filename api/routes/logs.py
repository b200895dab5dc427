"""GET /channels/{cid}/logs?n=N[&message_id=MID]: a channel's latest log entries, newest first
(behaviour 9.3), optionally only those about one message (issue 7)."""

from __future__ import annotations

import re
from functools import partial
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

#: ASCII digits only: int() would also take "+5", " 5 " and non-ASCII digits.
_INTEGER = re.compile("-?[0-9]+")
_MAX_DIGITS = 18


def _requested_count(max_logs: int) -> int:
    """`n` clamped to 0..max_logs (fixes Q13); max_logs when absent; 400 when not an integer."""
    values = request.args.getlist("n")
    if not values:
        return max_logs
    value = values[0]
    if not _INTEGER.fullmatch(value):
        raise ApiUsageError(f"n must be an integer, got {value!r}")
    if len(value) > _MAX_DIGITS:
        # Beyond any max_logs either way, and past what int() converts from text.
        return 0 if value.startswith("-") else max_logs
    return max(0, min(int(value), max_logs))


@blueprint.get("/channels/<channel_id>/logs")
async def channel_logs(channel_id: str) -> Response:
    settings = api_context().settings
    n = _requested_count(settings.max_logs)
    message_id = request.args.get("message_id")
    await load_channel(channel_id)
    read = partial(read_logs, settings.logging_path, channel_id, n, message_id=message_id)
    entries = await trio.to_thread.run_sync(read)
    return envelope(200, "logs retrieved", entries)
