"""Contract tests every registered channel type must pass (parametrised over TRANSPORTS)."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from typing import Any

import pytest
import trio
import trio.testing

import channel_proc.transports as transports_pkg
from channel_proc.transports import (
    TRANSPORTS,
    available_transports,
    check_transport_class,
    load_transport_class,
)
from channel_proc.transports.base import Transport
from channel_proc.transports.errors import ConfigError, SendError
from ipc.payloads import VumiMessage
from ipc.settings import Settings
from tests.channel_proc.transports.harness import build

#: A config each kind can run with on loopback, without a provider.
SAMPLE_CONFIGS: dict[str, dict[str, Any]] = {
    "telnet": {"twisted_endpoint": "tcp:port=0:interface=127.0.0.1"},
    # Nothing listens on port 1: the bind fails at once and is retried in the background.
    "smpp": {"twisted_endpoint": "tcp:127.0.0.1:1", "system_id": "esme", "password": "pw"},
    # Port 1 on loopback refuses the connection: the first attempt fails at once.
    "xmpp": {"jid": "bot@localhost", "password": "x", "host": "127.0.0.1", "port": 1},
    "dmark": {"web_path": "/dmark", "web_port": 0, "web_interface": "127.0.0.1"},
    "websocket": {"port": 0, "interface": "127.0.0.1"},
}

KINDS = sorted(TRANSPORTS)


def _transport_classes_in_package() -> set[type[Transport[Any]]]:
    found: set[type[Transport[Any]]] = set()
    for info in pkgutil.iter_modules(transports_pkg.__path__):
        module = importlib.import_module(f"{transports_pkg.__name__}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Transport) and obj is not Transport and not inspect.isabstract(obj):
                found.add(obj)
    return found


def test_every_transport_class_is_registered_under_its_kind() -> None:
    assert _transport_classes_in_package() <= set(TRANSPORTS.values())
    for kind, cls in TRANSPORTS.items():
        assert cls.kind == kind
    assert len({cls.kind for cls in TRANSPORTS.values()}) == len(TRANSPORTS)


def test_every_kind_has_a_sample_config() -> None:
    assert set(SAMPLE_CONFIGS) == set(TRANSPORTS)


@pytest.mark.parametrize("kind", KINDS)
def test_contract_config_schema_present(kind: str) -> None:
    cls = check_transport_class(TRANSPORTS[kind], kind)
    schema = cls.config_type.model_json_schema()
    assert schema["type"] == "object"
    assert schema["properties"]
    json.dumps(schema)
    cls.config_type.model_validate(SAMPLE_CONFIGS[kind])


@pytest.mark.parametrize("kind", KINDS)
async def test_contract_run_calls_started(kind: str) -> None:
    transport, _ = build(TRANSPORTS[kind], SAMPLE_CONFIGS[kind])
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(transport.run)
        nursery.cancel_scope.cancel()


def _all_tasks() -> set[trio.lowlevel.Task]:
    found: set[trio.lowlevel.Task] = set()
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        found.add(task)
        pending += [t for n in task.child_nurseries for t in n.child_tasks]
    return found


@pytest.mark.parametrize("kind", KINDS)
async def test_contract_cancel_leaves_no_task_running(kind: str) -> None:
    before = _all_tasks()
    transport, _ = build(TRANSPORTS[kind], SAMPLE_CONFIGS[kind])
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.run)
            assert len(_all_tasks()) > len(before)
            scope.cancel()
    assert scope.cancelled_caught
    assert _all_tasks() == before


@pytest.mark.parametrize("kind", KINDS)
async def test_contract_send_failure_is_a_send_error(kind: str) -> None:
    """Nothing is connected at this address: the failure must come out as a SendError."""
    transport, _ = build(TRANSPORTS[kind], SAMPLE_CONFIGS[kind])
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        with pytest.raises(SendError):
            await transport.send(VumiMessage(to_addr="192.0.2.1:9", content="x"))
        nursery.cancel_scope.cancel()


def test_loader_accepts_colon_and_dotted_paths() -> None:
    telnet = TRANSPORTS["telnet"]
    assert load_transport_class("channel_proc.transports.telnet:TelnetTransport") is telnet
    assert load_transport_class("channel_proc.transports.telnet.TelnetTransport") is telnet


@pytest.mark.parametrize(
    "path",
    [
        "no_such_module_xyz:Thing",
        "channel_proc.transports.telnet:Missing",
        "channel_proc.transports.telnet:TelnetConfig",
        "channel_proc.transports.base:Transport",
        "justaname",
    ],
)
def test_loader_rejects_bad_paths(path: str) -> None:
    with pytest.raises(ConfigError):
        load_transport_class(path)


def test_available_transports_extends_or_replaces_registry() -> None:
    path = "channel_proc.transports.telnet:TelnetTransport"
    extended = available_transports(Settings(channels={"mytelnet": path}))
    assert set(extended) == set(TRANSPORTS) | {"mytelnet"}
    replaced = available_transports(Settings(channels={"mytelnet": path}, replace_channels=True))
    assert set(replaced) == {"mytelnet"}
