"""run_supervisor in-process with scripted children, driven over the real control socket."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from ipc import exit_codes
from ipc.client import open_ipc_client
from ipc.errors import RemoteError
from ipc.messages import (
    CatalogReply,
    ChildrenReply,
    ChildState,
    GetCatalog,
    GetStatus,
    ListChildren,
    Ok,
    Ping,
    RestartChannel,
    Role,
    StartChannel,
    StopChannel,
)
from ipc.names import Namespace, supervisor_socket
from ipc.state import open_state
from supervisor.run import run_supervisor
from tests.supervisor.child_script import CATALOG
from tests.supervisor.harness import POLICY, gateway, seed
from tests.supervisor.scripted import fake_commands, pid_alive, script_argv, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    from ipc.settings import Settings

pytestmark = pytest.mark.slow


async def test_supervisor_boots_api_and_stored_channels_then_stops_cleanly(
    gw_settings: Settings, tmp_path: Path
) -> None:
    await seed(gw_settings, "c1", "c2")
    record = tmp_path / "api.json"
    commands = fake_commands({}, api_mode=("record", str(record)))
    async with gateway(gw_settings, commands) as gw:
        children = await gw.children()
        assert sorted(children) == ["c1", "c2"]
        assert all(state is ChildState.RUNNING for state, _ in children.values())
        api = json.loads(record.read_text())
        assert api["port"] == gw.running.api_address[1]
        assert api["listening"]
        assert api["run_dir"] == str(gw.running.run_dir)
        assert gw.running.run_dir.name.startswith("jb-")
        pids = [pid for _, pid in children.values()] + [api["pid"]]
    assert gw.result == [0]
    assert not any(pid_alive(pid) for pid in pids if pid is not None)
    assert not gw.running.run_dir.exists()


async def test_control_ping_catalog_and_unsupported(gw_settings: Settings) -> None:
    async with gateway(gw_settings, fake_commands({})) as gw:
        assert isinstance(await gw.client.request(Ping(id=0)), Ok)
        catalog = await gw.client.request(GetCatalog(id=0))
        assert isinstance(catalog, CatalogReply)
        assert catalog.config_schemas == CATALOG
        with pytest.raises(RemoteError) as info:
            await gw.client.request(GetStatus(id=0))
        assert (info.value.code, info.value.error_type) == (400, "UnsupportedRequest")


async def test_control_start_restart_stop(gw_settings: Settings) -> None:
    async with gateway(gw_settings, fake_commands({})) as gw:
        with pytest.raises(RemoteError) as info:
            await gw.client.request(StartChannel(id=0, channel_id="c9"))
        assert (info.value.code, info.value.error_type) == (404, "ChannelNotFound")

        await seed(gw_settings, "c9")
        assert isinstance(await gw.client.request(StartChannel(id=0, channel_id="c9")), Ok)
        state, first = (await gw.children())["c9"]
        assert state is ChildState.RUNNING

        assert isinstance(await gw.client.request(RestartChannel(id=0, channel_id="c9")), Ok)
        state, second = (await gw.children())["c9"]
        assert state is ChildState.RUNNING
        assert second != first
        assert first is not None
        assert not pid_alive(first)

        reply = await gw.client.request(StopChannel(id=0, channel_id="c9"))
        assert reply == Ok(id=reply.id, detail="stopped")
        assert await gw.children() == {}
        assert second is not None
        assert not pid_alive(second)
        reply = await gw.client.request(StopChannel(id=0, channel_id="c9"))
        assert reply == Ok(id=reply.id, detail="not running")


@pytest.mark.parametrize(
    ("mode", "code", "error_type"),
    [
        (("exit", "78"), 400, "ChannelConfigError"),
        (("silent",), 503, "ChannelStartTimeout"),
        (("exit", "70"), 503, "ChannelStartFailed"),
    ],
)
async def test_control_start_failures(
    gw_settings: Settings, mode: tuple[str, ...], code: int, error_type: str
) -> None:
    # Short only where the timeout is the point: the others (and the API worker, which
    # shares the policy) must not lose a race against a busy machine.
    policy = replace(POLICY, start_timeout=2.0) if mode == ("silent",) else POLICY
    async with gateway(gw_settings, fake_commands({"bad": mode}), policy) as gw:
        await seed(gw_settings, "bad")
        with trio.fail_after(10), pytest.raises(RemoteError) as info:
            await gw.client.request(StartChannel(id=0, channel_id="bad"))
        assert (info.value.code, info.value.error_type) == (code, error_type)


async def test_control_config_error_is_written_to_the_store(gw_settings: Settings) -> None:
    async with gateway(gw_settings, fake_commands({"bad": ("exit", "78")})) as gw:
        await seed(gw_settings, "bad")
        with pytest.raises(RemoteError):
            await gw.client.request(StartChannel(id=0, channel_id="bad"))
        assert (await gw.children())["bad"] == (ChildState.FAILED, None)
        async with open_state(gw_settings, Namespace(gw_settings.namespace)) as store:
            status = (await store.get_statuses("bad"))["process"]
        assert (status["status"], status["type"]) == ("down", "config_error")


async def test_control_config_error_carries_the_channels_own_reason(gw_settings: Settings) -> None:
    reason = "config.port: Input should be a valid integer"
    commands = fake_commands({"bad": ("config-error", reason)})
    async with gateway(gw_settings, commands) as gw:
        await seed(gw_settings, "bad")
        with pytest.raises(RemoteError) as info:
            await gw.client.request(StartChannel(id=0, channel_id="bad"))
        assert (info.value.error_type, info.value.message) == ("ChannelConfigError", reason)
        async with open_state(gw_settings, Namespace(gw_settings.namespace)) as store:
            status = (await store.get_statuses("bad"))["process"]
        assert status["type"] == "config_error"
        assert status["message"] == reason
        reply = await gw.client.request(ListChildren(id=0))
        assert isinstance(reply, ChildrenReply)
        assert reply.children[0].reason == reason


async def test_supervisor_catalog_failure_exits_78(
    gw_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    commands = replace(fake_commands({}), describe=script_argv("describe", "78"))
    with caplog.at_level(logging.ERROR):
        code = await run_supervisor(gw_settings, commands=commands, handle_signals=False)
    assert code == exit_codes.EXIT_CONFIG
    assert "channel types: bad channel mapping: nosuch.module:Thing" in caplog.text


async def test_supervisor_port_taken_exits_69(
    gw_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = gw_settings.model_copy(update={"port": port})
        with caplog.at_level(logging.ERROR):
            code = await run_supervisor(settings, commands=fake_commands({}), handle_signals=False)
    assert code == exit_codes.EXIT_UNAVAILABLE
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in caplog.text


async def test_supervisor_api_config_error_at_boot_exits_78(
    gw_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    commands = fake_commands({}, api_mode=("exit", "78"))
    with trio.fail_after(20), caplog.at_level(logging.ERROR):
        code = await run_supervisor(gw_settings, commands=commands, handle_signals=False)
    assert code == exit_codes.EXIT_CONFIG
    assert "API worker 0 did not start: configuration error" in caplog.text


async def test_supervisor_refuses_a_run_dir_too_long_for_sockets(
    gw_settings: Settings, tmp_path: Path
) -> None:
    settings = gw_settings.model_copy(update={"run_dir": tmp_path / ("x" * 80)})
    assert await run_supervisor(settings, handle_signals=False) == exit_codes.EXIT_CONFIG


async def test_supervisor_refuses_a_run_dir_in_use(
    gw_settings: Settings, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = gw_settings.model_copy(update={"run_dir": run_dir})
    async with gateway(settings, fake_commands({})):
        with trio.fail_after(20), caplog.at_level(logging.ERROR):
            code = await run_supervisor(settings, commands=fake_commands({}), handle_signals=False)
    assert code == exit_codes.EXIT_UNAVAILABLE
    assert f"cannot serve the control socket {run_dir}/supervisor.sock" in caplog.text
    assert await trio.Path(run_dir).exists()


async def test_boot_restore_leaves_a_channel_started_meanwhile_alone(
    gw_settings: Settings, run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The control socket serves while the boot still waits for the API worker, so a
    channel may be started (by a request) before the stored channels are restored."""
    gate = tmp_path / "gate"
    gate.mkdir()
    settings = gw_settings.model_copy(update={"run_dir": run_dir})
    await seed(settings, "c1")
    commands = fake_commands({}, api_mode=("gate", str(gate)))
    stop = trio.Event()
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(run_supervisor, settings, commands=commands, stop=stop, handle_signals=False)
        )
        with trio.fail_after(20):
            await wait_for((gate / "started").exists)
        async with open_ipc_client(supervisor_socket(run_dir), role=Role.CLI) as client:
            with trio.fail_after(20):
                assert isinstance(await client.request(StartChannel(id=0, channel_id="c1")), Ok)
            reply = await client.request(ListChildren(id=0))
            assert isinstance(reply, ChildrenReply)
            [before] = reply.children
            (gate / "go").write_text("")
            with trio.fail_after(20):
                await wait_for(lambda: "1/1 channel(s) running" in caplog.text)
            reply = await client.request(ListChildren(id=0))
            assert isinstance(reply, ChildrenReply)
            [after] = reply.children
        assert after.state is ChildState.RUNNING
        assert (after.pid, after.restarts) == (before.pid, 0)
        stop.set()
