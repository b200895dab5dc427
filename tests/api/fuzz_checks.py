"""Schemathesis hooks for the API fuzz run (tests/e2e/test_api_fuzz.py loads this module
through SCHEMATHESIS_HOOKS): every response must be the JSON envelope (behaviour 1.1), except
the Prometheus text of a successful GET /metrics."""

from __future__ import annotations

import http
import json
from typing import Any

import schemathesis

ENVELOPE_KEYS = ["status", "code", "description", "result"]
#: Paths whose successful answers are not the envelope (their errors still are).
NOT_ENVELOPED = frozenset({"/metrics"})


@schemathesis.check
def junebug_envelope(ctx: Any, response: Any, case: Any) -> None:
    """{status, code, description, result} in that order, status = the response's status,
    code its reason phrase, Content-Type application/json; errors as result.errors items."""
    if case.operation.path in NOT_ENVELOPED and response.status_code < 400:
        return
    # Schemathesis gives lower-case names and a list of values per header.
    content_type = ",".join(response.headers.get("content-type", []))
    if content_type != "application/json":
        raise AssertionError(f"Content-Type is {content_type!r}, not application/json")
    try:
        body = json.loads(response.content)
    except ValueError as exc:
        raise AssertionError(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict) or list(body) != ENVELOPE_KEYS:
        raise AssertionError(f"not the envelope: {str(body)[:200]}")
    if body["status"] != response.status_code:
        raise AssertionError(f"status {body['status']} in a {response.status_code} response")
    if body["code"] != http.HTTPStatus(response.status_code).phrase:
        raise AssertionError(f"code {body['code']!r} for status {response.status_code}")
    if not (body["description"] is None or isinstance(body["description"], str)):
        raise AssertionError(f"description {body['description']!r} is not a string or null")
    if response.status_code >= 400:
        errors = body["result"].get("errors") if isinstance(body["result"], dict) else None
        if not errors or not all(
            isinstance(item, dict) and isinstance(item.get("type"), str) and "message" in item
            for item in errors
        ):
            raise AssertionError(f"an error without result.errors items: {str(body)[:200]}")
