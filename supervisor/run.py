"""run_supervisor: boot (run dir, catalog, plugins, store, control socket, API socket,
plugins started, children), serve until asked to stop, then stop API workers, channels
and plugins in order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio
from pydantic import TypeAdapter, ValidationError

from ipc import exit_codes
from ipc.errors import StoreUnavailableError
from ipc.messages import Role, RouterSchemas
from ipc.names import Namespace, channel_socket, new_channel_id, supervisor_socket
from ipc.server import serve_ipc
from ipc.settings import SETTINGS_ENV
from ipc.state import open_state
from supervisor.child import HelloBoard
from supervisor.control import ControlHandler
from supervisor.plugins.base import PluginConfigError
from supervisor.plugins.host import PluginHost, PluginLoadError, load_plugins
from supervisor.signals import watch_signals
from supervisor.spec import Commands, RestartPolicy, api_spec, channel_spec
from supervisor.tree import ChildTree, ShuttingDownError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ipc.settings import Settings
    from ipc.state import StateStore

log = logging.getLogger(__name__)

CATALOG_TIMEOUT: Final = 60.0
#: Stored channels started at once when the supervisor boots.
BOOT_CONCURRENCY: Final = (os.cpu_count() or 1) + 2
_LISTEN_BACKLOG: Final = 1024
#: sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107
#: Where the run directory is made: short, because Unix socket paths are limited.
_RUN_DIR_PARENT: Final = "/tmp"


class BootError(Exception):
    """The supervisor cannot start; `code` is its exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Running:
    """What `run_supervisor` reports once booted."""

    run_dir: Path
    #: The address the API listens on (the real port when settings.port was 0).
    api_address: tuple[str, int]


async def run_supervisor(
    settings: Settings,
    *,
    commands: Commands | None = None,
    policy: RestartPolicy | None = None,
    stop: trio.Event | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run the gateway until SIGTERM/SIGINT (or `stop` is set); return the exit status.

    Calls task_status.started(Running) once every stored channel has been started (or
    has failed to); not at all when it stops before that. Boot failures are logged and
    returned as exit statuses (78 bad configuration, 69 store, port or run dir
    unavailable, 70 otherwise).
    """
    commands = commands or Commands()
    policy = policy or RestartPolicy.from_settings(settings)
    created = settings.run_dir is None
    try:
        run_dir = _make_run_dir(settings.run_dir)
    except BootError as exc:
        log.error("%s", exc)
        return exc.code
    code: int
    try:
        settings = settings.model_copy(update={"run_dir": run_dir})
        shutdown = trio.Event() if stop is None else stop
        boot = _Boot(settings, run_dir, commands, policy, shutdown, handle_signals)
        code = await boot.run(task_status)
    except* BootError as group:
        # Some boot steps run inside nurseries, so the error may come wrapped in a group.
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        log.error("%s", first)
        code = first.code if isinstance(first, BootError) else exit_codes.EXIT_SOFTWARE
    finally:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
    return code


def _make_run_dir(given: Path | None) -> Path:
    try:
        if given is None:
            parent = _RUN_DIR_PARENT if os.path.isdir(_RUN_DIR_PARENT) else None
            run_dir = Path(tempfile.mkdtemp(prefix="jb-", dir=parent))
        else:
            run_dir = given
            run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise BootError(exit_codes.EXIT_CONFIG, f"cannot create run dir {given}: {exc}") from exc
    longest = channel_socket(run_dir, new_channel_id())
    if len(os.fsencode(longest)) > _MAX_SOCKET_PATH:
        raise BootError(
            exit_codes.EXIT_CONFIG,
            f"run dir {run_dir} is too long for Unix socket paths; use a shorter --run-dir",
        )
    return run_dir


def child_env(settings: Settings) -> dict[str, str]:
    """Our environment plus JUNEBUG_SETTINGS; children import the same code we run."""
    env = dict(os.environ)
    env[SETTINGS_ENV] = settings.to_env()
    # The directory holding the supervisor package also holds ipc, channel_proc and api.
    root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env


@dataclass(frozen=True, slots=True)
class Catalog:
    """The channel and router types the children can run (from `channel_proc describe`)."""

    #: channel type -> JSON Schema of its config.
    channels: dict[str, dict[str, Any]]
    #: router type -> RouterSchemas (config, destination_config).
    routers: dict[str, RouterSchemas]


def parse_catalog(document: object) -> Catalog:
    """`describe --format 2` output ({format: 2, channels, routers}), or the format-1
    {channel type: schema} of a describe command that knows no routers.

    Raises:
        BootError: neither shape.
    """
    if isinstance(document, dict) and document.get("format") == 2:
        channels, routers = document.get("channels"), document.get("routers")
    else:
        channels, routers = document, {}
    if not isinstance(channels, dict) or not all(isinstance(v, dict) for v in channels.values()):
        raise BootError(exit_codes.EXIT_SOFTWARE, "channel type catalog is not {type: schema}")
    try:
        parsed = _ROUTER_CATALOG.validate_python(routers)
    except ValidationError as exc:
        raise BootError(
            exit_codes.EXIT_SOFTWARE,
            f"router type catalog is not {{type: {{config, destination_config}}}}: {exc}",
        ) from exc
    return Catalog(channels=channels, routers=parsed)


_ROUTER_CATALOG: TypeAdapter[dict[str, RouterSchemas]] = TypeAdapter(dict[str, RouterSchemas])


async def load_catalog(argv: Sequence[str], env: dict[str, str]) -> Catalog:
    """Run `channel_proc describe --format 2` once: the channel and router types."""
    try:
        with trio.fail_after(CATALOG_TIMEOUT):
            result = await trio.run_process(
                [*argv, "--format", "2"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
    except OSError as exc:
        raise BootError(exit_codes.EXIT_SOFTWARE, f"cannot run {argv[0]}: {exc}") from exc
    except trio.TooSlowError as exc:
        raise BootError(
            exit_codes.EXIT_SOFTWARE, f"channel type catalog took over {CATALOG_TIMEOUT} s"
        ) from exc
    stderr = _last_line(result.stderr)
    if result.returncode == exit_codes.EXIT_CONFIG:
        raise BootError(exit_codes.EXIT_CONFIG, f"channel types: {stderr}")
    if result.returncode != 0:
        why = exit_codes.describe(result.returncode)
        raise BootError(exit_codes.EXIT_SOFTWARE, f"channel type catalog {why}: {stderr}")
    try:
        document = json.loads(result.stdout)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BootError(
            exit_codes.EXIT_SOFTWARE, f"channel type catalog is not JSON: {exc}"
        ) from exc
    return parse_catalog(document)


def _last_line(output: bytes) -> str:
    """The last non-empty line: the one-line error, or a traceback's exception line."""
    lines = [line.strip() for line in output.decode(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "no error output")


async def bind_api_socket(interface: str, port: int) -> socket.socket:
    """A listening TCP socket the API workers inherit (SO_REUSEADDR; IPv4 preferred)."""
    host = interface or None
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BootError(
            exit_codes.EXIT_CONFIG, f"cannot resolve interface {interface!r}: {exc.strerror}"
        ) from exc
    family, kind, proto, _, addr = sorted(infos, key=lambda i: i[0] != socket.AF_INET)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(_LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise BootError(
            exit_codes.EXIT_UNAVAILABLE,
            f"cannot listen on {interface}:{port}: {exc.strerror or exc}",
        ) from exc
    return sock


class _Boot:
    def __init__(
        self,
        settings: Settings,
        run_dir: Path,
        commands: Commands,
        policy: RestartPolicy,
        shutdown: trio.Event,
        handle_signals: bool,
    ) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.commands = commands
        self.policy = policy
        self.shutdown = shutdown
        self.handle_signals = handle_signals
        self.kill_now = trio.Event()
        self.board = HelloBoard()
        self.env = child_env(settings)
        self.code = 0

    async def run(self, task_status: trio.TaskStatus[Running]) -> int:
        catalog = await load_catalog(self.commands.describe, self.env)
        log.info("channel types: %s", ", ".join(sorted(catalog.channels)) or "none")
        log.info("router types: %s", ", ".join(sorted(catalog.routers)) or "none")
        try:
            plugins = load_plugins(self.settings.plugins)
        except PluginLoadError as exc:
            raise BootError(exit_codes.EXIT_CONFIG, str(exc)) from exc
        async with AsyncExitStack() as stack:
            try:
                store = await stack.enter_async_context(
                    open_state(self.settings, Namespace(self.settings.namespace))
                )
            except StoreUnavailableError as exc:
                raise BootError(exit_codes.EXIT_UNAVAILABLE, f"state store: {exc}") from exc
            sock = stack.enter_context(
                await bind_api_socket(self.settings.interface, self.settings.port)
            )
            await self._serve(store, catalog, PluginHost(plugins, store), sock, task_status)
        log.info("stopped")
        return self.code

    async def _serve(
        self,
        store: StateStore,
        catalog: Catalog,
        plugins: PluginHost,
        sock: socket.socket,
        task_status: trio.TaskStatus[Running],
    ) -> None:
        async with trio.open_nursery() as services:
            if self.handle_signals:
                await services.start(watch_signals, self.shutdown, self.kill_now)
            async with trio.open_nursery() as children:
                tree = ChildTree(
                    children,
                    env=self.env,
                    board=self.board,
                    policy=self.policy,
                    store=store,
                    kill_now=self.kill_now,
                    listener=plugins,
                )
                handler = ControlHandler(
                    tree=tree,
                    store=store,
                    board=self.board,
                    settings=self.settings,
                    commands=self.commands,
                    policy=self.policy,
                    catalog=catalog.channels,
                    router_catalog=catalog.routers,
                )
                path = supervisor_socket(self.run_dir)
                try:
                    await services.start(partial(serve_ipc, path, handler, role=Role.SUPERVISOR))
                except OSError as exc:
                    raise BootError(
                        exit_codes.EXIT_UNAVAILABLE,
                        f"cannot serve the control socket {path}: {exc.strerror or exc}",
                    ) from exc
                with trio.CancelScope() as boot_scope:
                    # A SIGTERM during boot must not wait for every channel to be started.
                    children.start_soon(self._cancel_on_shutdown, boot_scope)
                    if await self._start_plugins(plugins):
                        await self._boot_children(tree, store, sock, task_status)
                    await self.shutdown.wait()
                log.info("stopping API workers, then channels")
                await tree.stop_all(Role.API)
                await tree.stop_all()
            await plugins.stop()
            services.cancel_scope.cancel()

    async def _cancel_on_shutdown(self, scope: trio.CancelScope) -> None:
        await self.shutdown.wait()
        scope.cancel()

    async def _start_plugins(self, plugins: PluginHost) -> bool:
        """start_plugin on each plugin; False (and shutting down, exit 78) if one refused."""
        try:
            await plugins.start(self.settings)
        except PluginConfigError as exc:
            log.error("%s", exc)
            self._fail(exit_codes.EXIT_CONFIG)
            return False
        return True

    async def _boot_children(
        self,
        tree: ChildTree,
        store: StateStore,
        sock: socket.socket,
        task_status: trio.TaskStatus[Running],
    ) -> None:
        try:
            for worker in range(self.settings.api_workers):
                spec = api_spec(self.commands, self.settings, self.policy, sock.fileno(), worker)
                exit = await tree.start(spec)
                if exit is not None:
                    log.error("API worker %d did not start: %s", worker, exit.reason)
                    self._fail(exit.code)
                    return
            cids = await store.list_channels()
            # A few at a time: a channel process's start is mostly CPU (imports), so one
            # at a time leaves cores idle, and all at once makes every one of them late.
            limiter = trio.CapacityLimiter(BOOT_CONCURRENCY)
            async with trio.open_nursery() as starting:
                for cid in cids:
                    starting.start_soon(self._restore_channel, tree, limiter, cid)
        except ShuttingDownError:
            return
        except StoreUnavailableError as exc:
            log.error("state store: %s", exc)
            self._fail(exit_codes.EXIT_UNAVAILABLE)
            return
        host, port = sock.getsockname()[:2]
        running = sum(1 for c in tree.children() if c.pid is not None)
        log.info(
            "ready: API on %s:%d (%d worker(s)), %d/%d channel(s) running, run dir %s",
            host,
            port,
            self.settings.api_workers,
            running,
            len(cids),
            self.run_dir,
        )
        task_status.started(Running(run_dir=self.run_dir, api_address=(host, port)))

    async def _restore_channel(
        self, tree: ChildTree, limiter: trio.CapacityLimiter, cid: str
    ) -> None:
        spec = channel_spec(self.commands, self.settings, self.policy, cid)
        async with limiter:
            try:
                # The API serves while channels are restored: one it has just created or
                # restarted is already in the tree and must not be started twice.
                exit = await tree.start(spec, replace=False)
            except ShuttingDownError:
                return
        if exit is not None:
            log.error("channel %s did not start: %s", cid, exit.reason)

    def _fail(self, code: int) -> None:
        known = (exit_codes.EXIT_CONFIG, exit_codes.EXIT_UNAVAILABLE)
        self.code = code if code in known else exit_codes.EXIT_SOFTWARE
        self.shutdown.set()
