"""Webhook URLs: http(s) with a host, and the optional `webhook_allowed_hosts` allow-list,
checked wherever a URL is given (channel create and modify, send, router destinations)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import pytest

from api.webhook_hosts import AllowedHosts, webhook_url_problem
from tests.api.harness import open_api
from tests.api.test_routers import call, error_of, make_destination, make_router

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ipc.settings import Settings
    from tests.api.harness import Api

ALLOWED: Final = ("allowed.org", "*.example.org", "10.0.0.1", "[::1]", "Bücher.DE", "dot.test.")
HOST_IN_TEMPLATE: Final = "the scheme and host may not contain a placeholder"


@dataclass(frozen=True, slots=True)
class Case:
    label: str
    url: str
    #: None: accepted; otherwise a fragment of the problem.
    problem: str | None


ALLOW_LIST_CASES: Final = (
    Case("exact host", "http://allowed.org/mo", None),
    Case("https", "https://allowed.org/mo", None),
    Case("upper case", "HTTP://ALLOWED.ORG/mo", None),
    Case("a port", "http://allowed.org:8443/mo", None),
    Case("final dot", "http://allowed.org./mo", None),
    Case("entry with a final dot", "http://dot.test/mo", None),
    Case("subdomain", "http://hooks.example.org/mo", None),
    Case("deep subdomain", "http://a.b.example.org/mo", None),
    Case("upper-case subdomain", "http://Hooks.EXAMPLE.org/mo", None),
    Case("userinfo before an allowed host", "http://user:pw@allowed.org/mo", None),
    Case("IPv4 entry", "http://10.0.0.1:9000/mo", None),
    Case("IPv6 entry", "http://[::1]/mo", None),
    Case("IPv6 entry, other spelling", "http://[0:0::1]/mo", None),
    Case("IDN", "http://bücher.de/mo", None),
    Case("IDN as punycode", "http://xn--bcher-kva.de/mo", None),
    Case("placeholders in path and query", "http://allowed.org/{message_id}?to={to}", None),
    Case("placeholder right after the host", "http://allowed.org/{to}", None),
    Case("placeholder in the fragment", "http://allowed.org/mo#{to}", None),
    Case("another host", "http://evil.com/mo", "host 'evil.com' is not in webhook_allowed"),
    Case("allowed host as userinfo", "http://allowed.org@evil.com/", "host 'evil.com'"),
    Case("userinfo with a port", "http://allowed.org:80@evil.com/", "host 'evil.com'"),
    Case("backslash userinfo", "http://allowed.org\\@evil.com/", "host 'evil.com'"),
    Case("encoded slash userinfo", "http://allowed.org%2f@evil.com/", "host 'evil.com'"),
    Case("allowed host in the fragment", "http://evil.com#@allowed.org", "host 'evil.com'"),
    Case("allowed host in the query", "http://evil.com?@allowed.org", "host 'evil.com'"),
    Case("allowed host as a prefix", "http://allowed.org.evil.com/", "allowed.org.evil.com"),
    Case("allowed host as a suffix", "http://evilallowed.org/", "host 'evilallowed.org'"),
    Case("wildcard's apex", "http://example.org/", "host 'example.org'"),
    Case("wildcard domain as a prefix", "http://x.example.org.evil.com/", "not in webhook"),
    Case("another IPv4", "http://10.0.0.2/", "host '10.0.0.2'"),
    Case("IPv4 under a wildcard", "http://127.0.0.1/", "host '127.0.0.1'"),
    Case("another IPv6", "http://[::2]/", "host '::2'"),
    Case("look-alike IDN", "http://bücher.de.evil/", "not in webhook_allowed_hosts"),
    Case("full-width letters", "http://\uff41llowed.org/", "not a valid URL"),
    Case("placeholder as the host", "http://{to}/mo", HOST_IN_TEMPLATE),
    Case("placeholder as a subdomain", "http://{to}.example.org/", HOST_IN_TEMPLATE),
    Case("placeholder after the host", "http://allowed.org{to}/", HOST_IN_TEMPLATE),
    Case("placeholder as the port", "http://allowed.org:{to}/", HOST_IN_TEMPLATE),
    Case("placeholder as userinfo", "http://{to}@allowed.org/", HOST_IN_TEMPLATE),
    Case("placeholder as the scheme", "{to}://allowed.org/", HOST_IN_TEMPLATE),
    Case("placeholder where // would be", "http:/{to}/evil.com/", HOST_IN_TEMPLATE),
    Case("ftp", "ftp://allowed.org/", "the scheme must be http or https (got 'ftp')"),
    Case("javascript", "javascript:alert(1)", "the scheme must be http or https"),
    Case("no scheme", "allowed.org/mo", "the scheme must be http or https (got none)"),
    Case("no host", "http:///mo", "the URL has no host"),
    Case("no slashes", "http:evil.com", "the URL has no host"),
    Case("control character", "http://evil.com\t.allowed.org/", "not a valid URL"),
)

OPEN_CASES: Final = (
    Case("any host", "http://anything.test/mo", None),
    Case("an IP", "http://192.0.2.1:8080/", None),
    Case("placeholder as the host", "http://{to}.hooks.test/mo", None),
    Case("ftp", "ftp://anything.test/", "the scheme must be http or https"),
    Case("a word", "mo", "the scheme must be http or https (got none)"),
    Case("no host", "https://", "the URL has no host"),
    Case("placeholder as the scheme", "{to}://x.test/", "the scheme must be http or https"),
)


@pytest.mark.parametrize("case", ALLOW_LIST_CASES, ids=lambda c: c.label)
def test_allow_list(case: Case) -> None:
    template = "{" in case.url
    problem = webhook_url_problem(case.url, AllowedHosts.parse(ALLOWED), template=template)
    if case.problem is None:
        assert problem is None
    else:
        assert problem is not None
        assert case.problem in problem


@pytest.mark.parametrize("case", OPEN_CASES, ids=lambda c: c.label)
def test_without_an_allow_list_any_http_host_will_do(case: Case) -> None:
    template = "{" in case.url
    problem = webhook_url_problem(case.url, AllowedHosts.parse([]), template=template)
    if case.problem is None:
        assert problem is None
    else:
        assert problem is not None
        assert case.problem in problem


def test_empty_and_blank_entries_allow_any_host() -> None:
    assert not AllowedHosts.parse(["", "  "])
    assert AllowedHosts.parse(["*.example.org"])


# --- through the API ----------------------------------------------------------------------


@pytest.fixture
async def guarded(embedded_settings: Settings, socket_dir: Path) -> AsyncIterator[Api]:
    settings = embedded_settings.model_copy(update={"webhook_allowed_hosts": list(ALLOWED)})
    async with open_api(settings, socket_dir) as harness:
        yield harness


async def test_channel_urls_are_checked_on_create(guarded: Api) -> None:
    for field in ("mo_url", "status_url"):
        body = {"type": "fake", "config": {"host": "h"}, field: "http://allowed.org@evil.com/"}
        status, payload = await call(guarded, "POST", "/channels/", body)
        assert status == 400
        description, kind, message = error_of(payload)
        assert (description, kind) == ("api usage error", "ApiUsageError")
        assert message.startswith(f"{field} 'http://allowed.org@evil.com/': host 'evil.com'")
    assert await guarded.store.list_channels() == []
    await guarded.create_channel(mo_url="http://hooks.example.org/{to}")


async def test_channel_urls_are_checked_on_modify(guarded: Api) -> None:
    cid = await guarded.create_channel(mo_url="http://allowed.org/mo")
    status, payload = await call(guarded, "POST", f"/channels/{cid}", {"mo_url": "http://{to}/"})
    assert status == 400
    assert HOST_IN_TEMPLATE in error_of(payload)[2]
    stored = await guarded.store.get_channel(cid)
    assert stored is not None
    assert stored["mo_url"] == "http://allowed.org/mo"
    assert ("start_channel", cid) not in guarded.supervisor.lifecycle()[1:]


async def test_event_url_is_checked_on_send(guarded: Api) -> None:
    cid = await guarded.create_channel(mo_url="http://allowed.org/mo")
    body = {"to": "+1", "content": "x", "event_url": "https://evil.com/ev"}
    status, payload = await call(guarded, "POST", f"/channels/{cid}/messages/", body)
    assert status == 400
    assert "event_url 'https://evil.com/ev': host 'evil.com'" in error_of(payload)[2]
    body["event_url"] = "https://10.0.0.1/ev/{message_id}"
    status, _ = await call(guarded, "POST", f"/channels/{cid}/messages/", body)
    assert status == 201


async def test_destination_urls_are_checked(guarded: Api) -> None:
    _, rid = await make_router(guarded)
    base = f"/routers/{rid}/destinations/"
    body = {"config": {"regular_expression": "^1$"}, "mo_url": "http://evil.com/"}
    status, payload = await call(guarded, "POST", base, body)
    assert (status, error_of(payload)[1]) == (400, "ApiUsageError")
    did = await make_destination(guarded, rid, mo_url="http://allowed.org/mo")
    status, payload = await call(guarded, "PATCH", f"{base}{did}", {"mo_url": "ftp://allowed.org"})
    assert status == 400
    assert "the scheme must be http or https" in error_of(payload)[2]
    send = {"to": "123", "content": "x", "event_url": "http://[::2]/"}
    status, payload = await call(guarded, "POST", f"{base}{did}/messages/", send)
    assert status == 400
    assert "host '::2'" in error_of(payload)[2]


async def test_without_an_allow_list_urls_still_need_http_and_a_host(http_api: Api) -> None:
    body = {"type": "fake", "config": {"host": "h"}, "mo_url": "hooks.test/mo"}
    status, payload = await call(http_api, "POST", "/channels/", body)
    assert status == 400
    assert "the scheme must be http or https (got none)" in error_of(payload)[2]
    await http_api.create_channel(mo_url="http://{to}.anywhere.test/mo")
