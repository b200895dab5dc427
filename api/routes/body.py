"""Reading a request body: raw bytes -> JSON -> schema check, in the original's order (1.4)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import request

from api.schemas import parse_json, validate_body

if TYPE_CHECKING:
    from jsonschema import Draft4Validator


async def read_body(validator: Draft4Validator) -> dict[str, Any]:
    """The request's JSON body checked by `validator`; the Content-Type is not looked at."""
    raw = await request.body
    return validate_body(validator, parse_json(raw))
