"""The fake webhook receiver answers, records and follows its script."""

from __future__ import annotations

import math

import httpx
import pytest
import trio
import trio.testing

from tests.fakes.webhook import DROP, open_fake_webhook


async def test_webhook_records_path_headers_and_json_body() -> None:
    async with open_fake_webhook() as hook, httpx.AsyncClient() as http:
        response = await http.post(
            hook.url("/mo?x=1"), json={"a": 1}, headers={"Authorization": "Token t"}
        )
        assert response.status_code == 200
        (request,) = await hook.wait_for_requests(1)
    assert request.method == "POST"
    assert request.path == "/mo?x=1"
    assert request.headers["authorization"] == "Token t"
    assert request.json() == {"a": 1}
    assert request.ok


async def test_webhook_fail_next_answers_scripted_statuses_then_200() -> None:
    async with open_fake_webhook() as hook, httpx.AsyncClient() as http:
        hook.fail_next(2, status=502)
        statuses = [(await http.post(hook.url(), json={})).status_code for _ in range(3)]
    assert statuses == [502, 502, 200]
    assert [r.status for r in hook.requests] == [502, 502, 200]
    assert len(hook.delivered) == 1


async def test_webhook_drop_closes_without_answer() -> None:
    async with open_fake_webhook() as hook, httpx.AsyncClient() as http:
        hook.fail_next(1, status=DROP)
        with pytest.raises(httpx.TransportError):
            await http.post(hook.url(), json={})
        assert (await http.post(hook.url(), json={})).status_code == 200


async def test_webhook_go_down_and_come_up() -> None:
    async with open_fake_webhook() as hook, httpx.AsyncClient() as http:
        hook.go_down()
        assert (await http.post(hook.url(), json={})).status_code == 503
        hook.come_up()
        assert (await http.post(hook.url(), json={})).status_code == 200


async def test_webhook_keeps_alive_across_requests() -> None:
    async with open_fake_webhook() as hook, httpx.AsyncClient() as http:
        for n in range(3):
            await http.post(hook.url(f"/{n}"), json={"n": n})
    assert [r.path for r in hook.requests] == ["/0", "/1", "/2"]


async def test_webhook_wait_for_requests_blocks_until_enough_arrive() -> None:
    async with open_fake_webhook() as hook, httpx.AsyncClient() as http:
        got: list[int] = []

        async def waiter() -> None:
            got.append(len(await hook.wait_for_requests(2, delivered_only=True)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await http.post(hook.url(), json={})
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            await http.post(hook.url(), json={})
        assert got == [2]


async def test_webhook_unused_script_fails_at_exit() -> None:
    with pytest.raises(AssertionError, match="never used"):
        async with open_fake_webhook() as hook:
            hook.fail_next(1)


async def test_webhook_fail_path_fails_only_that_path() -> None:
    async with open_fake_webhook() as hook, httpx.AsyncClient() as http:
        hook.fail_path("/mo", status=504)
        assert (await http.post(hook.url("/mo"), json={})).status_code == 504
        assert (await http.post(hook.url("/ev"), json={})).status_code == 200
        hook.come_up()
        assert (await http.post(hook.url("/mo"), json={})).status_code == 200


async def test_webhook_hold_records_then_answers_on_release() -> None:
    async with open_fake_webhook() as hook, httpx.AsyncClient() as http:
        hook.hold()
        statuses: list[int] = []

        async def post(n: int) -> None:
            statuses.append((await http.post(hook.url(f"/{n}"), json={})).status_code)

        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(post, n)
            with trio.fail_after(5):
                await hook.wait_for_requests(3)
            await trio.testing.wait_all_tasks_blocked()
            assert statuses == []
            assert hook.in_flight == 3
            hook.release()
    assert statuses == [200, 200, 200]
    assert (hook.in_flight, hook.max_in_flight) == (0, 3)


@pytest.mark.slow
async def test_webhook_delay_path_answers_late_or_never() -> None:
    async with open_fake_webhook() as hook, httpx.AsyncClient(timeout=0.5) as http:
        hook.delay_path("/slow", 0.3)
        hook.delay_path("/never", math.inf)
        began = trio.current_time()
        assert (await http.post(hook.url("/slow"), json={})).status_code == 200
        assert trio.current_time() - began >= 0.3
        with pytest.raises(httpx.ReadTimeout):
            await http.post(hook.url("/never"), json={})
        assert (await http.post(hook.url("/other"), json={})).status_code == 200
    assert [r.path for r in hook.requests] == ["/slow", "/never", "/other"]
    assert hook.requests[2].at >= hook.requests[1].at + 0.5


async def test_webhook_answer_size_sends_a_large_body() -> None:
    async with open_fake_webhook() as hook, httpx.AsyncClient() as http:
        hook.answer_size = 1_000_001
        response = await http.post(hook.url(), json={})
    assert response.status_code == 200
    assert len(response.content) == 1_000_001
