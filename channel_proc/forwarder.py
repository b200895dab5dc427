"""The forwarder: inbound messages and events from the channel's queues to webhooks and AMQP.

Each queue has its own consumer, so a dead mo_url never holds up events. Per queue, up to
settings.webhook_concurrency POSTs are in flight, started in queue order; a failing delivery
holds the queue's later ones back while it retries (channel_proc.lane), so an outage neither
reorders the backlog nor multiplies the retries. A message is acked only once delivered (or
dead-lettered), so a killed process loses nothing.
mo_url and event_url may be templates (channel_proc.templates), rendered per request; each
POST carries X-Junebug-Delivery (and X-Junebug-Signature with a signing secret), and each
attempt is recorded in the message's timeline.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, ClassVar, Final

import trio

from channel_proc.backoff import Backoff
from channel_proc.consumer import QueueConsumer
from channel_proc.counters import Counters
from channel_proc.transports.base import StatusLevel
from channel_proc.transports.errors import ConfigError
from channel_proc.webhook import (
    Callback,
    PostResult,
    WebhookError,
    WebhookTarget,
    delivery_id,
    post_json,
    safe_url,
)
from ipc.broker import MAX_PRIORITY
from ipc.codec import decode_vumi_message
from ipc.errors import ProtocolError
from ipc.names import amqp_event_key, amqp_inbound_key, amqp_outbound_queue
from ipc.payloads import api_event, api_message, junebug_event_type, vumi_timestamp
from ipc.state import OutboundWrites, RateCount

if TYPE_CHECKING:
    from collections.abc import Mapping

    import httpx

    from channel_proc.events import StatusReporter
    from channel_proc.lane import Turn
    from channel_proc.lifecycle import Shutdown
    from ipc.broker import Broker, Consumer, Delivery
    from ipc.names import Namespace
    from ipc.payloads import VumiEvent, VumiMessage
    from ipc.settings import Settings
    from ipc.state import StateStore

log = logging.getLogger(__name__)

#: Messages relayed from `{amqp_queue}.outbound` get the API's default priority.
AMQP_OUTBOUND_PRIORITY: Final = 1
MO_COMPONENT: Final = "mo_url"
EVENT_COMPONENT: Final = "event_url"
#: Webhook targets: delivery-id prefix, timeline `target`, webhook_failures_total label.
MO_TARGET: Final = "mo_url"
EVENT_TARGET: Final = "event_url"
TIMELINE_STAGE: Final = "webhook_attempt"
#: One attempt (connect, send, answer) may take this many webhook_timeouts in all: httpx's
#: timeout bounds each phase, not their sum (nor an answer trickling in).
ATTEMPT_TIMEOUTS: Final = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Routes:
    """Where a channel's inbound messages and events go (from its stored properties)."""

    mo_url: str | None = None
    mo_url_auth_token: str | None = None
    amqp_queue: str | None = None
    #: Signs every webhook POST (mo_url and event_url) when set.
    signing_secret: str | None = None


class Outcome(Enum):
    DELIVERED = "delivered"
    GAVE_UP = "gave_up"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class _Delivery:
    """One body to one webhook, retried until delivered."""

    #: The status component reported while it fails.
    component: str
    #: MO_TARGET or EVENT_TARGET.
    target: str
    webhook: WebhookTarget
    #: The message whose timeline records each attempt (the inbound or outbound message).
    message_id: str
    #: X-Junebug-Delivery.
    delivery_id: str


class Forwarder(QueueConsumer):
    """Consumes `{cid}.inbound`, `{cid}.event` and (RabbitMQ only) `{amqp_queue}.outbound`."""

    #: Whether inbound messages and events count in the process's `counters` (a router
    #: destination's forwarder leaves that to the router's dispatcher, which saw them first).
    counts_traffic: ClassVar[bool] = True

    def __init__(
        self,
        *,
        broker: Broker,
        store: StateStore,
        http: httpx.AsyncClient,
        namespace: Namespace,
        channel_id: str,
        routes: Routes,
        settings: Settings,
        reporter: StatusReporter,
        shutdown: Shutdown,
        retry_initial: float = 0.5,
        retry_cap: float = 60.0,
        logger: logging.Logger | None = None,
        components: tuple[str, str] = (MO_COMPONENT, EVENT_COMPONENT),
        counters: Counters | None = None,
    ) -> None:
        """`channel_id` names the queues consumed and the owner of what is stored and counted
        (a router destination's forwarder passes the destination id); `logger` and the status
        `components` (mo_url, event_url) let such a forwarder report under its own names.
        `counters` is the process's metrics registry (a private one when not given).

        Raises:
            ConfigError: mo_url is a plain URL that cannot be used. (An invalid mo_url
                template is logged here and each inbound message is dead-lettered.)
        """
        super().__init__(
            broker=broker,
            store=store,
            namespace=namespace,
            channel_id=channel_id,
            settings=settings,
            shutdown=shutdown,
            logger=logger or log,
        )
        self._mo_component, self._event_component = components
        self._http = http
        self._routes = routes
        self._reporter = reporter
        self._retry_initial = retry_initial
        self._retry_cap = retry_cap
        self._failing: set[str] = set()
        self._counters = counters if counters is not None else Counters()
        self._secret = routes.signing_secret or None
        # AMQP integration queues only make sense on RabbitMQ; on the embedded queue
        # nobody would ever consume them.
        self._amqp_queue = routes.amqp_queue if settings.amqp is not None else None
        self._amqp_outbound = amqp_outbound_queue(self._amqp_queue) if self._amqp_queue else ""
        if routes.amqp_queue and settings.amqp is None:
            self._log.warning("amqp_queue is set but the gateway has no RabbitMQ; it is ignored")
        self._mo: Callback | None = None
        if routes.mo_url:
            self._mo = Callback(routes.mo_url, routes.mo_url_auth_token, self._secret)
            try:
                self._mo.check()
            except WebhookError as exc:
                if not self._mo.is_template:
                    raise ConfigError(f"mo_url {safe_url(routes.mo_url)}: {exc.reason}") from exc
                # The API refuses such templates; one stored before that is not worth a dead
                # channel: its messages stay replayable from its dead letters.
                self._log.error(
                    "mo_url %s: %s; inbound messages will be dead-lettered",
                    safe_url(routes.mo_url),
                    exc.reason,
                )

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Start every consumer, then run until a stop is requested and in-flight work ends."""
        async with trio.open_nursery() as nursery:
            await self._start_consumers(nursery)
            if self._amqp_queue:
                await self._broker.declare_queue(self._relay_queue(), max_priority=MAX_PRIORITY)
                # One at a time: relaying is quick, and keeps the application's order.
                relay = partial(self._consume, self._amqp_outbound, self._relay_outbound, limit=1)
                await nursery.start(relay)
            task_status.started()

    # --- inbound ----------------------------------------------------------------------

    async def _handle_inbound(
        self, consumer: Consumer, delivery: Delivery, turn: Turn, msg: VumiMessage
    ) -> None:
        source = self._ns.inbound_queue(self._cid)
        count = self._count_with_delivery("inbound")
        counted = False
        if self._mo is not None:
            what = f"inbound message {msg.message_id}"
            body = self._mo_body(msg)
            outcome = await self._post_mo(self._mo, msg, body, what, turn, count)
            if outcome is Outcome.STOPPED:
                return
            counted = outcome is Outcome.DELIVERED and count is not None
            if outcome is Outcome.GAVE_UP:
                if not await turn.begin():
                    return
                await self._dead_letter(delivery.body, source, f"mo_url gave up on {what}")
        if self._amqp_queue:
            if not await turn.begin():
                return
            key = amqp_inbound_key(self._amqp_queue)
            await self._broker.publish(key, delivery.body)
            self._log.info("inbound message %s published to %s", msg.message_id, key)
        await self._count("inbound", stored=counted)
        await consumer.ack(delivery)

    def _mo_body(self, msg: VumiMessage) -> dict[str, object]:
        """What is POSTed to mo_url."""
        return api_message(msg, self._cid)

    async def _post_mo(
        self,
        callback: Callback,
        msg: VumiMessage,
        body: Mapping[str, object],
        what: str,
        turn: Turn,
        count: str | None = None,
    ) -> Outcome:
        values = {
            "message_id": msg.message_id,
            "channel_id": body.get("channel_id"),
            "from": msg.from_addr,
            "to": msg.to_addr,
            "session_event": msg.session_event.value if msg.session_event else None,
        }
        try:
            target = callback.target(values)
        except WebhookError as exc:
            self._log.error(
                "%s: mo_url %s is unusable: %s", what, safe_url(callback.url), exc.reason
            )
            return Outcome.GAVE_UP
        attempt = _Delivery(
            component=self._mo_component,
            target=MO_TARGET,
            webhook=target,
            message_id=msg.message_id,
            delivery_id=delivery_id(MO_TARGET, msg.message_id),
        )
        return await self._deliver(attempt, body, what, turn, count)

    # --- events -----------------------------------------------------------------------

    async def _handle_event(
        self,
        consumer: Consumer,
        delivery: Delivery,
        turn: Turn,
        event: VumiEvent,
        record: Mapping[str, object] | None,
    ) -> None:
        source = self._ns.event_queue(self._cid)
        if event.user_message_id is None:
            self._log.warning("cannot store event %s: missing user_message_id", event.event_id)
        elif record is None:
            record = await self._event_record(event, event.user_message_id)
        event_type = junebug_event_type(event)
        event_url = record.get("event_url") if record is not None else None
        mid = event.user_message_id
        count = None if event_type is None else self._count_with_delivery(event_type)
        counted = False
        if isinstance(event_url, str) and event_url and record is not None and mid is not None:
            what = f"{event_type} event {event.event_id} of message {mid}"
            outcome = await self._forward_event(
                event_url, record, event_type, event, mid, what, turn, count
            )
            if outcome is Outcome.STOPPED:
                return
            counted = outcome is Outcome.DELIVERED and count is not None
            if outcome is Outcome.GAVE_UP:
                if not await turn.begin():
                    return
                await self._dead_letter(delivery.body, source, f"event_url gave up on {what}")
        if self._amqp_queue:
            if not await turn.begin():
                return
            key = amqp_event_key(self._amqp_queue)
            await self._broker.publish(key, delivery.body)
            self._log.info(
                "%s event %s of message %s published to %s",
                event.event_type.value,
                event.event_id,
                event.user_message_id,
                key,
            )
        if event_type is not None:
            await self._count(event_type, stored=counted)
        await consumer.ack(delivery)

    async def _event_record(self, event: VumiEvent, message_id: str) -> Mapping[str, object] | None:
        """The send record of an event's message (event_url, event_auth_token) kept under
        another owner, when none came with the event from this channel's (a channel's
        forwarder has no other)."""
        return None

    async def _forward_event(
        self,
        event_url: str,
        record: Mapping[str, object],
        event_type: str | None,
        event: VumiEvent,
        message_id: str,
        what: str,
        turn: Turn,
        count: str | None = None,
    ) -> Outcome:
        if event_type is None:
            self._log.info("discarding unrecognised event %s", event.event_id)
            return Outcome.DELIVERED
        token = record.get("event_auth_token")
        callback = Callback(event_url, token if isinstance(token, str) else None, self._secret)
        body = api_event(event, self._cid)
        channel_data = record.get("channel_data")
        session_event = (
            channel_data.get("session_event") if isinstance(channel_data, dict) else None
        )
        values = {
            "message_id": message_id,
            "channel_id": body["channel_id"],
            "event_type": event_type,
            "from": record.get("from"),
            "to": record.get("to"),
            "session_event": session_event,
        }
        try:
            target = callback.target(values)
        except WebhookError as exc:
            self._log.error(
                "%s: event_url %s is unusable: %s", what, safe_url(event_url), exc.reason
            )
            return Outcome.GAVE_UP
        attempt = _Delivery(
            component=self._event_component,
            target=EVENT_TARGET,
            webhook=target,
            message_id=message_id,
            delivery_id=delivery_id(EVENT_TARGET, event.event_id),
        )
        return await self._deliver(attempt, body, what, turn, count)

    # --- AMQP-originated outbound -----------------------------------------------------

    async def _relay_outbound(self, consumer: Consumer, delivery: Delivery, turn: Turn) -> None:
        # Relayed unchanged: the outbound actor dead-letters what it cannot decode.
        try:
            what = f"message {decode_vumi_message(delivery.body).message_id}"
        except ProtocolError:
            what = "an undecodable message"
        await self._broker.publish(
            self._relay_queue(), delivery.body, priority=AMQP_OUTBOUND_PRIORITY
        )
        self._log.info("%s from %s queued for sending", what, self._amqp_outbound)
        await consumer.ack(delivery)

    def _relay_queue(self) -> str:
        """The outbound queue messages from `{amqp_queue}.outbound` are relayed to."""
        return self._ns.outbound_queue(self._cid)

    # --- helpers ----------------------------------------------------------------------

    async def _deliver(
        self,
        delivery: _Delivery,
        body: Mapping[str, object],
        what: str,
        turn: Turn,
        count: str | None = None,
    ) -> Outcome:
        """POST until a 2xx answer, backing off; give up after settings.webhook_max_age.
        Each attempt is recorded in the message's timeline; each failed one is counted.
        `count`: a rate label (see _count_with_delivery) written with the delivered attempt.

        The first attempt waits for its turn in queue order; after a failure, only the
        queue's earliest failing delivery retries (see channel_proc.lane). The age counts
        from the first attempt in this process: after a restart a message gets a fresh
        allowance rather than being dropped on its first failure.
        """
        if not await turn.begin():
            return Outcome.STOPPED
        component, target = delivery.component, delivery.webhook
        # Made at the first failure: its random.Random() costs ~0.1 ms (os.urandom seeding),
        # a fair part of a delivery's CPU time when nothing fails.
        backoff: Backoff | None = None
        first_attempt = trio.current_time()
        max_age = self._settings.webhook_max_age
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._post(target, body, delivery.delivery_id)
            except WebhookError as exc:
                turn.failed()
                self._counters.inc("webhook_failures_total", delivery.target)
                await self._record_attempt(delivery, attempt, exc.status, exc.reason)
                age = trio.current_time() - first_attempt
                if exc.permanent or age >= max_age:
                    turn.settle()
                    self._log.error(
                        "giving up on %s to %s after %d attempt(s) in %.0f s: %s",
                        what,
                        component,
                        attempt,
                        age,
                        exc.reason,
                    )
                    return Outcome.GAVE_UP
                self._report_failing(component, target, exc.reason)
                if backoff is None:
                    backoff = Backoff(initial=self._retry_initial, cap=self._retry_cap)
                if not await self._wait_to_retry(
                    turn, backoff, what, component, exc, max_age - age
                ):
                    return Outcome.STOPPED
            else:
                turn.settle()
                note = None
                if result.oversized:
                    note = (
                        f"answer over {self._settings.webhook_max_response_bytes} bytes: discarded"
                    )
                await self._record_attempt(
                    delivery, attempt, result.status, note, delivered=True, count=count
                )
                self._log.info("%s delivered to %s", what, component)
                self._report_recovered(component, target)
                return Outcome.DELIVERED

    async def _post(
        self, target: WebhookTarget, body: Mapping[str, object], delivery: str
    ) -> PostResult:
        """One attempt, bounded as a whole (see ATTEMPT_TIMEOUTS)."""
        limit = ATTEMPT_TIMEOUTS * self._settings.webhook_timeout
        with trio.move_on_after(limit):
            return await post_json(
                self._http,
                target,
                body,
                delivery=delivery,
                max_response_bytes=self._settings.webhook_max_response_bytes,
            )
        raise WebhookError(f"{target.url} gave no complete answer within {limit:.0f} s")

    async def _wait_to_retry(
        self,
        turn: Turn,
        backoff: Backoff,
        what: str,
        component: str,
        exc: WebhookError,
        time_left: float,
    ) -> bool:
        """Wait for this delivery's next attempt; False when a stop cut the wait short."""
        while True:
            probe = await turn.wait_to_retry()
            if probe is False:
                return False
            if probe is None:
                self._log.info(
                    "retrying %s to %s now that the ones before it settled", what, component
                )
                return True
            delay = min(backoff.next_delay(), time_left)
            self._log.warning(
                "%s not delivered to %s (%s); retry %d in %.1f s",
                what,
                component,
                exc.reason,
                backoff.attempts,
                delay,
            )
            if not await self._shutdown.sleep(delay):
                return False
            if turn.probing:
                return True
            # An earlier delivery failed meanwhile: it probes, this one waits for it.

    async def _record_attempt(
        self,
        delivery: _Delivery,
        attempt: int,
        status: int | None,
        error: str | None,
        *,
        delivered: bool = False,
        count: str | None = None,
    ) -> None:
        """One timeline entry per attempt, stored with the message's events, and the rate
        count `count` with it. `error` is why it failed, or a note on a delivered one (an
        oversized answer)."""
        entry = {
            "message_type": "timeline",
            "timestamp": vumi_timestamp(),
            "stage": TIMELINE_STAGE,
            "details": {
                "target": delivery.target,
                "attempt": attempt,
                "status": status,
                "error": error,
                "delivered": delivered,
            },
        }
        await self._store.write_outbound(
            OutboundWrites(
                message_id=delivery.message_id,
                owners=(self._cid,),
                ttl=self._settings.outbound_message_ttl,
                entry=(uuid.uuid4().hex, entry),
                rates=() if count is None else (self._rate(count),),
            )
        )

    def _report_failing(self, component: str, target: WebhookTarget, reason: str) -> None:
        if component in self._failing:
            return
        self._failing.add(component)
        self._reporter.report(
            component,
            StatusLevel.DEGRADED,
            "delivery_failing",
            f"Deliveries to {component} are failing and being retried",
            {"url": target.url, "error": reason},
        )

    def _report_recovered(self, component: str, target: WebhookTarget) -> None:
        if component not in self._failing:
            return
        self._failing.discard(component)
        self._reporter.report(
            component,
            StatusLevel.OK,
            "delivery_recovered",
            f"Deliveries to {component} succeed again",
            {"url": target.url},
        )

    def _count_with_delivery(self, label: str) -> str | None:
        """`label` when its rate count may be written with the delivered attempt (one store
        write instead of two per message): not when an AMQP publish comes between the webhook
        and the count, since a failed publish redelivers the item and would count it twice."""
        return None if self._amqp_queue else label

    def _rate(self, label: str) -> RateCount:
        return RateCount.now(self._cid, label, self._settings.metric_window)

    async def _count(self, label: str, *, stored: bool = False) -> None:
        """`label` is "inbound" or a Junebug event type; `stored`: its rate count was
        written with the delivery already."""
        if self.counts_traffic:
            if label == "inbound":
                self._counters.inc("messages_in_total")
            else:
                self._counters.inc("events_total", label)
        if not stored:
            await self._store.incr_rates([self._rate(label)])
