"""Callback URL templates are checked where they are given (channel create and modify, send,
router destinations), and the router follow-ups of channel delete and modify (issue 7)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from api.templates import PLACEHOLDERS, template_problem
from tests.api.test_routers import call, error_of, make_destination, make_router

if TYPE_CHECKING:
    from tests.api.harness import Api

JsonObject = dict[str, Any]

GOOD = "http://hooks.example/{channel_id}/{message_id}?t={event_type}&f={from}&{{literal}}"


def test_every_placeholder_is_accepted() -> None:
    assert template_problem("".join(f"/{{{name}}}" for name in sorted(PLACEHOLDERS))) is None
    assert template_problem(GOOD) is None
    assert template_problem("http://plain.example/mo") is None


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("http://x/{msg_id}", "unknown placeholder 'msg_id'"),
        ("http://x/{}", "unknown placeholder '{}'"),
        ("http://x/{0}", "unknown placeholder '0'"),
        ("http://x/{to.real}", "unknown placeholder 'to.real'"),
        ("http://x/{to[0]}", "unknown placeholder 'to[0]'"),
        ("http://x/{to!r}", "no conversion or format spec"),
        ("http://x/{to:>5}", "no conversion or format spec"),
        ("http://x/{to", "bad template syntax"),
        ("http://x/}", "bad template syntax"),
    ],
)
def test_bad_templates_name_their_problem(template: str, fragment: str) -> None:
    problem = template_problem(template)
    assert problem is not None
    assert fragment in problem


async def test_channel_templates_are_checked_on_create_and_modify(http_api: Api) -> None:
    body = {"type": "fake", "config": {"host": "h"}, "mo_url": "http://x/{nope}"}
    status, payload = await call(http_api, "POST", "/channels/", body)
    assert status == 400
    description, kind, message = error_of(payload)
    assert (description, kind) == ("api usage error", "ApiUsageError")
    assert message.startswith("mo_url 'http://x/{nope}': unknown placeholder 'nope'")
    assert await http_api.store.list_channels() == []

    cid = await http_api.create_channel(mo_url=GOOD, status_url=GOOD)
    status, payload = await call(http_api, "POST", f"/channels/{cid}", {"status_url": "{x"})
    assert (status, error_of(payload)[1]) == (400, "ApiUsageError")
    stored = await http_api.store.get_channel(cid)
    assert stored is not None
    assert stored["status_url"] == GOOD


async def test_event_url_templates_are_checked_on_send(http_api: Api) -> None:
    cid = await http_api.create_channel(mo_url="http://example.com/mo")
    body = {"to": "+1", "content": "x", "event_url": "http://x/{evt}"}
    status, payload = await call(http_api, "POST", f"/channels/{cid}/messages/", body)
    assert (status, error_of(payload)[1]) == (400, "ApiUsageError")
    assert "event_url" in error_of(payload)[2]
    body["event_url"] = GOOD
    status, _ = await call(http_api, "POST", f"/channels/{cid}/messages/", body)
    assert status == 201


async def test_destination_templates_are_checked(http_api: Api) -> None:
    _, rid = await make_router(http_api)
    base = f"/routers/{rid}/destinations/"
    body = {"config": {"regular_expression": "^1$"}, "mo_url": "http://x/{bad}"}
    status, payload = await call(http_api, "POST", base, body)
    assert (status, error_of(payload)[1]) == (400, "ApiUsageError")
    did = await make_destination(http_api, rid, mo_url=GOOD)
    status, payload = await call(http_api, "PATCH", f"{base}{did}", {"mo_url": "{"})
    assert (status, error_of(payload)[1]) == (400, "ApiUsageError")
    send = {"to": "123", "content": "x", "event_url": "http://x/{bad}"}
    status, payload = await call(http_api, "POST", f"{base}{did}/messages/", send)
    assert (status, error_of(payload)[1]) == (400, "ApiUsageError")


# --- router follow-ups --------------------------------------------------------------------


async def test_a_routed_channel_cannot_be_deleted(api: Api) -> None:
    cid, rid = await make_router(api)
    status, payload = await call(api, "DELETE", f"/channels/{cid}")
    assert status == 400
    description, kind, message = error_of(payload)
    assert (description, kind) == ("api usage error", "ApiUsageError")
    assert f"Router {rid} routes channel {cid}" in message
    assert await api.store.get_channel(cid) is not None
    assert ("stop_channel", cid) not in api.supervisor.lifecycle()
    assert (await call(api, "DELETE", f"/routers/{rid}"))[0] == 200
    assert (await call(api, "DELETE", f"/channels/{cid}"))[0] == 200


@pytest.mark.parametrize(
    "change", [{"mo_url": "http://example.com/mo"}, {"mo_url": None}, {"amqp_queue": None}]
)
async def test_a_routed_channel_gets_no_destination_of_its_own(
    http_api: Api, change: JsonObject
) -> None:
    cid, rid = await make_router(http_api)
    status, payload = await call(http_api, "POST", f"/channels/{cid}", change)
    assert status == 400
    assert f"Router {rid} routes channel {cid}" in error_of(payload)[2]
    stored = await http_api.store.get_channel(cid)
    assert stored is not None
    assert not {"mo_url", "amqp_queue"} & set(stored)
    # Other changes are fine.
    assert (await call(http_api, "POST", f"/channels/{cid}", {"label": "x"}))[0] == 200
