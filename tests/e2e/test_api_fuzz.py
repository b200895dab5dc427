"""Fuzzing the HTTP API with schemathesis, driven by the gateway's own /openapi.json, on a live
gateway (the real junebug-supervisor and its API worker): no 5xx, and every answer is the
JSON envelope (the check is tests/api/fuzz_checks.py).

Bounded: at most MAX_EXAMPLES cases per operation and phase, one worker, a fixed seed (set
JUNEBUG_FUZZ_SEED and JUNEBUG_FUZZ_EXAMPLES to explore further). One real telnet channel
gives the message and log operations something to find; the others get generated ids. Both
backends: the stores and queues see what the fuzzer sends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from tests.e2e.gateway import ROOT, free_port, remember_channel, running_gateway

if TYPE_CHECKING:
    from ipc.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCHEMATHESIS = Path(sys.executable).with_name("st")
HOOKS = Path(__file__).resolve().parents[1] / "api" / "fuzz_checks.py"
MAX_EXAMPLES = int(os.environ.get("JUNEBUG_FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("JUNEBUG_FUZZ_SEED", "20240601"))
#: Bounds the schemathesis run (10-30 s on two cores) so that a hang fails instead.
RUN_TIMEOUT = 180

#: Everything but positive_data_acceptance: bodies valid by the schema are still refused
#: for unknown channels or channel types, which is right.
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "missing_required_header",
        "unsupported_method",
        "use_after_free",
        "ensure_resource_availability",
        "junebug_envelope",
    ]
)


def _config(channel_id: str) -> str:
    """Operations that only read a channel, or send through it, use the real one; those that
    would modify, restart or delete it get generated ids (a restart per case is too slow)."""
    operations = r"^(messages\.|logs\.|channels\.get_channel$)"
    return (
        f"hooks = {json.dumps(str(HOOKS))}\n"
        "[[operations]]\n"
        f"include-operation-id-regex = {json.dumps(operations)}\n"
        f"parameters = {{ {json.dumps('path.channel_id')} = {json.dumps(channel_id)} }}\n"
    )


async def test_fuzzing_finds_no_server_error_and_no_envelope_violation(
    settings: Settings, tmp_path: Path
) -> None:
    if not SCHEMATHESIS.exists():
        pytest.fail(f"schemathesis is not installed ({SCHEMATHESIS} is missing)")
    async with running_gateway(settings) as gateway:
        response = await gateway.request(
            "POST",
            "/channels/",
            {
                "type": "telnet",
                "config": {"twisted_endpoint": f"tcp:{free_port()}"},
                "mo_url": f"http://127.0.0.1:{free_port()}/mo",
                "character_limit": 40,
            },
        )
        assert response.status_code == 201, response.text
        channel_id = response.json()["result"]["id"]
        remember_channel(settings, channel_id)
        config = tmp_path / "schemathesis.toml"
        config.write_text(_config(channel_id))
        command = [
            str(SCHEMATHESIS),
            "--config-file",
            str(config),
            "run",
            f"{gateway.base_url}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--generation-database",
            "none",
            "--no-color",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with trio.fail_after(RUN_TIMEOUT):
            result = await trio.run_process(
                command,
                env=env,
                cwd=tmp_path,
                capture_stdout=True,
                stderr=subprocess.STDOUT,
                check=False,
            )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output[-12000:]
    assert " passed" in output, output[-2000:]
