"""Callback URL templates (mo_url, event_url, status_url): which placeholders they may name, and
the check the API makes before storing one (with api.webhook_hosts' URL and allow-list
check). The channel process renders them."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

from quart import has_app_context

from api.deps import api_context
from api.errors import ApiUsageError
from api.webhook_hosts import AllowedHosts, webhook_url_problem

if TYPE_CHECKING:
    from collections.abc import Sequence

#: The named fields a callback URL may contain (`{{` and `}}` stand for literal braces).
PLACEHOLDERS = frozenset(
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

#: Where templates appear in a channel's properties (event_url is per message).
CHANNEL_TEMPLATE_KEYS = ("mo_url", "status_url")

_FORMATTER = string.Formatter()


def template_problem(template: str) -> str | None:
    """Why `template` is not a valid callback template, or None when it is.

    Only bare names from PLACEHOLDERS: no positional fields, attribute or index access,
    conversions or format specs (values are URL-quoted strings; a spec would change them).
    """
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError as exc:
        return f"bad template syntax ({exc}); write a literal brace as {{{{ or }}}}"
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            shown = name or "{}"
            known = ", ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS))
            return f"unknown placeholder {shown!r} (known: {known})"
        if spec or conversion:
            return f"placeholder {{{name}}} takes no conversion or format spec"
    return None


def _allowed_hosts() -> Sequence[str]:
    # Every route that stores a URL runs in the app's context; the settings are there.
    return api_context().settings.webhook_allowed_hosts if has_app_context() else ()


def check_template(field: str, value: object, allowed_hosts: Sequence[str] | None = None) -> None:
    """400 api usage error when `value` (a string) is not a valid template, not an http(s)
    URL with a host, or (with an allow-list: `allowed_hosts`, by default the app's
    webhook_allowed_hosts) names a host not on it."""
    if not isinstance(value, str):
        return
    problem = template_problem(value)
    if problem is None:
        allowed = AllowedHosts.parse(_allowed_hosts() if allowed_hosts is None else allowed_hosts)
        # As the channel process decides: any brace means the URL is rendered.
        is_template = "{" in value or "}" in value
        problem = webhook_url_problem(value, allowed, template=is_template)
    if problem is not None:
        raise ApiUsageError(f"{field} {value!r}: {problem}")


def check_channel_templates(properties: dict[str, object]) -> None:
    for key in CHANNEL_TEMPLATE_KEYS:
        if key in properties:
            check_template(key, properties[key])
