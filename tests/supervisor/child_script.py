"""A stand-in child for supervisor tests: behaves as the argv says, like the real children.

    child_script.py channel CHANNEL_ID MODE [ARGS...] [--count FILE]
    child_script.py api FD MODE [ARGS...] [--count FILE]
    child_script.py describe CODE       print the catalog (0) or fail with CODE

Modes:
    hello                 say Hello, run until SIGTERM or stdin EOF, exit 0
    exit CODE             exit CODE at once, before any Hello
    hello-exit CODE       say Hello, then exit CODE
    crash-first N FILE    exit 70 while FILE holds fewer than N lines (a line per run), else hello
    gate DIR              write DIR/started, wait for DIR/go, then hello
    stubborn MARKER       hello; on SIGTERM write MARKER and keep running; still exits on stdin EOF
    silent                never say Hello; run until SIGTERM or stdin EOF
    record FILE           hello, write what it was given (settings, stdin, fds) as JSON to FILE
    config-error MESSAGE  store a "channel" config_error status with MESSAGE (as channel_proc
                          does), then exit 78 before any Hello
--count FILE appends the pid to FILE at start. Like the real children, every mode exits
when its stdin reaches EOF (the supervisor is gone).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ipc.client import open_ipc_client
from ipc.messages import Role
from ipc.names import Namespace, supervisor_socket
from ipc.settings import Settings
from ipc.state import open_state

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

CATALOG = {"fake": {"type": "object", "properties": {"x": {"type": "integer"}}}}


async def _until_stopped(signals: AsyncIterator[int], on_term: Path | None) -> None:
    """Return on stdin EOF, or on SIGTERM unless `on_term` is given (then just note it)."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            async for _ in signals:
                if on_term is None:
                    nursery.cancel_scope.cancel()
                    return
                on_term.write_text("SIGTERM\n")  # noqa: ASYNC240 — tiny test write

        nursery.start_soon(watch_signals)
        while await stdin.receive_some():
            pass
        nursery.cancel_scope.cancel()


def _record(path: Path, role: str, ident: str) -> None:
    settings = Settings.from_env()
    fds = {}
    if role == "api":
        sock = socket.socket(fileno=os.dup(int(ident)))
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        fds = {"fd": int(ident), "port": sock.getsockname()[1], "listening": bool(listening)}
        sock.close()
    info = {
        "pid": os.getpid(),
        "run_dir": str(settings.run_dir),
        "namespace": settings.namespace,
        "stdin_is_pipe": stat.S_ISFIFO(os.fstat(0).st_mode),
        "session_leader": os.getsid(0) == os.getpid(),
        **fds,
    }
    path.write_text(json.dumps(info))


async def main(role: str, ident: str, mode: str, args: list[str]) -> int:
    # Handlers first, so a SIGTERM right after the Hello is handled, not fatal.
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        return await _behave(signals, role, ident, mode, args)


async def _behave(
    signals: AsyncIterator[int], role: str, ident: str, mode: str, args: list[str]
) -> int:
    settings = Settings.from_env()
    assert settings.run_dir is not None
    path = supervisor_socket(settings.run_dir)
    channel_id = ident if role == "channel" else None
    on_term = Path(args[0]) if mode == "stubborn" else None
    if mode == "silent":
        await _until_stopped(signals, None)
        return 0
    if mode == "gate":
        gate = Path(args[0])
        (gate / "started").write_text(str(os.getpid()))
        while not (gate / "go").exists():  # noqa: ASYNC110 — a test script waiting on the test
            await trio.sleep(0.01)
    if mode == "record":
        # Before the Hello, so the file is complete once the supervisor sees the child ready.
        _record(Path(args[0]), role, ident)
    async with open_ipc_client(path, role=Role(role), channel_id=channel_id):
        if mode == "hello-exit":
            return int(args[0])
        await _until_stopped(signals, on_term)
    return 0


async def config_error(channel_id: str, message: str) -> int:
    settings = Settings.from_env()
    async with open_state(settings, Namespace(settings.namespace)) as store:
        status = {
            "component": "channel",
            "channel_id": channel_id,
            "status": "down",
            "type": "config_error",
            "message": message,
            "details": {},
        }
        await store.set_status(channel_id, "channel", status)
    return 78


def run() -> int:
    argv = sys.argv[1:]
    if "--count" in argv:
        i = argv.index("--count")
        with open(argv[i + 1], "a") as f:
            f.write(f"{os.getpid()}\n")
        del argv[i : i + 2]
    if argv[0] == "describe":
        code = int(argv[1])
        if code == 0:
            print(json.dumps(CATALOG))
        else:
            print("bad channel mapping: nosuch.module:Thing", file=sys.stderr)
        return code
    role, ident, mode, *args = argv
    if mode == "exit":
        return int(args[0])
    if mode == "config-error":
        return trio.run(config_error, ident, args[0])
    if mode == "crash-first":
        runs = Path(args[1])
        previous = runs.read_text().count("\n") if runs.exists() else 0
        with runs.open("a") as f:
            f.write(f"{os.getpid()}\n")
        if previous < int(args[0]):
            return 70
        mode, args = "hello", []
    return trio.run(main, role, ident, mode, args)


if __name__ == "__main__":
    sys.exit(run())
