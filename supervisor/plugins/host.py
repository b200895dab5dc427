"""Loading plugins from `settings.plugins` and running their hooks: start/stop with the
gateway, channel_started/channel_stopped as the child tree starts and stops channels."""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from ipc.errors import StoreUnavailableError
from ipc.messages import Role
from supervisor.plugins.base import Channel, PluginConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ipc.settings import Settings
    from ipc.state import StateStore
    from supervisor.spec import ChildSpec

log = logging.getLogger(__name__)

#: Seconds an async hook may take before it is abandoned (logged; the channel is unaffected).
HOOK_TIMEOUT: Final = 10.0

#: The original's dotted paths for the bundled plugin, so existing configs keep working.
ALIASES: Final = {
    "junebug.plugins.nginx.NginxPlugin": "supervisor.plugins.nginx:NginxPlugin",
    "junebug.plugins.nginx.plugin.NginxPlugin": "supervisor.plugins.nginx:NginxPlugin",
}


class PluginLoadError(Exception):
    """A plugin's `type` does not name a class that can be imported and created."""


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    #: The `type` as configured (what log lines name the plugin by).
    name: str
    config: dict[str, Any]
    instance: object


def load_plugin_class(path: str) -> type:
    """Import "package.module:Class" or "package.module.Class" (original paths are mapped).

    Raises:
        PluginLoadError: the module cannot be imported or has no such class.
    """
    target = ALIASES.get(path, path)
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise PluginLoadError(f"{path!r} is not 'module:Class' or 'module.Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # user code: any import failure is a config error
        raise PluginLoadError(f"cannot import {module_name!r}: {_describe(exc)}") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise PluginLoadError(f"module {module_name!r} has no {attr!r}")
    if not isinstance(cls, type):
        raise PluginLoadError(f"{path!r} is not a class")
    return cls


def load_plugins(configs: Sequence[dict[str, Any]]) -> list[LoadedPlugin]:
    """Import and create every configured plugin, in config order.

    Raises:
        PluginLoadError: naming the plugin that cannot be loaded or created.
    """
    plugins = []
    for config in configs:
        name = config.get("type")
        if not isinstance(name, str):
            raise PluginLoadError(f"plugin {config!r} has no 'type'")
        try:
            cls = load_plugin_class(name)
            instance = cls()
        except PluginLoadError as exc:
            raise PluginLoadError(f"plugin {name}: {exc}") from exc
        except Exception as exc:  # user code: report which plugin failed
            raise PluginLoadError(f"plugin {name}: cannot create it: {_describe(exc)}") from exc
        plugins.append(LoadedPlugin(name=name, config=dict(config), instance=instance))
    return plugins


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class PluginHost:
    """Runs the plugins' hooks, one hook at a time, in config order.

    It listens to the child tree (`child_ready` / `child_stopped`) and tells the plugins
    about channels; it remembers the Channel each was told had started, so the matching
    `channel_stopped` gets the same one.
    """

    def __init__(
        self,
        plugins: Sequence[LoadedPlugin],
        store: StateStore,
        *,
        hook_timeout: float = HOOK_TIMEOUT,
    ) -> None:
        self._plugins = list(plugins)
        self._store = store
        self._timeout = hook_timeout
        self._running: list[LoadedPlugin] = []
        self._started: dict[str, Channel] = {}
        self._lock = trio.Lock()

    @property
    def running(self) -> list[str]:
        """Names of the plugins whose start_plugin succeeded and that are not stopped."""
        return [p.name for p in self._running]

    async def start(self, settings: Settings) -> None:
        """`start_plugin` on each plugin in order; one that raises is logged and left out.

        Raises:
            PluginConfigError: a plugin refused its config (the message names it).
        """
        async with self._lock:
            for plugin in self._plugins:
                try:
                    ok = await self._call(plugin, "start_plugin", plugin.config, settings)
                except PluginConfigError as exc:
                    raise PluginConfigError(f"plugin {plugin.name}: {exc}") from exc
                if ok:
                    self._running.append(plugin)
                    log.info("plugin %s started", plugin.name)
                else:
                    log.error("plugin %s did not start; it is disabled", plugin.name)

    async def stop(self) -> None:
        """`stop_plugin` on each running plugin; cleanup, so shielded (bounded by the timeout)."""
        with trio.CancelScope(shield=True):
            async with self._lock:
                for plugin in self._running:
                    if await self._call(plugin, "stop_plugin"):
                        log.info("plugin %s stopped", plugin.name)
                self._running = []
                self._started.clear()

    async def child_ready(self, spec: ChildSpec) -> None:
        """A child's process became ready: for a channel, `channel_started` with its properties."""
        cid = spec.channel_id
        if spec.role is not Role.CHANNEL or cid is None or not self._running:
            return
        try:
            properties = await self._store.get_channel(cid)
        except StoreUnavailableError as exc:
            log.error("plugins not told channel %s started: state store: %s", cid, exc)
            return
        if properties is None:
            # Deleted while it was starting; its DELETE stops it next.
            return
        channel = Channel.from_properties(cid, properties)
        async with self._lock:
            self._started[cid] = channel
            for plugin in self._running:
                await self._call(plugin, "channel_started", channel)

    async def child_stopped(self, spec: ChildSpec) -> None:
        """A channel child told about with child_ready has stopped: `channel_stopped`."""
        cid = spec.channel_id
        if cid is None:
            return
        async with self._lock:
            channel = self._started.pop(cid, None)
            if channel is None:
                return
            for plugin in self._running:
                await self._call(plugin, "channel_stopped", channel)

    async def _call(self, plugin: LoadedPlugin, hook: str, *args: Any) -> bool:
        """Run one hook; False (logged) when it raised or timed out.

        Raises:
            PluginConfigError: from start_plugin, for the caller to turn into exit 78.
        """
        method = getattr(plugin.instance, hook, None)
        if method is None:
            return True
        try:
            if inspect.iscoroutinefunction(method):
                result = method(*args)
            else:
                # A plain method may block (files, subprocesses): keep the event loop free.
                result = await trio.to_thread.run_sync(method, *args)
            if inspect.isawaitable(result):
                with trio.move_on_after(self._timeout) as scope:
                    await result
                if scope.cancelled_caught:
                    log.error(
                        "plugin %s: %s took over %g s; abandoned", plugin.name, hook, self._timeout
                    )
                    return False
        except PluginConfigError:
            if hook != "start_plugin":
                log.exception("plugin %s: %s failed", plugin.name, hook)
                return False
            raise
        except Exception:  # a plugin's bug must not take a channel down
            log.exception("plugin %s: %s failed", plugin.name, hook)
            return False
        return True
