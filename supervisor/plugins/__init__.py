"""Plugins (docs 1.10): subclass `supervisor.plugins.JunebugPlugin` and list the class in
`plugins:` / `--plugin`; the bundled nginx plugin is `supervisor.plugins.nginx.NginxPlugin`."""

from __future__ import annotations

from supervisor.plugins.base import Channel, JunebugPlugin, PluginConfigError

__all__ = ["Channel", "JunebugPlugin", "PluginConfigError"]
