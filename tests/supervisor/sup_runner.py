"""Runs the real run_supervisor in its own process with child_script.py children.

    sup_runner.py CONFIG_JSON

CONFIG_JSON: {"settings": <Settings JSON>, "modes": {cid: [mode...]}, "api_mode": [mode...]}.
Used by the tests that signal or SIGKILL the supervisor itself.
"""

from __future__ import annotations

import json
import logging
import sys
from functools import partial

import trio

from ipc.settings import Settings
from supervisor.run import run_supervisor
from tests.supervisor.scripted import fake_commands


def run() -> int:
    config = json.loads(sys.argv[1])
    settings = Settings.model_validate(config["settings"])
    modes = {cid: tuple(mode) for cid, mode in config["modes"].items()}
    commands = fake_commands(modes, tuple(config["api_mode"]))
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s [%(name)s] %(levelname)s: %(message)s",
    )
    return trio.run(partial(run_supervisor, settings, commands=commands))


if __name__ == "__main__":
    sys.exit(run())
