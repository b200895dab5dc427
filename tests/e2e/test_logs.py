"""Channel logs (docs 1.8.1 "Channel Logs", behaviour 9) through the real gateway.

What the channel did shows up in `GET /channels/{id}/logs` newest first, capped by
`max_logs`, with the documented exception shape, no secrets, and rotated files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest
import trio

from tests.e2e.gateway import WAIT, free_port, remember_channel, running_gateway, wait_for
from tests.e2e.test_getting_started import assert_envelope, connect_telnet, mo_messages
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MO_TOKEN: Final = "mo-token-Lg7q2"
URL_PASSWORD: Final = "url-pw-Hn4s8"
CONFIG_PASSWORD: Final = "telnet-pw-Wc3x9"
EXPLODING: Final = "exploding:tests.channel_proc.custom_transports:ExplodingTransport"
ENTRY_KEYS: Final = {"logger", "level", "timestamp", "message"}

JsonObject = dict[str, Any]


async def get_logs(gateway: Gateway, channel_id: str, query: str = "") -> list[JsonObject]:
    response = await gateway.request("GET", f"/channels/{channel_id}/logs{query}")
    body = response.json()
    assert_envelope(body, 200, "logs retrieved")
    entries: list[JsonObject] = body["result"]
    return entries


async def logs_until(
    gateway: Gateway, channel_id: str, text: str, query: str = ""
) -> list[JsonObject]:
    """The logs, once an entry containing `text` is among them."""
    found: list[JsonObject] = []

    async def logged() -> bool:
        found[:] = await get_logs(gateway, channel_id, query)
        return any(text in entry["message"] for entry in found)

    with trio.fail_after(WAIT):
        await wait_for(logged)
    return found


def assert_entry_shape(entry: JsonObject, channel_id: str) -> None:
    assert set(entry) - {"message_id"} in (ENTRY_KEYS, {*ENTRY_KEYS, "exception"})
    assert entry["logger"] == channel_id
    assert entry["level"] in (20, 30, 40, 50)
    assert isinstance(entry["timestamp"], float)
    assert isinstance(entry["message"], str)


def assert_newest_first(entries: list[JsonObject]) -> None:
    stamps = [entry["timestamp"] for entry in entries]
    assert stamps == sorted(stamps, reverse=True)


def files_newest_first(logging_path: str, channel_id: str) -> list[JsonObject]:
    """Every entry on disk, newest first: the current file, then `.1`, `.2`, ..."""
    base = Path(logging_path) / channel_id
    paths = [base]
    while (rotated := Path(f"{base}.{len(paths)}")).exists():
        paths.append(rotated)
    entries: list[JsonObject] = []
    for path in paths:
        lines = path.read_text().splitlines() if path.exists() else []
        entries += [json.loads(line) for line in reversed(lines) if line.strip()]
    return entries


def file_sizes(logging_path: str, channel_id: str) -> dict[str, int]:
    """Name -> size of the channel's log files, sorted by name."""
    paths = sorted(Path(logging_path).glob(f"{channel_id}*"))
    return {path.name: path.stat().st_size for path in paths}


async def test_logs_say_what_the_channel_did_without_secrets(settings: Settings) -> None:
    telnet_port = free_port()
    extra = ["--webhook-max-age", "2"]
    async with open_fake_webhook() as hook, running_gateway(settings, extra_args=extra) as gateway:
        mo_url = hook.url("/mo").replace("http://", f"http://mo-user:{URL_PASSWORD}@")
        response = await gateway.request(
            "POST",
            "/channels/",
            {
                "type": "telnet",
                "config": {
                    "twisted_endpoint": f"tcp:{telnet_port}",
                    "password": CONFIG_PASSWORD,
                },
                "mo_url": mo_url,
                "mo_url_auth_token": MO_TOKEN,
            },
        )
        assert response.status_code == 201, response.json()
        cid = response.json()["result"]["id"]
        remember_channel(settings, cid)

        # The first POST to mo_url fails: a retry, then the delivery.
        hook.fail_next(1, status=500)
        user = await connect_telnet(gateway, cid, telnet_port)
        (new,) = await mo_messages(hook, 1)
        await user.type("Hi there")
        _, resume = await mo_messages(hook, 2)

        # A message that reaches the user, whose event_url never answers 2xx: retried,
        # then dead-lettered after --webhook-max-age.
        hook.fail_path("/ev-dead")
        sent = await gateway.request(
            "POST",
            f"/channels/{cid}/messages/",
            {"to": user.address, "content": "hello", "event_url": hook.url("/ev-dead")},
        )
        assert sent.status_code == 201, sent.json()
        sent_id = sent.json()["result"]["message_id"]
        assert await user.read_line() == "hello"
        # A message to nobody: the transport rejects it.
        lost = await gateway.request(
            "POST", f"/channels/{cid}/messages/", {"to": "10.9.8.7:6543", "content": "lost"}
        )
        lost_id = lost.json()["result"]["message_id"]
        address = user.address
        await user.stream.aclose()

        entries = await logs_until(gateway, cid, "moved a message")
        assert entries
        for entry in entries:
            assert_entry_shape(entry, cid)
        assert_newest_first(entries)
        messages = [entry["message"] for entry in entries]
        text = "\n".join(messages)

        def logged(*parts: str) -> bool:
            return any(all(part in message for part in parts) for message in messages)

        assert logged("listening", str(telnet_port))
        assert logged(address, "connected")
        assert logged(address, "disconnected")
        assert logged(new["message_id"])
        assert logged(resume["message_id"])
        assert logged(resume["message_id"], "delivered to mo_url")
        assert logged("not delivered to mo_url", "retry")
        assert logged(sent_id)
        assert logged(sent_id, "not delivered to event_url")
        assert logged("giving up", sent_id)
        assert logged(lost_id, "rejected")
        for secret in (MO_TOKEN, URL_PASSWORD, CONFIG_PASSWORD):
            assert secret not in text
        on_disk = json.dumps(files_newest_first(settings.logging_path, cid))
        for secret in (MO_TOKEN, URL_PASSWORD, CONFIG_PASSWORD):
            assert secret not in on_disk
        # Warnings are WARNING, the dead-letter an ERROR.
        assert next(e for e in entries if "not delivered to mo_url" in e["message"])["level"] == 30
        assert next(e for e in entries if "moved a message" in e["message"])["level"] == 40

        # ?n= takes the newest n.
        three = await get_logs(gateway, cid, "?n=3")
        assert len(three) == 3
        everything = await get_logs(gateway, cid)
        assert any(everything[i : i + 3] == three for i in range(len(everything)))


async def test_logs_rotate_and_are_capped_by_max_logs(embedded_settings: Settings) -> None:
    telnet_port = free_port()
    flags = ["--log-rotate-size", "700", "--max-log-files", "2", "--max-logs", "6"]
    async with running_gateway(embedded_settings, extra_args=flags) as gateway:
        response = await gateway.request(
            "POST",
            "/channels/",
            {"type": "telnet", "config": {"twisted_endpoint": f"tcp:{telnet_port}"}},
        )
        assert response.status_code == 201, response.json()
        cid = response.json()["result"]["id"]
        remember_channel(embedded_settings, cid)
        logging_path = embedded_settings.logging_path
        first = await connect_telnet(gateway, cid, telnet_port)
        await first.stream.aclose()
        for _ in range(3):
            async with await trio.open_tcp_stream("127.0.0.1", telnet_port) as stream:
                await stream.send_all(b"a line\r\n")

        # The newest six, across the current file and the rotated ones, newest first.
        entries: list[JsonObject] = []

        async def api_matches_files() -> bool:
            entries[:] = await get_logs(gateway, cid)
            return entries == files_newest_first(logging_path, cid)[:6]

        with trio.fail_after(WAIT):
            await wait_for(api_matches_files)
        assert len(entries) == 6
        assert_newest_first(entries)
        # A file is rotated before a write would take it past the size; two rotated kept.
        sizes = file_sizes(logging_path, cid)
        assert list(sizes) == [cid, f"{cid}.1", f"{cid}.2"]
        assert all(size < 700 for size in sizes.values())
        # The oldest entries were rotated away.
        assert not any("listening" in e["message"] for e in files_newest_first(logging_path, cid))

        assert len(await get_logs(gateway, cid, "?n=2")) == 2
        assert len(await get_logs(gateway, cid, "?n=1000")) == 6
        assert await get_logs(gateway, cid, "?n=0") == []
        bad = await gateway.request("GET", f"/channels/{cid}/logs?n=abc")
        assert_envelope(bad.json(), 400, "api usage error")
        missing = await gateway.request("GET", "/channels/no-such-channel/logs")
        assert_envelope(missing.json(), 404, "channel not found")


async def test_logs_show_an_exception_in_the_documented_shape(
    embedded_settings: Settings,
) -> None:
    secret = "exploding-key-Pq8d"
    async with (
        open_fake_webhook() as hook,
        running_gateway(embedded_settings, extra_args=["--channels", EXPLODING]) as gateway,
    ):
        response = await gateway.request(
            "POST",
            "/channels/",
            {"type": "exploding", "config": {"secret_key": secret}, "mo_url": hook.url("/mo")},
        )
        assert response.status_code == 201, response.json()
        cid = response.json()["result"]["id"]
        remember_channel(embedded_settings, cid)
        sent = await gateway.request(
            "POST", f"/channels/{cid}/messages/", {"to": "+27821234567", "content": "boom"}
        )
        assert sent.status_code == 201, sent.json()

        entries = await logs_until(gateway, cid, "crashed")
        crash = next(e for e in entries if "crashed" in e["message"])
        assert_entry_shape(crash, cid)
        assert crash["level"] == 40
        exception = crash["exception"]
        assert set(exception) == {"class", "instance", "stack"}
        assert exception["class"] == "ValueError"
        assert exception["instance"] == "ValueError(\"Bad value 'boom' (key ***)\")"
        assert exception["stack"]
        assert all(isinstance(line, str) for line in exception["stack"])
        assert any("custom_transports.py" in line for line in exception["stack"])
        assert secret not in json.dumps(entries)
        # The message stays queued and would crash it again: stop the loop.
        deleted = await gateway.request("DELETE", f"/channels/{cid}")
        assert_envelope(deleted.json(), 200, "channel deleted")
