"""What a plugin is: the JunebugPlugin base class, the Channel it is told about, and the one
error a plugin raises to refuse its configuration (docs 1.10)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ipc.settings import Settings


class PluginConfigError(Exception):
    """Raised by `start_plugin` when the plugin's config cannot work; the supervisor exits 78."""


@dataclass(frozen=True, slots=True)
class Channel:
    """A channel as plugins see it: its id, stored properties and transport config."""

    id: str
    #: The channel object as the user supplied it (type, config, mo_url, ...), without id.
    properties: dict[str, Any] = field(default_factory=dict)
    #: `properties["config"]`, the transport config ({} when missing).
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_properties(cls, channel_id: str, properties: dict[str, Any]) -> Channel:
        config = properties.get("config")
        return cls(
            id=channel_id,
            properties=dict(properties),
            config=dict(config) if isinstance(config, dict) else {},
        )


class JunebugPlugin:
    """Base class for plugins: subclass it and override any of the four hooks.

    Each hook may be a plain method or a coroutine function (`async def`); a plain method
    may also return an awaitable, which is awaited. Plain methods run in a worker thread, so
    they may block (write files, run commands) without stalling the supervisor; the
    supervisor never runs two hooks at the same time. An exception in a hook is logged and
    does not affect the channel.
    """

    def start_plugin(
        self, config: dict[str, Any], junebug_config: Settings
    ) -> Awaitable[None] | None:
        """Called once at boot, in config order, before any channel starts.

        `config` is this plugin's entry in `plugins` (its `type` included); `junebug_config`
        is the gateway's effective configuration. Raise PluginConfigError to stop the
        gateway from starting (exit 78); any other exception disables this plugin.
        """
        return None

    def stop_plugin(self) -> Awaitable[None] | None:
        """Called once at shutdown, after every channel has stopped."""
        return None

    def channel_started(self, channel: Channel) -> Awaitable[None] | None:
        """Called after a channel's process is ready (create, restart, modify, boot)."""
        return None

    def channel_stopped(self, channel: Channel) -> Awaitable[None] | None:
        """Called after a channel's process has stopped (delete, restart, modify).

        `channel` is what `channel_started` was given. Not called at shutdown.
        """
        return None
