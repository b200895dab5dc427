"""`python -m api`: serve the app with Hypercorn's trio worker on an inherited socket or a bind.

python -m api --fd N --worker W     (started by junebug-supervisor; settings in JUNEBUG_SETTINGS)
python -m api --bind HOST:PORT      (standalone; JUNEBUG_SETTINGS optional)
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.utils import LifespanFailureError

from api.app import JunebugApp, create_app
from api.asgi import install_coalescing_h11
from api.deps import EXTENSION_KEY, ApiContext
from api.supervisor_link import SupervisorLink
from ipc.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, EXIT_UNAVAILABLE
from ipc.names import supervisor_socket
from ipc.observability import configure_sentry, logging_disabled
from ipc.settings import SETTINGS_ENV, Settings

log = logging.getLogger("api")

#: Hypercorn's (h11's) limit on a request head (request line + headers) still incomplete:
#: beyond it Hypercorn itself answers 431 with an empty body and closes the connection. The
#: app never sees the request, so that one answer is not in the envelope. A head that
#: arrives whole within one socket read (64 KiB) is not held to it.
MAX_REQUEST_HEAD = 16 * 1024
#: Seconds one socket read may wait while a request is being received (slow-client bound;
#: an idle keep-alive connection is closed after Hypercorn's keep_alive_timeout anyway).
READ_TIMEOUT = 30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m api", description="Junebug HTTP API worker")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="listening socket inherited from the supervisor")
    where.add_argument("--bind", help="HOST:PORT to listen on (standalone use)")
    parser.add_argument("--worker", type=int, default=0, help="worker number, for the logs")
    return parser


def hypercorn_config(bind: str, settings: Settings) -> HypercornConfig:
    """How every API worker serves: timeouts, request-head limit, logging, and HTTP/1.1
    responses in one write (api.asgi.CoalescingH11Protocol)."""
    install_coalescing_h11()
    config = HypercornConfig()
    config.bind = [bind]
    # Finish in-flight requests before the supervisor's own grace period ends in SIGKILL.
    config.graceful_timeout = max(1.0, settings.shutdown_grace - 2.0)
    config.errorlog = logging.getLogger("hypercorn.error")
    config.h11_max_incomplete_size = MAX_REQUEST_HEAD
    config.read_timeout = READ_TIMEOUT
    return config


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            stop.set()


async def _watch_stdin(stop: trio.Event) -> None:
    """The supervisor holds our stdin pipe open: EOF means it is gone."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while await stdin.receive_some(4096):
            pass
    log.info("stdin closed (supervisor gone): shutting down")
    stop.set()


async def _serve(
    app: JunebugApp,
    config: HypercornConfig,
    stop: trio.Event,
    done: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
    # Served and drained: nothing else (signal watchers, the supervisor link) must outlive it.
    done.cancel()


async def run_api(settings: Settings, *, bind: str, watch_stdin: bool) -> int:
    """Serve until SIGTERM/SIGINT or stdin EOF; the exit code for the supervisor."""
    socket_path = supervisor_socket(settings.run_dir) if settings.run_dir is not None else None
    link = SupervisorLink(socket_path)
    app = create_app(
        settings,
        supervisor=link,
        max_body_size=settings.max_body_size,
        body_timeout=settings.body_timeout,
    )
    context: ApiContext = app.extensions[EXTENSION_KEY]
    stop = trio.Event()
    exit_code = EXIT_OK
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, stop)
            if watch_stdin:
                nursery.start_soon(_watch_stdin, stop)
            config = hypercorn_config(bind, settings)
            binds = await nursery.start(_serve, app, config, stop, nursery.cancel_scope)
            # The app and everything imported live as long as the worker: out of the
            # collector's sight, a full collection no longer walks them all, which stalled
            # every request in flight for 40-50 ms each time under load.
            gc.freeze()
            log.info("serving on %s", ", ".join(binds))
            # Connecting is our readiness signal to the supervisor: only once we serve.
            nursery.start_soon(link.run)
    except* LifespanFailureError:
        if context.startup_failure is not None:
            log.error("state store or broker unavailable: %s", context.startup_failure)
            exit_code = EXIT_UNAVAILABLE
        else:
            log.error("the app failed to start", exc_info=True)
            exit_code = EXIT_SOFTWARE
    return exit_code


def _configure_logging(worker: int) -> None:
    if logging_disabled():
        # JUNEBUG_DISABLE_LOGGING: nothing on stdout/stderr (the NullHandler also keeps
        # logging's last-resort handler quiet). Records are still made, so Sentry gets them.
        root = logging.getLogger()
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.INFO)
        return
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s api[{worker}] %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.worker)
    if args.fd is not None:
        bind, watch_stdin = f"fd://{args.fd}", True
    else:
        bind, watch_stdin = args.bind, False
    try:
        if args.fd is None and SETTINGS_ENV not in os.environ:
            settings = Settings()
        else:
            settings = Settings.from_env()
    except (KeyError, ValueError) as exc:
        log.error("bad settings: %s", exc)
        return EXIT_CONFIG
    try:
        configure_sentry(settings, role="api")
    except ValueError as exc:  # sentry_sdk's BadDsn
        log.error("bad sentry_dsn: %s", exc)
        return EXIT_CONFIG
    try:
        return trio.run(partial(run_api, settings, bind=bind, watch_stdin=watch_stdin))
    except Exception:
        log.critical("API worker crashed", exc_info=True)
        return EXIT_SOFTWARE
