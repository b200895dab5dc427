"""One SMPP bind serving three applications, through the real gateway, on both backends.

An smpp channel against the fake SMSC, a from_address router and destinations on the long
codes ^12345$ and ^12346$ plus a default. Inbound messages reach only their destination's
mo_url; each destination replies and sends fresh messages that leave through the one bind
with its own `from`; each gets only its own events and delivery reports. Then the gateway
restarts and the routing is restored; deleting the router stops it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.e2e.gateway import WAIT, remember_channel, running_gateway, wait_for
from tests.fakes.fake_smsc import open_fake_smsc, smpp_config
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.fake_smsc import FakeSmsc
    from tests.fakes.webhook import FakeWebhook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JsonObject = dict[str, Any]

#: destination name -> (long code it answers on, its regex, default?)
APPS = {
    "a": ("12345", "^12345$", False),
    "b": ("12346", "^12346$", False),
    "c": ("12347", "^12347$", True),
}


async def api(gateway: Gateway, method: str, path: str, body: Any = None) -> Any:
    """The `result` of a successful request."""
    response = await gateway.request(method, path, body)
    payload: JsonObject = response.json()
    assert response.status_code in (200, 201), payload
    return payload["result"]


async def wait_bound_once_more(smsc: FakeSmsc, binds: int) -> None:
    """Until the SMSC saw `binds` binds in all and only the newest one is still bound."""
    with trio.fail_after(WAIT):
        await smsc.wait_until(
            lambda: len(smsc.pdus("bind_transceiver")) >= binds and len(smsc.bound) == 1
        )


async def set_up(
    gateway: Gateway, smsc: FakeSmsc, hook: FakeWebhook
) -> tuple[str, str, dict[str, str]]:
    """The channel (no mo_url of its own), its router and the three destinations."""
    channel = await api(
        gateway, "POST", "/channels/", {"type": "smpp", "config": smpp_config(smsc)}
    )
    cid = channel["id"]
    remember_channel(gateway.settings, cid)
    router = await api(
        gateway,
        "POST",
        "/routers/",
        {"type": "from_address", "label": "three apps", "config": {"channel": cid}},
    )
    rid = router["id"]
    dids: dict[str, str] = {}
    for name, (_, regex, default) in APPS.items():
        body = {
            "label": f"app {name}",
            "config": {"regular_expression": regex, "default": default},
            "mo_url": hook.url(f"/{name}/mo"),
            "mo_url_token": f"token-{name}",
        }
        destination = await api(gateway, "POST", f"/routers/{rid}/destinations/", body)
        dids[name] = destination["id"]
        remember_channel(gateway.settings, destination["id"])
    # Bound by the channel's start, then once per routing change (router, three destinations).
    await wait_bound_once_more(smsc, 5)
    return cid, rid, dids


async def deliver(smsc: FakeSmsc, to: str, text: str) -> None:
    response = await smsc.send_deliver_sm(destination_addr=to, short_message=text.encode())
    assert response.ok


def mo_of(hook: FakeWebhook, name: str) -> list[JsonObject]:
    return [request.json() for request in hook.on_path(f"/{name}/mo")]


async def test_one_smpp_bind_serves_three_applications(settings: Settings) -> None:
    async with (
        open_fake_webhook() as hook,
        open_fake_smsc(auto_receipt="DELIVRD") as smsc,
        running_gateway(settings) as gateway,
    ):
        cid, rid, dids = await set_up(gateway, smsc, hook)

        # Inbound: each long code to its application, anything else to the default one.
        await deliver(smsc, "12345", "to a")
        await deliver(smsc, "12346", "to b")
        await deliver(smsc, "99999", "to nobody")
        with trio.fail_after(WAIT):
            await hook.wait_for_requests(3, delivered_only=True)
        assert [m["content"] for m in mo_of(hook, "a")] == ["to a"]
        assert [m["content"] for m in mo_of(hook, "b")] == ["to b"]
        assert [m["content"] for m in mo_of(hook, "c")] == ["to nobody"]
        for name in APPS:
            [request] = hook.on_path(f"/{name}/mo")
            assert request.headers["authorization"] == f"Token token-{name}"
            assert request.json()["channel_id"] == cid

        # Each application replies and sends a fresh message, through its destination.
        sent: dict[str, list[str]] = {}
        expected_from: dict[str, str] = {}
        for name, (code, _, _) in APPS.items():
            [inbound] = mo_of(hook, name)
            path = f"/routers/{rid}/destinations/{dids[name]}/messages/"
            event_url = hook.url(f"/{name}/event")
            reply = await api(
                gateway,
                "POST",
                path,
                {
                    "reply_to": inbound["message_id"],
                    "content": f"reply {name}",
                    "event_url": event_url,
                },
            )
            fresh = await api(
                gateway,
                "POST",
                path.rstrip("/"),
                {
                    "to": "27820000009",
                    "from": code,
                    "content": f"fresh {name}",
                    "event_url": event_url,
                },
            )
            sent[name] = [reply["message_id"], fresh["message_id"]]
            expected_from[f"reply {name}"] = inbound["to"]
            expected_from[f"fresh {name}"] = code

        with trio.fail_after(WAIT):
            await smsc.wait_for("submit_sm", 6)
        # One bind carried them all (no other bind happened), each with its application's
        # address.
        assert len(smsc.pdus("bind_transceiver")) == 5
        assert len(smsc.bound) == 1
        by_content = {(s.octets("short_message") or b"").decode(): s.params for s in smsc.submits}
        assert {content: params["source_addr"] for content, params in by_content.items()} == (
            expected_from
        )
        assert by_content["reply a"]["destination_addr"] == "27820000000"

        # Events and delivery reports: each application gets its own, and only those.
        async def all_reported() -> bool:
            return all(len(hook.on_path(f"/{name}/event")) == 4 for name in APPS)

        with trio.fail_after(WAIT):
            await wait_for(all_reported)
        for name in APPS:
            events = [request.json() for request in hook.on_path(f"/{name}/event")]
            assert {event["message_id"] for event in events} == set(sent[name])
            assert sorted(event["event_type"] for event in events) == [
                "delivery_succeeded",
                "delivery_succeeded",
                "submitted",
                "submitted",
            ]
            assert {event["channel_id"] for event in events} == {dids[name]}
            status = await api(
                gateway,
                "GET",
                f"/routers/{rid}/destinations/{dids[name]}/messages/{sent[name][1]}",
            )
            assert status["last_event_type"] == "delivery_succeeded"
        # The channel keeps its view of every message too.
        status = await api(gateway, "GET", f"/channels/{cid}/messages/{sent['a'][0]}")
        assert len(status["events"]) == 2

        # A message sent through the channel endpoint from a's code is a's too.
        body = {"to": "27820000009", "from": "12345", "content": "via channel"}
        body["event_url"] = hook.url("/channel/event")
        channel_send = await api(gateway, "POST", f"/channels/{cid}/messages/", body)

        async def channel_send_reported() -> bool:
            return len(hook.on_path("/channel/event")) == 2

        with trio.fail_after(WAIT):
            await wait_for(channel_send_reported)
        events = [request.json() for request in hook.on_path("/channel/event")]
        assert {e["message_id"] for e in events} == {channel_send["message_id"]}
        assert {e["channel_id"] for e in events} == {dids["a"]}

        router = await api(gateway, "GET", f"/routers/{rid}")
        assert set(router["status"]) >= {"inbound_message_rate", "outbound_message_rate"}
        router_logs = await api(gateway, "GET", f"/routers/{rid}/logs")
        assert any("routed to" in entry["message"] for entry in router_logs)
        a_logs = await api(gateway, "GET", f"/routers/{rid}/destinations/{dids['a']}/logs")
        assert any("delivered to" in entry["message"] for entry in a_logs)
        # Secrets of destinations never reach the logs.
        assert not any("token-a" in entry["message"] for entry in router_logs + a_logs)

        # Restored at boot: after a full restart, inbound messages are still routed.
        assert await gateway.stop() == 0
        await gateway.start()
        await wait_bound_once_more(smsc, 6)
        await deliver(smsc, "12346", "after restart")

        async def b_got_it() -> bool:
            return [m["content"] for m in mo_of(hook, "b")] == ["to b", "after restart"]

        with trio.fail_after(WAIT):
            await wait_for(b_got_it)

        # Deleting the router stops it: the channel restarts unrouted, destinations are gone.
        await api(gateway, "DELETE", f"/routers/{rid}")
        await wait_bound_once_more(smsc, 7)
        response = await gateway.request("GET", f"/routers/{rid}/destinations/{dids['a']}")
        assert response.status_code == 404
        response = await gateway.request("GET", "/routers/")
        assert response.json()["result"] == []
        # The channel is a plain channel again: sending through it needs a destination.
        response = await gateway.request(
            "POST", f"/channels/{cid}/messages/", {"to": "1", "content": "x"}
        )
        assert response.status_code == 400
