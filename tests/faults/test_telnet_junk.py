"""Fault 6, telnet side: clients that send binary junk or a 10 MB line, against the real
gateway.

A well-behaved client sends a line every LINE_PERIOD s throughout. One hostile client
sends binary junk (invalid UTF-8, NULs, control characters, telnet IAC sequences): its
lines reach the mo_url as the transport reads them. Another sends 10 MB without a newline:
it is told the line is too long and disconnected. The channel process stays the same
process, its memory does not grow with the junk, and the good client's lines keep
arriving at the rate they did before, and outbound messages still reach it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest
import trio

from channel_proc.transports.telnet import MAX_LINE_BYTES, LineReader
from tests.e2e.gateway import (
    WAIT,
    channel_pids,
    free_port,
    remember_channel,
    running_gateway,
    wait_for,
)
from tests.fakes.webhook import open_fake_webhook

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway
    from tests.fakes.webhook import FakeWebhook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LINE_PERIOD: Final = 0.1
BASELINE: Final = 2.0
#: The good client's share of its baseline rate while the junk arrives: generous, since
#: this checks that nothing stalls on a shared machine, not how fast anything is.
KEPT_SHARE: Final = 0.5
HUGE_LINE: Final = 10 * 1024 * 1024
#: How much the channel process may grow while it reads 10 MB it must not keep.
RSS_SLACK: Final = 20 * 1024 * 1024


def junk_lines() -> bytes:
    """Lines of binary junk: invalid UTF-8, NULs, control characters, IAC sequences."""
    rng = random.Random(6)
    pieces = [
        b"\x00\x00\x00\n",
        b"\xc0\xaf\xed\xa0\x80\xf8\x88\x80\x80\x80\r\n",
        b"\x07\x08\x1b[2J\x1b]0;title\x07\x7f\n",
        b"\xff\xfb\x01\xff\xfd\x03\xff\xfa\x18\x00ANSI\xff\xf0junk\xff\xff\n",
        b"\xff\xf4\xff\xfd\x06after interrupt\r\n",
    ]
    for _ in range(20):
        line = bytes(rng.choice([b for b in range(256) if b not in (10, 255)]) for _ in range(200))
        pieces.append(line + b"\n")
    return b"".join(pieces)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def create_telnet_channel(gateway: Gateway, hook: FakeWebhook, port: int) -> str:
    body: dict[str, Any] = {
        "type": "telnet",
        "config": {"twisted_endpoint": f"tcp:port={port}:interface=127.0.0.1"},
        "mo_url": hook.url("/mo"),
    }
    response = await gateway.request("POST", "/channels/", body)
    assert response.status_code == 201, response.text
    channel_id: str = response.json()["result"]["id"]
    remember_channel(gateway.settings, channel_id)

    async def listening() -> bool:
        found = (await gateway.request("GET", f"/channels/{channel_id}")).json()
        telnet = found["result"]["status"]["components"].get("telnet")
        return bool(telnet) and telnet["type"] == "listening"

    with trio.fail_after(WAIT):
        await wait_for(listening)
    return channel_id


def mo_from(hook: FakeWebhook, address: str) -> list[dict[str, Any]]:
    return [m for r in hook.on_path("/mo") if (m := r.json())["from"] == address]


def session_event(mo: dict[str, Any]) -> str:
    event: str = mo["channel_data"]["session_event"]
    return event


def address_of(stream: trio.SocketStream) -> str:
    host, port = stream.socket.getsockname()[:2]
    return f"{host}:{port}"


async def wait_mo(hook: FakeWebhook, address: str, condition: Any) -> list[dict[str, Any]]:
    async def holds() -> bool:
        return bool(condition(mo_from(hook, address)))

    with trio.fail_after(WAIT):
        await wait_for(holds)
    return mo_from(hook, address)


async def good_client(stream: trio.SocketStream, sent: list[float], stop: trio.Event) -> None:
    n = 0
    while not stop.is_set():
        await stream.send_all(f"good {n}\r\n".encode())
        sent.append(trio.current_time())
        n += 1
        with trio.move_on_after(LINE_PERIOD):
            await stop.wait()


async def read_all(stream: trio.SocketStream) -> bytes:
    received = b""
    try:
        while chunk := await stream.receive_some(65536):
            received += chunk
    except trio.BrokenResourceError:
        pass  # reset while the client was still sending: what came before counts
    return received


async def test_telnet_junk_and_huge_lines(settings: Settings) -> None:
    port = free_port()
    async with open_fake_webhook() as hook, running_gateway(settings) as gateway:
        cid = await create_telnet_channel(gateway, hook, port)
        (pid,) = channel_pids(cid)
        good = await trio.open_tcp_stream("127.0.0.1", port)
        good_addr = address_of(good)
        stop = trio.Event()
        sent: list[float] = []
        async with good, trio.open_nursery() as nursery:
            nursery.start_soon(good_client, good, sent, stop)
            await wait_mo(hook, good_addr, lambda found: len(found) >= 3)
            await trio.sleep(BASELINE)
            baseline = len(mo_from(hook, good_addr)) / BASELINE
            rss_before = rss(pid)
            began, count_before = trio.current_time(), len(mo_from(hook, good_addr))

            # Binary junk: every line arrives, read as the transport reads it.
            junk = junk_lines()
            expected = LineReader().feed(junk)
            async with await trio.open_tcp_stream("127.0.0.1", port) as bad:
                bad_addr = address_of(bad)
                for start in range(0, len(junk), 97):
                    await bad.send_all(junk[start : start + 97])

                def resumed(found: list[dict[str, Any]]) -> list[str | None]:
                    return [m["content"] for m in found if session_event(m) == "resume"]

                found = await wait_mo(hook, bad_addr, lambda f: len(resumed(f)) >= len(expected))
            # Webhook posts may overtake one another: compare what arrived, not the order.
            assert sorted(resumed(found)) == sorted(expected)  # type: ignore[type-var]

            # 10 MB without a newline: a notice, then the connection is closed.
            async with await trio.open_tcp_stream("127.0.0.1", port) as huge:
                huge_addr = address_of(huge)
                async with trio.open_nursery() as sending:

                    async def send_huge() -> None:
                        block = b"z" * 65536
                        try:
                            for _ in range(HUGE_LINE // len(block)):
                                await huge.send_all(block)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass

                    sending.start_soon(send_huge)
                    with trio.fail_after(WAIT):
                        notice = await read_all(huge)
                    sending.cancel_scope.cancel()
            assert (
                notice
                == f"Error: line longer than {MAX_LINE_BYTES} bytes; disconnecting.\r\n".encode()
            )
            events = await wait_mo(
                hook,
                huge_addr,
                lambda f: sorted(map(session_event, f)) == ["close", "new"],
            )
            assert all(m["content"] is None for m in events)
            rss_after = rss(pid)
            ended = max(trio.current_time(), began + BASELINE)
            await trio.sleep_until(ended)
            during = (len(mo_from(hook, good_addr)) - count_before) / (ended - began)

            # The good session is still served both ways.
            response = await gateway.request(
                "POST", f"/channels/{cid}/messages/", {"to": good_addr, "content": "still there"}
            )
            assert response.status_code == 201, response.text
            with trio.fail_after(WAIT):
                assert b"still there\r\n" in await good.receive_some(65536)
            stop.set()

        print(
            f"good client: {baseline:.1f}/s before, {during:.1f}/s during; channel RSS "
            f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
        )
        assert during >= KEPT_SHARE * baseline, (baseline, during)
        assert rss_after - rss_before < RSS_SLACK
        assert channel_pids(cid) == [pid]
        await wait_mo(hook, good_addr, lambda f: len(f) >= len(sent) + 1)
        log = (Path(settings.logging_path) / cid).read_text(errors="replace")
        assert f"line from {huge_addr} longer than {MAX_LINE_BYTES} bytes; disconnected" in log
        body = (await gateway.request("GET", f"/channels/{cid}")).json()
        assert body["result"]["status"]["components"]["telnet"]["status"] == "ok"
