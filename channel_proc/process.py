"""The channel process: load the channel, wire the actors under one nursery, stop gracefully.

Start order is status, transport, outbound, forwarder, control socket, readiness; a
stop request ends the consumers first, then the transport, then the status actor.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from channel_proc.control import ChannelControl
from channel_proc.control_state import ControlState
from channel_proc.counters import Counters
from channel_proc.events import StatusMail, StatusReporter
from channel_proc.forwarder import Forwarder, Routes
from channel_proc.link import QueueLink
from channel_proc.metrics import RuntimeSnapshots, SendRate, link_up_from
from channel_proc.outbound import OutboundActor, RateLimiter
from channel_proc.priority import BacklogPriority, apply_backlog
from channel_proc.routers.actor import RouterActor
from channel_proc.routers.destination import DestinationForwarder
from channel_proc.status import MAILBOX_SIZE, run_status_actor
from channel_proc.transports import available_transports
from channel_proc.transports.base import StatusLevel
from channel_proc.transports.errors import ConfigError
from channel_proc.webhook import Callback, WebhookClient, WebhookError, safe_url
from ipc.client import open_ipc_client
from ipc.errors import ConnectionClosedError, ProtocolError
from ipc.messages import Role
from ipc.names import channel_socket, supervisor_socket
from ipc.server import serve_ipc

if TYPE_CHECKING:
    from pathlib import Path

    import httpx

    from channel_proc.lifecycle import Shutdown
    from channel_proc.routers.loading import Routing
    from channel_proc.transports.base import Transport
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.settings import Settings
    from ipc.state import StateStore

log = logging.getLogger(__name__)

#: The status component this process writes about its own configuration.
CHANNEL_COMPONENT: Final = "channel"
#: Bounded cleanup budget for writes made while stopping.
CLEANUP_TIMEOUT: Final = 2.0


class ChannelMissingError(ConfigError):
    """The channel id is not in the store (deleted, or a typo)."""


class ChannelProperties(BaseModel):
    """The stored properties the channel process uses (others are the API's business)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: str
    config: dict[str, Any] = Field(default_factory=dict)
    mo_url: str | None = None
    mo_url_auth_token: str | None = None
    status_url: str | None = None
    amqp_queue: str | None = None
    signing_secret: str | None = None
    rate_limit_count: int | None = None
    rate_limit_window: float | None = None


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """A channel ready to run: its properties, transport class and validated config."""

    channel_id: str
    properties: ChannelProperties
    raw_properties: dict[str, Any]
    transport_class: type[Transport[Any]]
    config: BaseModel


def describe_errors(exc: ValidationError) -> str:
    """Pydantic's errors without the offending input values (they may be secrets)."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(root)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


async def load_channel(store: StateStore, settings: Settings, channel_id: str) -> ChannelSpec:
    """Read the channel's properties once (changes arrive as a restart).

    Raises:
        ChannelMissingError: no such channel.
        ConfigError: unknown type, custom type that does not load, or invalid config.
    """
    raw = await store.get_channel(channel_id)
    if raw is None:
        raise ChannelMissingError(f"channel {channel_id} does not exist")
    try:
        properties = ChannelProperties.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid channel properties: {describe_errors(exc)}") from exc
    # A bad mo_url template is not fatal: the forwarder logs it and dead-letters.
    if properties.mo_url and not Callback(properties.mo_url).is_template:
        try:
            Callback(properties.mo_url).check()
        except WebhookError as exc:
            raise ConfigError(f"mo_url {safe_url(properties.mo_url)}: {exc.reason}") from exc
    transports = available_transports(settings)
    transport_class = transports.get(properties.type)
    if transport_class is None:
        known = ", ".join(sorted(transports)) or "none"
        raise ConfigError(f"unknown channel type {properties.type!r} (available: {known})")
    try:
        config = transport_class.config_type.model_validate(properties.config)
    except ValidationError as exc:
        raise ConfigError(f"invalid {properties.type} config: {describe_errors(exc)}") from exc
    return ChannelSpec(channel_id, properties, raw, transport_class, config)


def channel_status(channel_id: str, level: str, type_: str, message: str) -> dict[str, Any]:
    return {
        "component": CHANNEL_COMPONENT,
        "channel_id": channel_id,
        "status": level,
        "type": type_,
        "message": message,
        "details": {},
    }


async def record_config_error(store: StateStore, channel_id: str, message: str) -> None:
    await store.set_status(
        channel_id, CHANNEL_COMPONENT, channel_status(channel_id, "down", "config_error", message)
    )


async def _clear_config_error(store: StateStore, channel_id: str, reporter: StatusReporter) -> None:
    """A config error recorded by an earlier run would otherwise keep the channel "down"."""
    previous = (await store.get_statuses(channel_id)).get(CHANNEL_COMPONENT)
    if previous is not None and previous.get("status") != "ok":
        reporter.report(CHANNEL_COMPONENT, StatusLevel.OK, "config_ok", "Configuration loaded")


async def run_channel_process(
    spec: ChannelSpec,
    *,
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    shutdown: Shutdown,
    routing: Routing | None = None,
    watch_process: bool = True,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the channel until `shutdown` is requested and in-flight work has finished.

    With `routing` (a router routes this channel) the router's dispatcher consumes the
    channel's inbound messages and events instead of the forwarder, and in the router's home
    process one forwarder per destination runs too (see channel_proc.routers).
    `watch_process` adds the SIGTERM/SIGINT and stdin-EOF watchers and the backlog priority
    (channel_proc/priority.py), which act on the whole process (off for in-process tests).
    `task_status.started()` is called once every actor has started.
    """
    cid = spec.channel_id
    props = spec.properties
    mail_send, mail_recv = trio.open_memory_channel[StatusMail](MAILBOX_SIZE)
    reporter = StatusReporter(mail_send)
    counters = Counters()
    async with (
        WebhookClient(
            timeout=settings.webhook_timeout, concurrency=settings.webhook_concurrency
        ) as http,
        trio.open_nursery() as infra,
    ):
        priority: BacklogPriority | None = None
        if watch_process:
            await infra.start(watch_signals, shutdown)
            infra.start_soon(watch_parent, shutdown)
        await infra.start(
            partial(
                run_status_actor,
                mail_recv,
                channel_id=cid,
                store=store,
                http=http,
                status_url=props.status_url,
                signing_secret=props.signing_secret,
                counters=counters,
            )
        )
        await _clear_config_error(store, cid, reporter)
        link = QueueLink(
            broker, namespace, cid, reporter, store=store, note_ttl=settings.outbound_message_ttl
        )
        transport = spec.transport_class(spec.config, link)
        control_state = ControlState(store, cid)
        send_rate = SendRate()
        outbound = OutboundActor(
            broker=broker,
            namespace=namespace,
            channel_id=cid,
            transport=transport,
            shutdown=shutdown,
            control=control_state,
            rate_limit=RateLimiter(props.rate_limit_count, props.rate_limit_window),
            counters=counters,
            send_rate=send_rate,
            store=store,
            record_ttl=settings.outbound_message_ttl,
        )
        if watch_process:
            # Told the outbound depth by the runtime snapshots, which read it anyway (below).
            priority = BacklogPriority(on_change=partial(apply_backlog, store, broker, outbound))
            infra.start_soon(priority.run)
        snapshots = RuntimeSnapshots(
            store=store,
            broker=broker,
            namespace=namespace,
            channel_id=cid,
            counters=counters,
            send_rate=send_rate,
            control=control_state,
            oldest_outbound_age=outbound.oldest_outbound_age,
            link_up=link_up_from(reporter),
            on_outbound_depth=None if priority is None else priority.update,
        )
        await infra.start(snapshots.run)
        consumers = _consumers(
            spec,
            routing,
            settings=settings,
            namespace=namespace,
            store=store,
            broker=broker,
            http=http,
            reporter=reporter,
            shutdown=shutdown,
            counters=counters,
        )
        control = ChannelControl(
            channel_id=cid,
            broker=broker,
            namespace=namespace,
            statuses=reporter,
            shutdown=shutdown,
        )
        async with trio.open_nursery() as transport_nursery:
            await transport_nursery.start(_run_transport, transport, store, cid)
            async with trio.open_nursery() as workers:
                await workers.start(outbound.run)
                for consumer in consumers:
                    await workers.start(consumer.run)
                await _serve_control(infra, settings.run_dir, cid, control)
                await infra.start(_announce_ready, settings.run_dir, cid)
                log.info("channel %s (%s) is running", cid, props.type)
                task_status.started()
            # The consumers have returned: a stop was requested and in-flight work is done.
            transport_nursery.cancel_scope.cancel()
        log.info("channel %s stopped (%s)", cid, shutdown.reason)
        infra.cancel_scope.cancel()


def _consumers(
    spec: ChannelSpec,
    routing: Routing | None,
    *,
    settings: Settings,
    namespace: Namespace,
    store: StateStore,
    broker: Broker,
    http: httpx.AsyncClient,
    reporter: StatusReporter,
    shutdown: Shutdown,
    counters: Counters,
) -> list[Forwarder | RouterActor]:
    """Who consumes the channel's inbound messages and events: its forwarder, or its router
    (plus, in the router's home process, a forwarder per destination)."""
    if routing is None:
        props = spec.properties
        return [
            Forwarder(
                broker=broker,
                store=store,
                http=http,
                namespace=namespace,
                channel_id=spec.channel_id,
                routes=Routes(
                    mo_url=props.mo_url,
                    mo_url_auth_token=props.mo_url_auth_token,
                    amqp_queue=props.amqp_queue,
                    signing_secret=props.signing_secret,
                ),
                settings=settings,
                reporter=reporter,
                shutdown=shutdown,
                counters=counters,
            )
        ]
    if spec.properties.mo_url is not None or spec.properties.amqp_queue is not None:
        log.warning(
            "channel %s is routed by router %s: its own mo_url and amqp_queue are not used",
            spec.channel_id,
            routing.router_id,
        )
    consumers: list[Forwarder | RouterActor] = [
        RouterActor(
            broker=broker,
            store=store,
            namespace=namespace,
            routing=routing,
            settings=settings,
            shutdown=shutdown,
            counters=counters,
        )
    ]
    if routing.home:
        consumers += [
            DestinationForwarder(
                destination=destination,
                router_id=routing.router_id,
                outbound_channel=routing.router.outbound_channel(),
                broker=broker,
                store=store,
                http=http,
                namespace=namespace,
                settings=settings,
                reporter=reporter,
                shutdown=shutdown,
                channel_signing_secret=spec.properties.signing_secret,
                counters=counters,
            )
            for destination in routing.destinations.values()
        ]
    return consumers


async def _run_transport(
    transport: Transport[Any],
    store: StateStore,
    channel_id: str,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    try:
        await transport.run(task_status=task_status)
    except ConfigError as exc:
        with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
            await record_config_error(store, channel_id, str(exc))
        raise


async def _serve_control(
    nursery: trio.Nursery, run_dir: Path | None, channel_id: str, control: ChannelControl
) -> None:
    if run_dir is None or not await trio.Path(run_dir).is_dir():
        log.info("no run directory; the control socket is not served")
        return
    await nursery.start(
        partial(
            serve_ipc,
            channel_socket(run_dir, channel_id),
            control,
            role=Role.CHANNEL,
            channel_id=channel_id,
        )
    )


async def _announce_ready(
    run_dir: Path | None, channel_id: str, *, task_status: trio.TaskStatus[None]
) -> None:
    """Connect to the supervisor (our Hello says we are ready) and hold the connection."""
    path = supervisor_socket(run_dir) if run_dir is not None else None
    if path is None or not await trio.Path(path).exists():
        log.info("no supervisor socket; running standalone")
        task_status.started()
        return
    try:
        async with open_ipc_client(path, role=Role.CHANNEL, channel_id=channel_id):
            task_status.started()
            await trio.sleep_forever()
    except (ConnectionClosedError, ProtocolError) as exc:
        log.warning("could not announce readiness to the supervisor: %s", exc)
        task_status.started()


async def watch_signals(shutdown: Shutdown, *, task_status: trio.TaskStatus[None]) -> None:
    """SIGTERM/SIGINT: graceful stop; a second one cuts the grace period short."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if shutdown.requested:
                log.warning("%s again: stopping now", name)
                shutdown.hurry()
            else:
                shutdown.request(f"received {name}")


async def watch_parent(shutdown: Shutdown) -> None:
    """EOF on a piped stdin means the supervisor is gone: stop (no orphans)."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        # A terminal or /dev/null is not a parent's pipe (e.g. run by hand).
        return
    async with trio.lowlevel.FdStream(os.dup(0)) as stdin:
        while True:
            try:
                data = await stdin.receive_some(4096)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                shutdown.request("parent process gone (stdin closed)")
                return
