"""The bundled nginx plugin (behaviour 13.4): a vhost file plus one location file per
http-based channel, proxying `web_path` to `web_port`, and `nginx -s reload` on changes."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urljoin

from supervisor.plugins.base import JunebugPlugin, PluginConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ipc.settings import Settings
    from supervisor.plugins.base import Channel

log = logging.getLogger(__name__)

#: Python %-templates. The vhost gets server_name, locations_dir and includes (the
#: locations glob); a location gets external_path, internal_url, channel_id, web_path and
#: web_port.
VHOST_TEMPLATE: Final = """\
server {
    listen 80;
    server_name %(server_name)s;
    include %(includes)s;
}
"""
LOCATION_TEMPLATE: Final = """\
location %(external_path)s {
    proxy_pass %(internal_url)s;
}
"""
DEFAULT_VHOST_FILE: Final = "/etc/nginx/sites-enabled/junebug.conf"
DEFAULT_LOCATIONS_DIR: Final = "/etc/nginx/includes/junebug/"
#: Seconds `nginx -s reload` may take.
RELOAD_TIMEOUT: Final = 30.0


@dataclass(frozen=True, slots=True)
class NginxConfig:
    server_name: str
    vhost_file: Path
    #: As configured (the vhost template gets it unchanged, trailing slash and all).
    locations_dir: str
    vhost_template: str
    location_template: str

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> NginxConfig:
        """Raises PluginConfigError for a missing server_name or an unreadable template."""
        server_name = config.get("server_name")
        if not isinstance(server_name, str) or not server_name.strip():
            raise PluginConfigError("server_name is required")
        for key in ("vhost_file", "locations_dir", "vhost_template", "location_template"):
            if key in config and not isinstance(config[key], str):
                raise PluginConfigError(f"{key} must be a string")
        return cls(
            server_name=server_name,
            vhost_file=Path(config.get("vhost_file", DEFAULT_VHOST_FILE)),
            locations_dir=config.get("locations_dir", DEFAULT_LOCATIONS_DIR),
            vhost_template=_template(config.get("vhost_template"), VHOST_TEMPLATE),
            location_template=_template(config.get("location_template"), LOCATION_TEMPLATE),
        )


def _template(path: str | None, bundled: str) -> str:
    if path is None:
        return bundled
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise PluginConfigError(f"cannot read template {path}: {exc.strerror or exc}") from exc


def public_http(channel: Channel) -> dict[str, Any]:
    """{enabled, web_path, web_port}: the channel config's web_path/web_port, overridden by
    `public_http` at the top level of the channel (where the original read it), then by
    `public_http` inside its config (where the docs put it)."""
    settings: dict[str, Any] = {
        "enabled": True,
        "web_path": channel.config.get("web_path"),
        "web_port": channel.config.get("web_port"),
    }
    for override in (channel.properties.get("public_http"), channel.config.get("public_http")):
        if isinstance(override, dict):
            settings.update(override)
    return settings


def location_values(channel_id: str, web_path: object, web_port: object) -> dict[str, Any]:
    """The location template's values for a channel served on web_path at localhost:web_port."""
    external = "/" + str(web_path).lstrip("/")
    return {
        "external_path": external,
        "internal_url": urljoin(f"http://localhost:{web_port}", external),
        "channel_id": channel_id,
        "web_path": web_path,
        "web_port": web_port,
    }


def _sample_location() -> dict[str, Any]:
    return location_values("channel-id", "/path", 8000)


class NginxPlugin(JunebugPlugin):
    """Maintains an nginx vhost exposing http-based channels; reloads nginx on changes."""

    def __init__(self) -> None:
        self._config: NginxConfig | None = None
        #: Channels with a location file written by this plugin.
        self._configured: set[str] = set()

    @property
    def config(self) -> NginxConfig:
        if self._config is None:
            raise RuntimeError("the nginx plugin is not started")
        return self._config

    def start_plugin(self, config: dict[str, Any], junebug_config: Settings) -> None:
        parsed = NginxConfig.parse(config)
        includes = os.path.join(parsed.locations_dir, "*.conf")
        text = _fill(
            parsed.vhost_template,
            {
                "server_name": parsed.server_name,
                "locations_dir": parsed.locations_dir,
                "includes": includes,
            },
        )
        # A broken location template should stop the gateway now, not fail every channel later.
        _fill(parsed.location_template, _sample_location())
        try:
            parsed.vhost_file.write_text(text)
        except OSError as exc:
            raise PluginConfigError(
                f"cannot write {parsed.vhost_file}: {exc.strerror or exc}"
            ) from exc
        self._config = parsed
        log.info("nginx vhost %s written for %s", parsed.vhost_file, parsed.server_name)
        reload_nginx()

    def stop_plugin(self) -> None:
        config = self.config
        config.vhost_file.unlink(missing_ok=True)
        for channel_id in sorted(self._configured):
            self._location_file(channel_id).unlink(missing_ok=True)
        self._configured.clear()
        reload_nginx()

    def channel_started(self, channel: Channel) -> None:
        settings = public_http(channel)
        if settings["web_path"] is None or settings["web_port"] is None:
            return
        if not settings["enabled"]:
            return
        values = location_values(channel.id, settings["web_path"], settings["web_port"])
        text = _fill(self.config.location_template, values)
        Path(self.config.locations_dir).mkdir(parents=True, exist_ok=True)
        self._location_file(channel.id).write_text(text)
        self._configured.add(channel.id)
        log.info(
            "nginx location %s -> %s written for channel %s",
            values["external_path"],
            values["internal_url"],
            channel.id,
        )
        reload_nginx()

    def channel_stopped(self, channel: Channel) -> None:
        if channel.id not in self._configured:
            return
        self._location_file(channel.id).unlink(missing_ok=True)
        self._configured.discard(channel.id)
        log.info("nginx location removed for channel %s", channel.id)
        reload_nginx()

    def _location_file(self, channel_id: str) -> Path:
        return Path(self.config.locations_dir, f"{channel_id}.conf")


def _fill(template: str, values: dict[str, Any]) -> str:
    try:
        return template % values
    except (KeyError, ValueError, TypeError) as exc:
        raise PluginConfigError(f"bad nginx template: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def reload_nginx() -> bool:
    """`nginx -s reload` when nginx is on PATH; a failure is logged, never raised.

    Returns whether nginx reloaded.
    """
    if shutil.which("nginx") is None:
        log.error("Cannot reload nginx, nginx not found in path")
        return False
    try:
        result = subprocess.run(
            ["nginx", "-s", "reload"],
            capture_output=True,
            text=True,
            timeout=RELOAD_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("Cannot reload nginx: %s", _describe(exc))
        return False
    if result.returncode != 0:
        detail = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        log.error("nginx -s reload failed: %s", detail)
        return False
    log.info("nginx reloaded")
    return True
