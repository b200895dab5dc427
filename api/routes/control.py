"""Queue control of a channel's sending (issue 7), applied by its process within ~0.5 s:

POST   /channels/{cid}/pause              stop taking messages off the queue (they stay queued)
POST   /channels/{cid}/resume             take them again
POST   /channels/{cid}/messages/cancel    cancel every message queued now (any body ignored)
DELETE /channels/{cid}/messages/{mid}     cancel one queued message

Each cancelled message gets a `rejected` event with reason "cancelled" instead of being sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from quart import Blueprint, current_app

from api.deps import api_context, state_store
from api.errors import ApiUsageError, MessageNotFoundError, envelope
from api.queue_control import cancel_message, update_control
from api.routes.channels import load_channel
from api.timeline import EVENT_TYPE
from ipc.payloads import vumi_timestamp

if TYPE_CHECKING:
    from quart import Response

    from api.queue_control import JsonObject

blueprint = Blueprint("control", __name__)

_LOCK_KEY = "junebug.control_lock"


def _control_lock() -> trio.Lock:
    """Control-state changes in one worker run one at a time (each reads, then writes)."""
    lock: trio.Lock = current_app.extensions.setdefault(_LOCK_KEY, trio.Lock())
    return lock


async def _change(channel_id: str, **changes: object) -> JsonObject:
    await load_channel(channel_id)
    async with _control_lock():
        return await update_control(state_store(), channel_id, **changes)


@blueprint.post("/channels/<channel_id>/pause")
async def pause_channel(channel_id: str) -> Response:
    return envelope(200, "channel paused", await _change(channel_id, paused=True))


@blueprint.post("/channels/<channel_id>/resume")
async def resume_channel(channel_id: str) -> Response:
    return envelope(200, "channel resumed", await _change(channel_id, paused=False))


@blueprint.post("/channels/<channel_id>/messages/cancel")
async def cancel_messages(channel_id: str) -> Response:
    """Every message whose timestamp is not after now is cancelled: those queued now."""
    state = await _change(channel_id, cancel_before=vumi_timestamp())
    return envelope(200, "messages cancelled", {"cancel_before": state["cancel_before"]})


@blueprint.delete("/channels/<channel_id>/messages/<message_id>")
async def cancel_one_message(channel_id: str, message_id: str) -> Response:
    """400 when the message is unknown or already left the queue (it has an event)."""
    context = api_context()
    await load_channel(channel_id)
    store = state_store()
    ttl = context.settings.outbound_message_ttl
    record = await store.get_outbound(channel_id, message_id, ttl)
    if record is None or record.message is None:
        raise MessageNotFoundError(f"Outbound message with id {message_id} not found")
    if any(entry.get("message_type") == EVENT_TYPE for entry in record.events):
        raise ApiUsageError(
            f"Message {message_id} has already left the queue (see its events): "
            "it cannot be cancelled"
        )
    cancelled = await cancel_message(store, channel_id, message_id, ttl)
    return envelope(200, "message cancelled", {"message_id": message_id, **cancelled})
