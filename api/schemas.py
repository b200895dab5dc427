"""Request-body parsing and JSON Schema validation at the API edge (behaviour 1.4, 2.2, 2.4, 2.8).

jsonschema, not pydantic, validates bodies so that error messages and schema_path match
the original's. Bodies are Draft 4 (whose keywords used here mean the same in the 2020-12
dialect of OpenAPI 3.1, so api.openapi publishes them as they are); channel-type config
schemas come from pydantic (2020-12).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from jsonschema import Draft4Validator, Draft202012Validator

from api.errors import BodyValidationError, JsonDecodeError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from jsonschema.exceptions import ValidationError

JsonObject = dict[str, Any]

_NON_NEGATIVE_INT = {"type": "integer", "minimum": 0}

#: Channel properties of issue 7 (null: the gateway's default / none).
_QUEUE_CONTROL_PROPERTIES: JsonObject = {
    # Queued outbound messages beyond which sends get 429 (default: default_queue_limit).
    "queue_limit": {"type": ["integer", "null"], "minimum": 1},
    # HMAC-SHA256 key of the X-Junebug-Signature header on this channel's webhook POSTs.
    "signing_secret": {"type": ["string", "null"]},
}

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
        **_QUEUE_CONTROL_PROPERTIES,
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
        **_QUEUE_CONTROL_PROPERTIES,
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
        # maxLength: Python's `$` also matches before a final newline ("3\n").
        "priority": {
            "type": ["integer", "string"],
            "minimum": 1,
            "maximum": 5,
            "pattern": "^[1-5]$",
            "maxLength": 1,
        },
        # The two keys the API reads (behaviour 4.1) are typed; the rest is helper_metadata.
        # The original answered a bad session_event with a 500; this is a 400 invalid_body.
        "channel_data": {
            "type": "object",
            "properties": {
                "session_event": {"enum": [None, "new", "resume", "close"]},
                "continue_session": {"type": ["boolean", "null"]},
            },
        },
        # Issue 7: a message still queued past its expiry is rejected ("expired"), not sent.
        "validity": {"type": "integer", "minimum": 1},
        "expires_at": {"type": "string", "maxLength": 64},
        # The Idempotency-Key header's alternative: a repeat returns the first result.
        "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 200},
    },
    "required": ["content"],
    "additionalProperties": False,
}

_ROUTER_PROPERTIES: JsonObject = {
    "type": {"type": "string"},
    "label": {"type": "string"},
    "config": {"type": "object"},
    "metadata": {"type": "object"},
}

#: POST /routers/ and PUT /routers/{rid} (behaviour 10.2: no other keys).
ROUTER_CREATE: JsonObject = {
    "type": "object",
    "properties": _ROUTER_PROPERTIES,
    "required": ["type", "config"],
    "additionalProperties": False,
}

#: PATCH /routers/{rid}: the same keys, none required.
ROUTER_PATCH: JsonObject = {
    "type": "object",
    "properties": _ROUTER_PROPERTIES,
    "additionalProperties": False,
}

_DESTINATION_PROPERTIES: JsonObject = {
    "label": {"type": "string"},
    "config": {"type": "object"},
    "metadata": {"type": "object"},
    "mo_url": {"type": "string"},
    "mo_url_token": {"type": "string"},
    "amqp_queue": {"type": "string"},
    "character_limit": _NON_NEGATIVE_INT,
}

#: POST .../destinations/ and PUT .../destinations/{did} (behaviour 10.3).
DESTINATION_CREATE: JsonObject = {
    "type": "object",
    "properties": _DESTINATION_PROPERTIES,
    "required": ["config"],
    "additionalProperties": False,
}

DESTINATION_PATCH: JsonObject = {
    "type": "object",
    "properties": _DESTINATION_PROPERTIES,
    "additionalProperties": False,
}

CHANNEL_CREATE_VALIDATOR = Draft4Validator(CHANNEL_CREATE)
CHANNEL_MODIFY_VALIDATOR = Draft4Validator(CHANNEL_MODIFY)
MESSAGE_SEND_VALIDATOR = Draft4Validator(MESSAGE_SEND)
ROUTER_CREATE_VALIDATOR = Draft4Validator(ROUTER_CREATE)
ROUTER_PATCH_VALIDATOR = Draft4Validator(ROUTER_PATCH)
DESTINATION_CREATE_VALIDATOR = Draft4Validator(DESTINATION_CREATE)
DESTINATION_PATCH_VALIDATOR = Draft4Validator(DESTINATION_PATCH)


#: Deeper bodies are refused: every layer below (deepcopy, the stores' JSON, pydantic) recurses.
MAX_NESTING = 64

#: A \uD800-\uDFFF escape: the only way a lone surrogate gets into a UTF-8 body.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        # 1e400 would come back out of json.dumps as `Infinity`, which is not JSON.
        raise ValueError(f"number {text} is out of range")
    return value


def _containers(items: Iterable[object]) -> list[object]:
    # Exact types: json.loads makes plain dicts and lists, and `type() is` is the fast test.
    return [item for item in items if type(item) is dict or type(item) is list]


def _check_depth(value: object) -> None:
    """Level by level: a recursive walk would cost several times more on wide bodies."""
    level = [value]
    for _ in range(MAX_NESTING):
        below: list[object] = []
        for item in level:
            if isinstance(item, dict):
                below.extend(_containers(item.values()))
            elif isinstance(item, list):
                below.extend(_containers(item))
        if not below:
            return
        level = below
    raise JsonDecodeError(f"the body is nested deeper than {MAX_NESTING} levels")


def _check_structure(value: object, text: str) -> None:
    """Refuse nesting deeper than MAX_NESTING and strings holding lone surrogates (which no
    store or encoder downstream can write). Each check runs only when the text could fail it."""
    if isinstance(value, dict | list) and text.count("[") + text.count("{") > MAX_NESTING:
        _check_depth(value)
    if _SURROGATE_ESCAPE.search(text):
        # Re-encoded without escapes, any lone surrogate shows as itself.
        found = _SURROGATE.search(json.dumps(value, ensure_ascii=False))
        if found:
            code = f"\\u{ord(found.group()):04x}"
            raise JsonDecodeError(f"the body holds a lone surrogate ({code}), not a character")


def parse_json(raw: bytes) -> object:
    """The body as JSON: UTF-8 only (an initial BOM is skipped), never empty, no NaN or
    Infinity, nesting at most MAX_NESTING deep, no lone surrogates."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JsonDecodeError(f"the body is not UTF-8: {exc}") from exc
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise JsonDecodeError(f"the body is nested deeper than {MAX_NESTING} levels") from None
    except ValueError as exc:  # JSONDecodeError, too many digits and the constants above
        raise JsonDecodeError(str(exc)) from exc
    _check_structure(value, text)
    return value


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


#: JSON types the quick check tells apart by the exact Python type json.loads gives them.
_QUICK_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "null": (type(None),),
    "boolean": (bool,),
    "object": (dict,),
}


@dataclass(frozen=True, slots=True)
class _QuickCheck:
    """A shortcut past jsonschema for the common, valid body (a validation costs ~50 us, a
    good part of a send): True only when the schema surely accepts the body; False means
    ask jsonschema, which also words the errors. Vouches only for properties whose one
    rule is a `type` of _QUICK_TYPES; any other property present means asking."""

    required: tuple[str, ...]
    #: property -> the Python types its value may have
    simple: dict[str, tuple[type, ...]]
    #: Whether properties the schema does not name are allowed.
    open: bool

    @classmethod
    def of(cls, schema: JsonObject) -> _QuickCheck | None:
        """None when the schema uses more than this understands."""
        if schema.get("type") != "object" or not set(schema) <= {
            "type",
            "properties",
            "required",
            "additionalProperties",
        }:
            return None
        additional = schema.get("additionalProperties", True)
        if not isinstance(additional, bool):
            return None
        simple: dict[str, tuple[type, ...]] = {}
        for name, rules in schema.get("properties", {}).items():
            types = rules.get("type") if set(rules) == {"type"} else None
            names = [types] if isinstance(types, str) else types
            if isinstance(names, list) and all(name in _QUICK_TYPES for name in names):
                simple[name] = tuple(t for name in names for t in _QUICK_TYPES[name])
            else:
                simple[name] = ()
        return cls(tuple(schema.get("required", ())), simple, additional)

    def passes(self, body: object) -> bool:
        if type(body) is not dict:
            return False
        for name in self.required:
            if name not in body:
                return False
        for key, value in body.items():
            types = self.simple.get(key)
            if types is None:
                if not self.open:
                    return False
            elif type(value) not in types:
                return False
        return True


#: By the id of this module's validators (which live as long as the process).
_QUICK_CHECKS: dict[int, _QuickCheck | None] = {
    id(validator): _QuickCheck.of(schema)
    for validator, schema in (
        (CHANNEL_CREATE_VALIDATOR, CHANNEL_CREATE),
        (CHANNEL_MODIFY_VALIDATOR, CHANNEL_MODIFY),
        (MESSAGE_SEND_VALIDATOR, MESSAGE_SEND),
        (ROUTER_CREATE_VALIDATOR, ROUTER_CREATE),
        (ROUTER_PATCH_VALIDATOR, ROUTER_PATCH),
        (DESTINATION_CREATE_VALIDATOR, DESTINATION_CREATE),
        (DESTINATION_PATCH_VALIDATOR, DESTINATION_PATCH),
    )
}


def validate_body(validator: Draft4Validator, body: object) -> JsonObject:
    """Check `body` with one of this module's validators; return it as an object."""
    quick = _QUICK_CHECKS.get(id(validator))
    if quick is not None and quick.passes(body):
        assert isinstance(body, dict)
        return body
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


@lru_cache(maxsize=64)
def _router_config_validator(schema_json: str) -> Draft202012Validator:
    # Formats are checked: router types declare channel ids as "uuid" and patterns as "regex".
    schema = json.loads(schema_json)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _router_problem(error: ValidationError) -> list[str]:
    """The original's wording for the cases it had (behaviour 10.4), the schema's otherwise."""
    where = ".".join(str(part) for part in error.absolute_path)
    required = error.validator_value
    if error.validator == "required" and isinstance(error.instance, dict):
        assert isinstance(required, list)
        prefix = f"{where}." if where else ""
        return [
            f"Missing required config field '{prefix}{name}'"
            for name in required
            if name not in error.instance
        ]
    if error.validator == "format" and error.validator_value == "uuid":
        return [f"Field '{where}' is not a valid UUID"]
    if error.validator == "format" and error.validator_value == "regex":
        return [f"Field '{where}' is not a valid regular expression: {error.cause}"]
    return [f"Field '{where}': {error.message}" if where else error.message]


def router_config_problems(schema: JsonObject, config: object) -> list[str]:
    """What is wrong with a router's (or a destination's) `config`, sorted; [] when valid."""
    validator = _router_config_validator(json.dumps(schema, sort_keys=True))
    problems = {
        problem for error in validator.iter_errors(config) for problem in _router_problem(error)
    }
    return sorted(problems)
