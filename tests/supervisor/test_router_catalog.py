"""The supervisor learns the router types from `channel_proc describe --format 2` at boot and
serves them in the catalog; `--routers` / `--replace-routers` reach the channel processes."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest

from ipc import exit_codes
from ipc.messages import CatalogReply, GetCatalog, RouterSchemas
from supervisor.config import load_config
from supervisor.run import BootError, parse_catalog, run_supervisor
from tests.supervisor.harness import gateway
from tests.supervisor.scripted import fake_commands

if TYPE_CHECKING:
    from ipc.settings import Settings

SCHEMAS: dict[str, Any] = {"config": {"type": "object"}, "destination_config": {"type": "object"}}


def test_parse_catalog_format_2() -> None:
    catalog = parse_catalog(
        {"format": 2, "channels": {"telnet": {"type": "object"}}, "routers": {"r": SCHEMAS}}
    )
    assert catalog.channels == {"telnet": {"type": "object"}}
    assert catalog.routers == {"r": RouterSchemas.model_validate(SCHEMAS)}


def test_parse_catalog_format_1_has_no_routers() -> None:
    catalog = parse_catalog({"telnet": {"type": "object"}})
    assert (catalog.channels, catalog.routers) == ({"telnet": {"type": "object"}}, {})


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"telnet": 1},
        {"format": 2, "channels": {}, "routers": {"r": {"config": {}}}},
        {"format": 2, "channels": [], "routers": {}},
    ],
)
def test_parse_catalog_refuses_other_shapes(document: object) -> None:
    with pytest.raises(BootError) as info:
        parse_catalog(document)
    assert info.value.code == exit_codes.EXIT_SOFTWARE


@pytest.mark.slow
async def test_catalog_serves_the_router_types(gw_settings: Settings) -> None:
    path = "channel_proc.routers.from_address:FromAddressRouter"
    settings = gw_settings.model_copy(update={"routers": {"by_code": path}})
    commands = replace(
        fake_commands({}), describe=(sys.executable, "-m", "channel_proc", "describe")
    )
    async with gateway(settings, commands) as gw:
        reply = await gw.client.request(GetCatalog(id=0))
    assert isinstance(reply, CatalogReply)
    assert sorted(reply.router_schemas) == ["by_code", "from_address"]
    assert "smpp" in reply.config_schemas
    assert reply.router_schemas["by_code"] == reply.router_schemas["from_address"]


@pytest.mark.slow
async def test_a_router_type_that_does_not_load_stops_the_boot(
    gw_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = gw_settings.model_copy(update={"routers": {"x": "nosuch.module:Router"}})
    commands = replace(
        fake_commands({}), describe=(sys.executable, "-m", "channel_proc", "describe")
    )
    code = await run_supervisor(settings, commands=commands, handle_signals=False)
    assert code == exit_codes.EXIT_CONFIG
    assert "nosuch.module" in caplog.text


def test_router_flags() -> None:
    loaded = load_config(["--routers", "kw:my.mod:Cls", "--replace-routers", "yes"])
    assert loaded.settings.routers == {"kw": "my.mod:Cls"}
    assert loaded.settings.replace_routers is True
    assert loaded.warnings == ()
