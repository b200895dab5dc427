"""Plugins through the real supervisor lifecycle: boot, start/modify/restart/stop requests
on the control socket (what the API sends for create/modify/restart/delete), shutdown."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest
import trio

from ipc import exit_codes
from ipc.errors import RemoteError
from ipc.messages import ChildState, Ok, RestartChannel, Role, StartChannel, StopChannel
from ipc.names import Namespace
from ipc.state import open_state
from supervisor.plugins.host import PluginHost, load_plugin_class, load_plugins
from supervisor.plugins.nginx import NginxPlugin
from supervisor.run import run_supervisor
from supervisor.spec import ChildSpec
from tests.supervisor.harness import gateway, seed
from tests.supervisor.recording_plugins import (
    AsyncRecordingPlugin,
    NoArgsRequired,
    RecordingPlugin,
    hooks,
    read_events,
)
from tests.supervisor.scripted import fake_commands, script_argv, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    from ipc.settings import Settings

pytestmark = pytest.mark.slow

MODULE = "tests.supervisor.recording_plugins"


def with_plugins(settings: Settings, *plugins: dict[str, Any]) -> Settings:
    return settings.model_copy(update={"plugins": list(plugins)})


async def save(settings: Settings, cid: str, properties: dict[str, Any]) -> None:
    async with open_state(settings, Namespace(settings.namespace)) as store:
        await store.save_channel(cid, properties)


@pytest.mark.parametrize(
    "plugin_type", [f"{MODULE}.RecordingPlugin", f"{MODULE}:AsyncRecordingPlugin"]
)
async def test_plugin_hears_every_channel_start_and_stop(
    gw_settings: Settings, tmp_path: Path, plugin_type: str
) -> None:
    record = tmp_path / "events.jsonl"
    plugin = {"type": plugin_type, "path": str(record), "colour": "blue"}
    settings = with_plugins(gw_settings, plugin)
    await seed(settings, "boot")
    async with gateway(settings, fake_commands({})) as gw:
        # Boot: start_plugin, then the stored channel.
        assert hooks(record) == [("start_plugin", None), ("channel_started", "boot")]
        first = read_events(record)
        assert first[0]["config"] == plugin
        assert first[0]["namespace"] == settings.namespace
        assert first[1]["properties"] == {"type": "fake", "config": {}}

        # Create.
        await save(settings, "new", {"type": "fake", "config": {"x": 1}, "label": "a"})
        assert isinstance(await gw.client.request(StartChannel(id=0, channel_id="new")), Ok)
        assert hooks(record)[2:] == [("channel_started", "new")]
        assert read_events(record)[2]["config"] == {"x": 1}

        # Modify (the API re-sends StartChannel): stopped with the old, started with the new.
        await save(settings, "new", {"type": "fake", "config": {"x": 2}, "label": "a"})
        assert isinstance(await gw.client.request(StartChannel(id=0, channel_id="new")), Ok)
        events = read_events(record)[3:]
        assert [(e["hook"], e["channel"], e["config"]) for e in events] == [
            ("channel_stopped", "new", {"x": 1}),
            ("channel_started", "new", {"x": 2}),
        ]

        # Restart.
        assert isinstance(await gw.client.request(RestartChannel(id=0, channel_id="boot")), Ok)
        assert hooks(record)[5:] == [("channel_stopped", "boot"), ("channel_started", "boot")]

        # Delete.
        assert isinstance(await gw.client.request(StopChannel(id=0, channel_id="new")), Ok)
        assert hooks(record)[7:] == [("channel_stopped", "new")]
        # Stopping a channel that is not running tells nobody anything.
        await gw.client.request(StopChannel(id=0, channel_id="new"))
        assert len(hooks(record)) == 8
    # Shutdown: stop_plugin only (the original sends no channel_stopped at shutdown).
    assert gw.result == [0]
    assert hooks(record)[8:] == [("stop_plugin", None)]


async def test_plugins_run_in_config_order(gw_settings: Settings, tmp_path: Path) -> None:
    record = tmp_path / "events.jsonl"
    settings = with_plugins(
        gw_settings,
        {"type": f"{MODULE}.RecordingPlugin", "path": str(record)},
        {"type": f"{MODULE}.AsyncRecordingPlugin", "path": str(record)},
    )
    await seed(settings, "c1")
    async with gateway(settings, fake_commands({})):
        pass
    order = [(e["hook"], e["plugin"]) for e in read_events(record)]
    assert order == [
        ("start_plugin", "RecordingPlugin"),
        ("start_plugin", "AsyncRecordingPlugin"),
        ("channel_started", "RecordingPlugin"),
        ("channel_started", "AsyncRecordingPlugin"),
        ("stop_plugin", "RecordingPlugin"),
        ("stop_plugin", "AsyncRecordingPlugin"),
    ]


async def test_a_channel_that_never_becomes_ready_is_not_announced(
    gw_settings: Settings, tmp_path: Path
) -> None:
    record = tmp_path / "events.jsonl"
    settings = with_plugins(gw_settings, {"type": f"{MODULE}.RecordingPlugin", "path": str(record)})
    async with gateway(settings, fake_commands({"bad": ("exit", "78")})) as gw:
        await seed(settings, "bad")
        with pytest.raises(RemoteError):
            await gw.client.request(StartChannel(id=0, channel_id="bad"))
        assert isinstance(await gw.client.request(StopChannel(id=0, channel_id="bad")), Ok)
    assert hooks(record) == [("start_plugin", None), ("stop_plugin", None)]


async def test_crash_restarts_are_not_announced_and_a_late_start_is(
    gw_settings: Settings, tmp_path: Path
) -> None:
    record = tmp_path / "events.jsonl"
    runs = tmp_path / "runs"
    settings = with_plugins(gw_settings, {"type": f"{MODULE}.RecordingPlugin", "path": str(record)})
    modes = {"late": ("crash-first", "1", str(runs)), "flaky": ("hello-exit", "70")}
    async with gateway(settings, fake_commands(modes)) as gw:
        await seed(settings, "late", "flaky")
        # The first attempt crashes; the restart by policy comes up and is announced then.
        with pytest.raises(RemoteError) as info:
            await gw.client.request(StartChannel(id=0, channel_id="late"))
        assert info.value.error_type == "ChannelStartFailed"
        with trio.fail_after(10):
            await wait_for(lambda: ("channel_started", "late") in hooks(record))
        # Ready, then crashing: announced once, however often it is restarted.
        assert isinstance(await gw.client.request(StartChannel(id=0, channel_id="flaky")), Ok)
        with trio.fail_after(10):
            # Polling: the restarts happen in the supervisor's own tasks, with no event to share.
            while await gw.restarts("flaky") < 2:  # noqa: ASYNC110
                await trio.sleep(0.05)
    assert hooks(record).count(("channel_started", "flaky")) == 1
    assert ("channel_stopped", "flaky") not in hooks(record)


async def test_a_failing_plugin_does_not_affect_channels_or_other_plugins(
    gw_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = tmp_path / "events.jsonl"
    failed = tmp_path / "failed.jsonl"
    settings = with_plugins(
        gw_settings,
        {"type": f"{MODULE}.BrokenPlugin"},
        {"type": f"{MODULE}.FailsToStartPlugin", "path": str(failed)},
        {"type": f"{MODULE}.RecordingPlugin", "path": str(record)},
    )
    await seed(settings, "c1")
    with caplog.at_level(logging.INFO):
        async with gateway(settings, fake_commands({})) as gw:
            assert isinstance(await gw.client.request(RestartChannel(id=0, channel_id="c1")), Ok)
            state, _ = (await gw.children())["c1"]
            assert state is ChildState.RUNNING
    assert gw.result == [0]
    assert hooks(record) == [
        ("start_plugin", None),
        ("channel_started", "c1"),
        ("channel_stopped", "c1"),
        ("channel_started", "c1"),
        ("stop_plugin", None),
    ]
    # A plugin whose start_plugin failed is disabled.
    assert hooks(failed) == [("start_plugin", None)]
    text = caplog.text
    assert f"plugin {MODULE}.FailsToStartPlugin: start_plugin failed" in text
    assert "OSError: cannot reach the thing" in text
    assert f"plugin {MODULE}.FailsToStartPlugin did not start; it is disabled" in text
    assert "RuntimeError: broken channel_started c1" in text
    assert "RuntimeError: broken channel_stopped c1" in text
    assert "RuntimeError: broken stop_plugin" in text


async def test_a_plugin_refusing_its_config_stops_the_boot_with_78(
    gw_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = tmp_path / "events.jsonl"
    settings = with_plugins(
        gw_settings,
        {"type": f"{MODULE}.RecordingPlugin", "path": str(record)},
        {"type": f"{MODULE}.RefusingPlugin"},
    )
    await seed(settings, "c1")
    with trio.fail_after(20), caplog.at_level(logging.ERROR):
        code = await run_supervisor(settings, commands=fake_commands({}), handle_signals=False)
    assert code == exit_codes.EXIT_CONFIG
    assert f"plugin {MODULE}.RefusingPlugin: needs a 'colour'" in caplog.text
    # No channel was started; the plugin that had started is stopped.
    assert hooks(record) == [("start_plugin", None), ("stop_plugin", None)]


@pytest.mark.parametrize(
    ("plugin_type", "message"),
    [
        ("nosuch.module.Plugin", "plugin nosuch.module.Plugin: cannot import 'nosuch.module'"),
        (f"{MODULE}.Missing", f"plugin {MODULE}.Missing: module '{MODULE}' has no 'Missing'"),
        (
            f"{MODULE}:NOT_A_CLASS",
            f"plugin {MODULE}:NOT_A_CLASS: '{MODULE}:NOT_A_CLASS' is not a class",
        ),
        ("Plugin", "plugin Plugin: 'Plugin' is not 'module:Class' or 'module.Class'"),
        (
            f"{MODULE}.NeedsArguments",
            f"plugin {MODULE}.NeedsArguments: cannot create it: TypeError:",
        ),
    ],
)
async def test_a_plugin_that_cannot_be_loaded_stops_the_boot_with_78(
    gw_settings: Settings, plugin_type: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = with_plugins(gw_settings, {"type": plugin_type})
    with trio.fail_after(20), caplog.at_level(logging.ERROR):
        code = await run_supervisor(settings, commands=fake_commands({}), handle_signals=False)
    assert code == exit_codes.EXIT_CONFIG
    assert message in caplog.text


def test_plugin_paths_in_both_forms_and_the_originals_nginx_path() -> None:
    assert load_plugin_class(f"{MODULE}:RecordingPlugin") is RecordingPlugin
    assert load_plugin_class(f"{MODULE}.AsyncRecordingPlugin") is AsyncRecordingPlugin
    assert load_plugin_class("junebug.plugins.nginx.NginxPlugin") is NginxPlugin
    assert load_plugin_class("supervisor.plugins.nginx.NginxPlugin") is NginxPlugin
    # Any class will do; missing hooks are no-ops.
    [plugin] = load_plugins([{"type": f"{MODULE}.NoArgsRequired"}])
    assert isinstance(plugin.instance, NoArgsRequired)


async def test_a_hanging_async_hook_is_abandoned(
    embedded_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = load_plugins([{"type": f"{MODULE}.HangingPlugin"}])
    spec = ChildSpec(id="c1", argv=script_argv(), role=Role.CHANNEL, channel_id="c1")
    async with open_state(embedded_settings, Namespace(embedded_settings.namespace)) as store:
        await store.save_channel("c1", {"type": "fake"})
        host = PluginHost(plugins, store, hook_timeout=0.05)
        await host.start(embedded_settings)
        with trio.fail_after(5):
            await host.child_ready(spec)
        await host.stop()
    assert f"plugin {MODULE}.HangingPlugin: channel_started took over 0.05 s" in caplog.text
