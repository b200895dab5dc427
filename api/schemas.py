"""Request-body parsing and JSON Schema validation at the API edge (behaviour 1.4, 2.2, 2.4, 2.8).

jsonschema, not pydantic, validates bodies so that error messages and schema_path match
the original's. Bodies are Draft 4; channel-type config schemas come from pydantic (2020-12).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from jsonschema import Draft4Validator, Draft202012Validator

from api.errors import BodyValidationError, JsonDecodeError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from jsonschema.exceptions import ValidationError

JsonObject = dict[str, Any]

_NON_NEGATIVE_INT = {"type": "integer", "minimum": 0}

CHANNEL_CREATE: JsonObject = {
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "label": {"type": "string"},
        "config": {"type": "object"},
        "metadata": {"type": "object"},
        "status_url": {"type": "string"},
        "mo_url": {"type": "string"},
        "mo_url_auth_token": {"type": "string"},
        "amqp_queue": {"type": "string"},
        "rate_limit_count": _NON_NEGATIVE_INT,
        "rate_limit_window": _NON_NEGATIVE_INT,
        "character_limit": _NON_NEGATIVE_INT,
    },
    "required": ["type", "config"],
    "additionalProperties": True,
}

CHANNEL_MODIFY: JsonObject = {
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "label": {"type": "string"},
        "config": {"type": "object"},
        "metadata": {"type": "object"},
        "status_url": {"type": ["string", "null"]},
        "mo_url": {"type": ["string", "null"]},
        # The original accepted any JSON type for these two; a number or object could only
        # break the channel, so strings and null it is.
        "mo_url_auth_token": {"type": ["string", "null"]},
        "amqp_queue": {"type": ["string", "null"]},
        "rate_limit_count": _NON_NEGATIVE_INT,
        "rate_limit_window": _NON_NEGATIVE_INT,
        "character_limit": _NON_NEGATIVE_INT,
    },
    "additionalProperties": True,
}

MESSAGE_SEND: JsonObject = {
    "type": "object",
    "properties": {
        "content": {"type": ["string", "null"]},
        "to": {"type": "string"},
        "from": {"type": ["string", "null"]},
        "group": {"type": ["string", "null"]},
        "reply_to": {"type": "string"},
        "event_url": {"type": "string"},
        "event_auth_token": {"type": "string"},
        # Docs: an int 1-5; the original's schema took a string, so a numeric one still works.
        "priority": {
            "type": ["integer", "string"],
            "minimum": 1,
            "maximum": 5,
            "pattern": "^[1-5]$",
        },
        "channel_data": {"type": "object"},
    },
    "required": ["content"],
    "additionalProperties": False,
}

CHANNEL_CREATE_VALIDATOR = Draft4Validator(CHANNEL_CREATE)
CHANNEL_MODIFY_VALIDATOR = Draft4Validator(CHANNEL_MODIFY)
MESSAGE_SEND_VALIDATOR = Draft4Validator(MESSAGE_SEND)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> object:
    """The body as JSON (an empty body is an error); NaN and Infinity are refused."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and the constants above
        raise JsonDecodeError(str(exc)) from exc


def _items(errors: Iterable[ValidationError], prefix: Sequence[str | int]) -> list[JsonObject]:
    items = [
        {
            "type": "invalid_body",
            "message": error.message,
            "schema_path": [*prefix, *error.schema_path],
        }
        for error in errors
    ]
    # The original sorted py2 dicts; by message then schema_path is the stable equivalent.
    items.sort(key=lambda item: (item["message"], json.dumps(item["schema_path"])))
    return items


def validate_body(validator: Draft4Validator, body: object) -> JsonObject:
    """Check `body` with one of this module's validators; return it as an object."""
    items = _items(validator.iter_errors(body), ())
    if items:
        raise BodyValidationError(items)
    assert isinstance(body, dict)  # every schema here requires an object
    return body


@lru_cache(maxsize=64)
def _config_validator(schema_json: str) -> Draft202012Validator:
    # An invalid schema is the channel type's bug: SchemaError ends as a logged 500.
    schema = json.loads(schema_json)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate_channel_config(config_schema: JsonObject, config: object) -> None:
    """Check a channel `config` against its type's schema; paths start at properties/config."""
    validator = _config_validator(json.dumps(config_schema, sort_keys=True))
    items = _items(validator.iter_errors(config), ("properties", "config"))
    if items:
        raise BodyValidationError(items)
