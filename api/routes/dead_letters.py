"""Dead letters of a channel or a router destination: list, replay, delete (issue 6, fault 4).

GET    /channels/{cid}/dead_letters                          oldest first
POST   /channels/{cid}/dead_letters/replay                   all, or {"ids": [...]}
DELETE /channels/{cid}/dead_letters/{id}
and the same under /routers/{rid}/destinations/{did}/dead_letters.

A replayed dead letter is published back on its source queue (inbound, event or outbound)
and then removed, so its channel (or destination) handles it again: at-least-once, since a
crash in between leaves it listed and a second replay sends it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio
from jsonschema import Draft4Validator
from quart import Blueprint, current_app, request

from api.deps import api_context, queue_broker, state_store
from api.errors import ApiError, ApiUsageError, envelope
from api.routers import load_destination, load_router
from api.routes.channels import load_channel
from api.schemas import parse_json, validate_body
from ipc.deadletters import dead_letters_scope, list_dead_letters, replay_dead_letters

if TYPE_CHECKING:
    from quart import Response

JsonObject = dict[str, Any]

blueprint = Blueprint("dead_letters", __name__)

_CHANNEL = "/channels/<channel_id>/dead_letters"
_DESTINATION = "/routers/<router_id>/destinations/<destination_id>/dead_letters"
_LOCK_KEY = "junebug.dead_letters_lock"

#: What GET answers per dead letter (ipc.deadletters.DeadLetter).
DEAD_LETTER_SCHEMA: JsonObject = {
    "type": "object",
    "required": ["id", "owner_id", "source", "queue", "reason", "dead_lettered_at"],
    "properties": {
        "id": {"type": "string"},
        "owner_id": {"type": "string", "description": "The channel or destination id"},
        "source": {"enum": ["inbound", "event", "outbound"]},
        "queue": {"type": "string", "description": "The queue it came from (and goes back to)"},
        "reason": {"type": "string"},
        "dead_lettered_at": {"type": "string"},
        "body": {"description": "The message or event (vumi format); null when not JSON"},
        "raw_body": {
            "type": ["string", "null"],
            "description": "The body, base64-encoded, when it was not JSON",
        },
    },
}
#: POST .../replay: no body or {} replays all of them.
REPLAY_SCHEMA: JsonObject = {
    "type": "object",
    "properties": {"ids": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
    "additionalProperties": False,
}
_REPLAY_VALIDATOR = Draft4Validator(REPLAY_SCHEMA)


class DeadLetterNotFoundError(ApiError):
    status = 404
    description = "dead letter not found"
    error_type = "DeadLetterNotFound"


def _lock() -> trio.Lock:
    """Replays and deletes in one worker run one at a time: two clicks replay once."""
    lock: trio.Lock = current_app.extensions.setdefault(_LOCK_KEY, trio.Lock())
    return lock


async def _destination(router_id: str, destination_id: str) -> str:
    store = state_store()
    await load_router(store, router_id)
    await load_destination(store, router_id, destination_id)
    return destination_id


async def _list(owner_id: str) -> Response:
    letters = await list_dead_letters(state_store(), owner_id)
    return envelope(200, "dead letters retrieved", [letter.record() for letter in letters])


async def _replay_ids() -> list[str] | None:
    """The ids asked for; None for all (no body, or none named)."""
    raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    if not raw.strip():
        return None
    body = validate_body(_REPLAY_VALIDATOR, parse_json(raw))
    ids = body.get("ids")
    return None if ids is None else list(ids)


async def _replay(owner_id: str) -> Response:
    wanted = await _replay_ids()
    async with _lock():
        letters = await list_dead_letters(state_store(), owner_id)
        if wanted is not None:
            known = {letter.id for letter in letters}
            missing = [letter_id for letter_id in wanted if letter_id not in known]
            if missing:
                raise ApiUsageError(f"no such dead letter(s): {', '.join(missing)}; none replayed")
            chosen = set(wanted)
            letters = [letter for letter in letters if letter.id in chosen]
        replayed = await replay_dead_letters(
            state_store(), queue_broker(), api_context().namespace, letters
        )
    return envelope(200, "dead letters replayed", {"replayed": replayed})


async def _delete(owner_id: str, letter_id: str) -> Response:
    async with _lock():
        if not await state_store().kv_delete(dead_letters_scope(owner_id), letter_id):
            raise DeadLetterNotFoundError(f"Dead letter {letter_id} not found")
    return envelope(200, "dead letter deleted", {})


@blueprint.get(_CHANNEL)
async def list_channel_dead_letters(channel_id: str) -> Response:
    await load_channel(channel_id)
    return await _list(channel_id)


@blueprint.post(f"{_CHANNEL}/replay")
async def replay_channel_dead_letters(channel_id: str) -> Response:
    await load_channel(channel_id)
    return await _replay(channel_id)


@blueprint.delete(f"{_CHANNEL}/<letter_id>")
async def delete_channel_dead_letter(channel_id: str, letter_id: str) -> Response:
    await load_channel(channel_id)
    return await _delete(channel_id, letter_id)


@blueprint.get(_DESTINATION)
async def list_destination_dead_letters(router_id: str, destination_id: str) -> Response:
    return await _list(await _destination(router_id, destination_id))


@blueprint.post(f"{_DESTINATION}/replay")
async def replay_destination_dead_letters(router_id: str, destination_id: str) -> Response:
    return await _replay(await _destination(router_id, destination_id))


@blueprint.delete(f"{_DESTINATION}/<letter_id>")
async def delete_destination_dead_letter(
    router_id: str, destination_id: str, letter_id: str
) -> Response:
    return await _delete(await _destination(router_id, destination_id), letter_id)
