"""Plugins for tests, loaded by the supervisor from their dotted path like a user's would be.

Each records what it is told as JSON lines in the file named by its config's `path`, so
tests in this process and in a `python -m supervisor` process can read the same record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from supervisor.plugins import Channel, JunebugPlugin, PluginConfigError

if TYPE_CHECKING:
    from ipc.settings import Settings


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def hooks(path: Path) -> list[tuple[str, str | None]]:
    """(hook, channel id) per recorded call."""
    return [(e["hook"], e.get("channel")) for e in read_events(path)]


class RecordingPlugin(JunebugPlugin):
    """Plain (sync) hooks, which the supervisor runs in a worker thread."""

    path: Path

    def _write(self, hook: str, **fields: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"hook": hook, "plugin": type(self).__name__, **fields}) + "\n")

    def start_plugin(self, config: dict[str, Any], junebug_config: Settings) -> None:
        self.path = Path(config["path"])
        self._write("start_plugin", config=config, namespace=junebug_config.namespace)

    def stop_plugin(self) -> None:
        self._write("stop_plugin")

    def channel_started(self, channel: Channel) -> None:
        self._write("channel_started", **_channel(channel))

    def channel_stopped(self, channel: Channel) -> None:
        self._write("channel_stopped", **_channel(channel))


def _channel(channel: Channel) -> dict[str, Any]:
    return {"channel": channel.id, "properties": channel.properties, "config": channel.config}


class AsyncRecordingPlugin(JunebugPlugin):
    """`async def` hooks, awaited on the supervisor's event loop."""

    path: trio.Path

    async def _write(self, hook: str, **fields: Any) -> None:
        await trio.lowlevel.checkpoint()
        line = json.dumps({"hook": hook, "plugin": type(self).__name__, **fields}) + "\n"
        async with await self.path.open("a") as f:
            await f.write(line)

    async def start_plugin(self, config: dict[str, Any], junebug_config: Settings) -> None:
        self.path = trio.Path(config["path"])
        await self._write("start_plugin", config=config, namespace=junebug_config.namespace)

    async def stop_plugin(self) -> None:
        await self._write("stop_plugin")

    async def channel_started(self, channel: Channel) -> None:
        await self._write("channel_started", **_channel(channel))

    async def channel_stopped(self, channel: Channel) -> None:
        await self._write("channel_stopped", **_channel(channel))


class BrokenPlugin(JunebugPlugin):
    """Raises in every hook but start_plugin."""

    def stop_plugin(self) -> None:
        raise RuntimeError("broken stop_plugin")

    def channel_started(self, channel: Channel) -> None:
        raise RuntimeError(f"broken channel_started {channel.id}")

    async def channel_stopped(self, channel: Channel) -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError(f"broken channel_stopped {channel.id}")


class FailsToStartPlugin(RecordingPlugin):
    """Records its calls, but start_plugin fails after recording: it must get nothing more."""

    def start_plugin(self, config: dict[str, Any], junebug_config: Settings) -> None:
        super().start_plugin(config, junebug_config)
        raise OSError("cannot reach the thing")


class RefusingPlugin(JunebugPlugin):
    def start_plugin(self, config: dict[str, Any], junebug_config: Settings) -> None:
        raise PluginConfigError("needs a 'colour'")


class HangingPlugin(JunebugPlugin):
    """channel_started never finishes by itself."""

    async def channel_started(self, channel: Channel) -> None:
        await trio.sleep_forever()


class NoArgsRequired:
    """Not a JunebugPlugin subclass and without hooks: accepted, every hook is a no-op."""


class NeedsArguments(JunebugPlugin):
    def __init__(self, colour: str) -> None:
        self.colour = colour


NOT_A_CLASS = "just a string"
