"""The bundled nginx plugin: the files it writes (behaviour 13.4), its reloads, and, when
nginx is installed, a real nginx in a private prefix proxying to a channel's web port."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from ipc.messages import Ok, StartChannel, StopChannel
from ipc.names import Namespace
from ipc.state import open_state
from supervisor.plugins import Channel, PluginConfigError
from supervisor.plugins.nginx import NginxPlugin, public_http
from tests.fakes.webhook import open_fake_webhook
from tests.supervisor.harness import gateway, seed
from tests.supervisor.scripted import fake_commands, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable

    from ipc.settings import Settings

NOT_FOUND = "Cannot reload nginx, nginx not found in path"


@pytest.fixture
def no_nginx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH without nginx, so no test here touches the system's nginx."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Any]:
    sites = tmp_path / "sites-enabled"
    sites.mkdir()
    return {
        "type": "junebug.plugins.nginx.NginxPlugin",
        "server_name": "junebug.example.org",
        "vhost_file": str(sites / "junebug.conf"),
        "locations_dir": str(tmp_path / "includes" / "junebug") + "/",
    }


def started(config: dict[str, Any], settings: Settings) -> NginxPlugin:
    plugin = NginxPlugin()
    plugin.start_plugin(config, settings)
    return plugin


def channel(cid: str, config: dict[str, Any], **top: Any) -> Channel:
    return Channel.from_properties(cid, {"type": "http", "config": config, **top})


def location(dirs: dict[str, Any], cid: str) -> Path:
    return Path(dirs["locations_dir"], f"{cid}.conf")


def vhost_file(dirs: dict[str, Any]) -> Path:
    return Path(dirs["vhost_file"])


@pytest.mark.usefixtures("no_nginx")
def test_nginx_files_through_a_channels_life(
    dirs: dict[str, Any], embedded_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    vhost = vhost_file(dirs)
    plugin = started(dirs, embedded_settings)
    assert vhost.read_text() == (
        "server {\n"
        "    listen 80;\n"
        "    server_name junebug.example.org;\n"
        f"    include {dirs['locations_dir']}*.conf;\n"
        "}\n"
    )
    assert caplog.text.count(NOT_FOUND) == 1

    plugin.channel_started(channel("c1", {"web_path": "ussd/in", "web_port": 8001}))
    assert location(dirs, "c1").read_text() == (
        "location /ussd/in {\n    proxy_pass http://localhost:8001/ussd/in;\n}\n"
    )
    assert caplog.text.count(NOT_FOUND) == 2
    plugin.channel_started(channel("c2", {"web_path": "/sms", "web_port": 8002}))

    plugin.channel_stopped(channel("c1", {}))
    assert not location(dirs, "c1").exists()
    assert location(dirs, "c2").exists()
    assert caplog.text.count(NOT_FOUND) == 4
    # Not a channel it configured: nothing to remove, no reload.
    plugin.channel_stopped(channel("c1", {}))
    plugin.channel_stopped(channel("other", {}))
    assert caplog.text.count(NOT_FOUND) == 4

    plugin.stop_plugin()
    assert not vhost.exists()
    assert not location(dirs, "c2").exists()
    assert caplog.text.count(NOT_FOUND) == 5


@pytest.mark.parametrize(
    ("config", "top", "expected"),
    [
        ({"web_path": "/a", "web_port": 1}, {}, ("/a", 1)),
        ({}, {}, None),
        ({"web_path": "/a"}, {}, None),
        ({"web_port": 1}, {}, None),
        # The original read public_http from the channel's top level.
        ({"web_path": "/a", "web_port": 1}, {"public_http": {"web_port": 2}}, ("/a", 2)),
        ({}, {"public_http": {"web_path": "/b", "web_port": 3}}, ("/b", 3)),
        ({"web_path": "/a", "web_port": 1}, {"public_http": {"enabled": False}}, None),
        # The docs put it in the config; that wins over the top level.
        ({"web_path": "/a", "web_port": 1, "public_http": {"web_path": "/c"}}, {}, ("/c", 1)),
        (
            {"web_path": "/a", "web_port": 1, "public_http": {"web_port": 4}},
            {"public_http": {"web_port": 5, "web_path": "/d"}},
            ("/d", 4),
        ),
        ({"web_path": "/a", "web_port": 1, "public_http": {"enabled": False}}, {}, None),
        (
            {"web_path": "/a", "web_port": 1, "public_http": {"enabled": True}},
            {"public_http": {"enabled": False}},
            ("/a", 1),
        ),
    ],
)
@pytest.mark.usefixtures("no_nginx")
def test_nginx_public_http_overrides(
    dirs: dict[str, Any],
    embedded_settings: Settings,
    config: dict[str, Any],
    top: dict[str, Any],
    expected: tuple[str, int] | None,
) -> None:
    plugin = started(dirs, embedded_settings)
    ch = channel("c1", config, **top)
    plugin.channel_started(ch)
    if expected is None:
        assert not location(dirs, "c1").exists()
        settings = public_http(ch)
        assert not settings["enabled"] or None in (settings["web_path"], settings["web_port"])
    else:
        path, port = expected
        assert f"location {path} {{" in location(dirs, "c1").read_text()
        assert f"proxy_pass http://localhost:{port}{path};" in location(dirs, "c1").read_text()


@pytest.mark.usefixtures("no_nginx")
def test_nginx_custom_templates(
    dirs: dict[str, Any], embedded_settings: Settings, tmp_path: Path
) -> None:
    vhost_template = tmp_path / "vhost.tpl"
    vhost_template.write_text("%(server_name)s|%(locations_dir)s|%(includes)s\n")
    location_template = tmp_path / "location.tpl"
    location_template.write_text(
        "%(channel_id)s|%(external_path)s|%(internal_url)s|%(web_path)s|%(web_port)s\n"
    )
    config = {
        **dirs,
        "vhost_template": str(vhost_template),
        "location_template": str(location_template),
    }
    plugin = started(config, embedded_settings)
    locations = dirs["locations_dir"]
    assert vhost_file(dirs).read_text() == (f"junebug.example.org|{locations}|{locations}*.conf\n")
    plugin.channel_started(channel("c1", {"web_path": "p", "web_port": "9"}))
    assert location(dirs, "c1").read_text() == "c1|/p|http://localhost:9/p|p|9\n"


def _bad_template(tmp_path: Path) -> dict[str, Any]:
    bad = tmp_path / "bad.tpl"
    bad.write_text("location %(nope)s {}\n")
    return {"location_template": str(bad)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda _: {"server_name": None}, "server_name is required"),
        (lambda _: {"server_name": ""}, "server_name is required"),
        (lambda _: {"vhost_file": 5}, "vhost_file must be a string"),
        (
            lambda _: {"vhost_template": "/nonexistent/vhost.tpl"},
            "cannot read template /nonexistent/vhost.tpl",
        ),
        (
            lambda _: {"vhost_file": "/nonexistent/dir/junebug.conf"},
            "cannot write /nonexistent/dir/junebug.conf",
        ),
        (_bad_template, "bad nginx template: KeyError: 'nope'"),
    ],
)
@pytest.mark.usefixtures("no_nginx")
def test_nginx_config_errors(
    dirs: dict[str, Any],
    embedded_settings: Settings,
    tmp_path: Path,
    change: Callable[[Path], dict[str, Any]],
    message: str,
) -> None:
    config = {**dirs, **change(tmp_path)}
    if config["server_name"] is None:
        del config["server_name"]
    with pytest.raises(PluginConfigError, match=message):
        started(config, embedded_settings)
    assert not vhost_file(dirs).exists()


def fake_nginx(bin_dir: Path, body: str) -> Path:
    """An `nginx` on PATH that runs `body` (a shell script): the far end, for reload tests."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nginx"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_nginx_reload_runs_nginx_s_reload_and_logs_failures(
    dirs: dict[str, Any],
    embedded_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = tmp_path / "calls"
    fake_nginx(tmp_path / "bin", f'echo "$@" >> {calls}')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    plugin = started(dirs, embedded_settings)
    assert calls.read_text() == "-s reload\n"

    fake_nginx(tmp_path / "bin", 'echo "nginx: [error] invalid PID number" >&2; exit 1')
    with caplog.at_level(logging.ERROR):
        # A failed reload is logged; the location is still written and remembered.
        plugin.channel_started(channel("c1", {"web_path": "/a", "web_port": 1}))
    assert "nginx -s reload failed: nginx: [error] invalid PID number" in caplog.text
    assert location(dirs, "c1").exists()
    plugin.channel_stopped(channel("c1", {}))
    assert not location(dirs, "c1").exists()


async def stored(settings: Settings, cid: str, properties: dict[str, Any]) -> None:
    async with open_state(settings, Namespace(settings.namespace)) as store:
        await store.save_channel(cid, properties)


@pytest.mark.slow
@pytest.mark.usefixtures("no_nginx")
async def test_nginx_plugin_follows_create_modify_delete_in_the_supervisor(
    gw_settings: Settings, dirs: dict[str, Any]
) -> None:
    settings = gw_settings.model_copy(update={"plugins": [dirs]})
    props = {"type": "fake", "config": {"web_path": "/one", "web_port": 8001}}
    await seed(settings, "c1", properties=props)
    vhost = vhost_file(dirs)
    async with gateway(settings, fake_commands({})) as gw:
        assert vhost.exists()
        assert "proxy_pass http://localhost:8001/one;" in location(dirs, "c1").read_text()
        # A modify restarts the channel: the location follows the new config (Q9 fixed).
        await stored(settings, "c1", {**props, "config": {"web_path": "/two", "web_port": 8002}})
        assert isinstance(await gw.client.request(StartChannel(id=0, channel_id="c1")), Ok)
        assert "proxy_pass http://localhost:8002/two;" in location(dirs, "c1").read_text()
        # Delete.
        assert isinstance(await gw.client.request(StopChannel(id=0, channel_id="c1")), Ok)
        assert not location(dirs, "c1").exists()
        await stored(settings, "c2", props)
        assert isinstance(await gw.client.request(StartChannel(id=0, channel_id="c2")), Ok)
        assert location(dirs, "c2").exists()
    # Shutdown: stop_plugin removes the vhost and every location it wrote.
    assert gw.result == [0]
    assert not vhost.exists()
    assert not location(dirs, "c2").exists()


NGINX = shutil.which("nginx", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
async def test_real_nginx_proxies_to_each_started_channel(
    gw_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert NGINX is not None
    prefix = tmp_path / "nginx"
    for sub in ("sites", "tmp", "locations"):
        (prefix / sub).mkdir(parents=True)
    conf = prefix / "nginx.conf"
    temp = {kind: prefix / "tmp" / kind for kind in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    conf.write_text(
        f"worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n"
        "events { worker_connections 64; }\n"
        "http {\n    access_log off;\n"
        f"    client_body_temp_path {temp['body']};\n    proxy_temp_path {temp['proxy']};\n"
        f"    fastcgi_temp_path {temp['fastcgi']};\n    uwsgi_temp_path {temp['uwsgi']};\n"
        f"    scgi_temp_path {temp['scgi']};\n"
        f"    include {prefix}/sites/*.conf;\n}}\n"
    )
    # The plugin runs plain `nginx -s reload`: this nginx on PATH is the real one, pointed
    # at the private prefix instead of /etc/nginx.
    fake_nginx(
        tmp_path / "bin",
        f'exec {NGINX} -p {prefix}/ -c {conf} -e {prefix}/error.log "$@"',
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    port = free_port()
    vhost_template = tmp_path / "vhost.tpl"
    vhost_template.write_text(
        f"server {{\n    listen 127.0.0.1:{port};\n    server_name %(server_name)s;\n"
        # Workers cannot read the private prefix: answer unknown paths without a file.
        "    location / {\n        return 404;\n    }\n"
        "    include %(includes)s;\n}\n"
    )
    plugin = {
        "type": "supervisor.plugins.nginx.NginxPlugin",
        "server_name": "localhost",
        "vhost_file": str(prefix / "sites" / "junebug.conf"),
        "locations_dir": str(prefix / "locations"),
        "vhost_template": str(vhost_template),
    }
    settings = gw_settings.model_copy(update={"plugins": [plugin]})
    base = f"http://127.0.0.1:{port}"

    async def answers(path: str, status: int | None) -> bool:
        """True once GET path answers `status` (None: nothing listens)."""
        try:
            async with httpx.AsyncClient() as client:
                response = await client.get(base + path, timeout=2)
        except httpx.ConnectError:
            return status is None
        return response.status_code == status

    async def eventually(path: str, status: int | None) -> None:
        with trio.fail_after(15):
            while not await answers(path, status):  # noqa: ASYNC110 — nginx reloads on its own
                await trio.sleep(0.05)

    master = await trio.lowlevel.open_process(
        [str(tmp_path / "bin" / "nginx"), "-g", "daemon off;"]
    )
    try:
        with trio.fail_after(10):
            await wait_for((prefix / "nginx.pid").exists)
        async with open_fake_webhook() as backend:
            props = {"type": "fake", "config": {"web_path": "/ussd/in", "web_port": backend.port}}
            async with gateway(settings, fake_commands({})) as gw:
                # The vhost is up (no location yet).
                await eventually("/ussd/in", 404)
                await stored(settings, "c1", props)
                assert isinstance(await gw.client.request(StartChannel(id=0, channel_id="c1")), Ok)
                await eventually("/ussd/in", 200)
                assert backend.requests[-1].path == "/ussd/in"
                # What the plugin wrote is a valid nginx configuration.
                check = await trio.run_process(
                    [str(tmp_path / "bin" / "nginx"), "-t"], capture_stderr=True, check=False
                )
                assert check.returncode == 0, check.stderr.decode()
                assert isinstance(await gw.client.request(StopChannel(id=0, channel_id="c1")), Ok)
                await eventually("/ussd/in", 404)
            # stop_plugin removed the vhost: nothing listens on its port any more.
            await eventually("/ussd/in", None)
    finally:
        with trio.CancelScope(shield=True):
            master.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await master.wait()
            if master.returncode is None:
                master.kill()
                await master.wait()
