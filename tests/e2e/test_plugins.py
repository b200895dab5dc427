"""Plugins in the real junebug-supervisor, driven through the HTTP API: a recording plugin
and the bundled nginx plugin (files only; nginx itself is kept off PATH here) follow
channels through create, modify, restart and delete; and a channel that refuses its
configuration at start says why."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.gateway import free_port, remember_channel, running_gateway
from tests.supervisor.recording_plugins import hooks, read_events

if TYPE_CHECKING:
    from ipc.settings import Settings
    from tests.e2e.gateway import Gateway

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def create(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    response = await gateway.request("POST", "/channels/", body)
    assert response.status_code == 201, response.json()
    result: dict[str, Any] = response.json()["result"]
    remember_channel(gateway.settings, result["id"])
    return result


async def test_plugins_follow_channels_through_the_http_api(
    embedded_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the venv's bin on PATH: the nginx plugin must not reload the system's nginx.
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    record = tmp_path / "events.jsonl"
    vhost = tmp_path / "sites" / "junebug.conf"
    vhost.parent.mkdir()
    locations = tmp_path / "locations"
    plugins = [
        {"type": "tests.supervisor.recording_plugins.AsyncRecordingPlugin", "path": str(record)},
        {
            "type": "junebug.plugins.nginx.NginxPlugin",
            "server_name": "gw.example.org",
            "vhost_file": str(vhost),
            "locations_dir": str(locations),
        },
    ]
    args = [arg for plugin in plugins for arg in ("--plugin", json.dumps(plugin))]
    endpoint = f"tcp:port={free_port()}:interface=127.0.0.1"
    async with running_gateway(embedded_settings, extra_args=args) as gateway:
        assert hooks(record) == [("start_plugin", None)]
        assert "server_name gw.example.org;" in vhost.read_text()

        config = {"twisted_endpoint": endpoint, "web_path": "/in", "web_port": 8001}
        channel = await create(gateway, {"type": "telnet", "config": config})
        cid = channel["id"]
        assert hooks(record)[1:] == [("channel_started", cid)]
        assert read_events(record)[1]["config"] == config
        location = locations / f"{cid}.conf"
        assert "proxy_pass http://localhost:8001/in;" in location.read_text()

        # A label is the API's business: no restart, nothing for plugins.
        response = await gateway.request("POST", f"/channels/{cid}", {"label": "renamed"})
        assert response.status_code == 200, response.json()
        assert len(hooks(record)) == 2

        # public_http at the top level moves the location; the channel restarts.
        response = await gateway.request(
            "POST", f"/channels/{cid}", {"public_http": {"web_path": "/moved"}}
        )
        assert response.status_code == 200, response.json()
        assert hooks(record)[2:] == [("channel_stopped", cid), ("channel_started", cid)]
        assert read_events(record)[3]["properties"]["public_http"] == {"web_path": "/moved"}
        assert "proxy_pass http://localhost:8001/moved;" in location.read_text()

        response = await gateway.request("POST", f"/channels/{cid}/restart")
        assert response.status_code == 200, response.json()
        assert hooks(record)[4:] == [("channel_stopped", cid), ("channel_started", cid)]

        response = await gateway.request("DELETE", f"/channels/{cid}")
        assert response.status_code == 200, response.json()
        assert hooks(record)[6:] == [("channel_stopped", cid)]
        assert not location.exists()
        output = gateway.output()
    assert hooks(record)[7:] == [("stop_plugin", None)]
    assert not vhost.exists()
    assert "Cannot reload nginx, nginx not found in path" in output


async def test_a_channel_refusing_its_config_at_start_says_why(
    embedded_settings: Settings,
) -> None:
    async with running_gateway(embedded_settings) as gateway:
        # The config schema's pattern lets it through; the channel process refuses it.
        response = await gateway.request(
            "POST", "/channels/", {"type": "telnet", "config": {"twisted_endpoint": "tcp:99999"}}
        )
        body = response.json()
        assert response.status_code == 400, body
        assert body["description"] == "invalid channel config"
        [error] = body["result"]["errors"]
        assert error["message"] == (
            "invalid telnet config: twisted_endpoint: Value error, "
            "'tcp:99999': port 99999 is out of range"
        )
