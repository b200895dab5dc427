"""Webhook URL templates: mo_url, event_url and status_url with named placeholders, rendered per
request with URL-quoted values (as Kannel's dlr-url).

Placeholders are Python str.format named fields: `{message_id}`, `{channel_id}`,
`{event_type}`, `{from}`, `{to}`, `{session_event}`, `{status}`, `{component}`; `{{` and `}}`
are literal braces. What each webhook fills in (anything else renders empty):

- mo_url: message_id, channel_id, from, to, session_event (of the inbound message)
- event_url: message_id (the outbound message), channel_id, event_type (Junebug's),
  from, to, session_event (of the outbound message's send record)
- status_url: channel_id, component, status (ok | degraded | down)
"""

from __future__ import annotations

import functools
import string
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

if TYPE_CHECKING:
    from collections.abc import Mapping

#: The placeholder names a template may use.
FIELDS: Final = frozenset(
    {
        "message_id",
        "channel_id",
        "event_type",
        "from",
        "to",
        "session_event",
        "status",
        "component",
    }
)

_PARSER: Final = string.Formatter()

#: (literal text, field name or None, format spec, conversion or None)
_Piece = tuple[str, str | None, str, str | None]


class TemplateError(ValueError):
    """A template has bad syntax or an unknown placeholder, or a value does not fit its spec."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_template(url: str) -> bool:
    """Whether `url` is rendered (has a brace) rather than used as it is."""
    return "{" in url or "}" in url


@functools.lru_cache(maxsize=256)
def _parse(template: str) -> tuple[_Piece, ...]:
    try:
        parsed = list(_PARSER.parse(template))
    except ValueError as exc:
        raise TemplateError(f"bad template syntax: {exc}") from exc
    pieces: list[_Piece] = []
    for literal, name, spec, conversion in parsed:
        if name is not None and name not in FIELDS:
            if name == "" or name.isdigit():
                raise TemplateError("placeholders must be named, e.g. {message_id}")
            known = ", ".join("{" + f + "}" for f in sorted(FIELDS))
            raise TemplateError(f"unknown placeholder {{{name}}} (known: {known})")
        if conversion not in (None, "s", "r", "a"):
            raise TemplateError(f"bad template syntax: unknown conversion !{conversion}")
        if spec and is_template(spec):
            raise TemplateError(f"bad template syntax: nested placeholder in {{{name}:{spec}}}")
        pieces.append((literal, name, spec or "", conversion))
    return tuple(pieces)


def placeholders(template: str) -> list[str]:
    """The placeholder names `template` uses, in order.

    Raises:
        TemplateError: bad syntax or an unknown or positional placeholder.
    """
    return [name for _, name, _, _ in _parse(template) if name is not None]


def check_template(template: str) -> None:
    """Raises TemplateError when `template` could never be rendered."""
    placeholders(template)


def render(template: str, values: Mapping[str, object]) -> str:
    """`template` with each placeholder replaced by its value, URL-quoted (every reserved
    character escaped, so a value cannot change the URL's structure); a missing or None
    value renders as an empty string.

    Raises:
        TemplateError: the template is invalid, or a value does not fit its format spec.
    """
    parts: list[str] = []
    for literal, name, spec, conversion in _parse(template):
        parts.append(literal)
        if name is None:
            continue
        raw = values.get(name)
        value: object = quote(str(raw), safe="") if raw is not None else ""
        try:
            if conversion is not None:
                value = _PARSER.convert_field(value, conversion)
            parts.append(format(value, spec))
        except ValueError as exc:
            raise TemplateError(f"cannot render {{{name}}}: {exc}") from exc
    return "".join(parts)
