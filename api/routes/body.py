"""Reading a request body: raw bytes -> JSON -> schema check, in the original's order (1.4)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from quart import request
from werkzeug.exceptions import RequestEntityTooLarge

from api.schemas import parse_json, validate_body

if TYPE_CHECKING:
    from jsonschema import Draft4Validator

#: Bodies larger than this are parsed and checked in a worker thread: a body near the size
#: limit, built to be slow, costs a tenth of a second, which other requests should not wait.
INLINE_PARSE_LIMIT = 64 * 1024


def _parse_and_check(validator: Draft4Validator, raw: bytes) -> dict[str, Any]:
    return validate_body(validator, parse_json(raw))


async def read_body(validator: Draft4Validator) -> dict[str, Any]:
    """The request's JSON body checked by `validator`; the Content-Type is not looked at.

    A body over the app's MAX_CONTENT_LENGTH is a 413 and one that does not arrive within
    its BODY_TIMEOUT a 408 (werkzeug HTTPExceptions, answered in the envelope).
    """
    try:
        raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    except RequestEntityTooLarge:
        limit = request.max_content_length
        raise RequestEntityTooLarge(
            f"The request body is larger than the limit of {limit} bytes."
        ) from None
    if len(raw) > INLINE_PARSE_LIMIT:
        return await trio.to_thread.run_sync(partial(_parse_and_check, validator, raw))
    return _parse_and_check(validator, raw)
