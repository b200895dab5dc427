"""The dmark Transport: each Dmark call becomes an inbound message and is held open until
the application's reply (in_reply_to that message) answers it, or `reply_timeout` passes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Final, Self

import trio
from pydantic import BaseModel, ConfigDict, Field, model_validator

from channel_proc.transports.base import SendReceipt, StatusLevel, Transport, TransportLink
from channel_proc.transports.dmark.http import (
    HttpConnection,
    HttpRequest,
    normalise_path,
    serve_http,
)
from channel_proc.transports.dmark.protocol import (
    ANSWERED,
    CLIENT_GONE,
    STOPPED,
    TIMED_OUT,
    Closed,
    ClosedRequests,
    DmarkRequest,
    UssdSessions,
    apology_body,
    ends_session,
    missing_fields_body,
    parse_fields,
    response_body,
    wrap_service_code,
)
from channel_proc.transports.errors import ProviderRejected
from channel_proc.transports.listen import Once, open_listeners_with_retry
from ipc.payloads import SessionEvent, VumiMessage

if TYPE_CHECKING:
    from collections.abc import Mapping

log = logging.getLogger(__name__)

#: Status components: the listener, the last request's decoding, the application's speed.
COMPONENT: Final = "dmark"
REQUEST_COMPONENT: Final = "request"
RESPONSE_COMPONENT: Final = "response"
#: Bounded cleanup when the transport stops while requests are held open.
CLOSE_TIMEOUT: Final = 2.0
#: What an HTTP path may look like in the config (no query, fragment or whitespace).
PATH_PATTERN: Final = r"^/?[^?#\s]*$"


class DmarkConfig(BaseModel):
    """The `config` of a dmark channel (vumi's DmarkUssdTransport and HttpRpcTransport)."""

    # Unknown keys (vumi's redis_manager, request_timeout, ...) are ignored, as vumi did.
    model_config = ConfigDict(frozen=True, extra="ignore")

    web_path: Annotated[
        str, Field(pattern=PATH_PATTERN, description="The HTTP path Dmark calls, e.g. '/dmark'")
    ]
    web_port: Annotated[
        int, Field(ge=0, le=65535, description="The HTTP port to listen on (0: any free port)")
    ] = 0
    web_interface: Annotated[str, Field(description="The address to listen on")] = "0.0.0.0"
    health_path: Annotated[
        str, Field(pattern=PATH_PATTERN, description="GET here answers {'pending_requests': n}")
    ] = "health"
    ussd_session_timeout: Annotated[
        int, Field(gt=0, description="Seconds of inactivity after which a session is forgotten")
    ] = 600
    fix_to_addr: Annotated[
        bool, Field(description="Wrap the service code in '*...#' for the to_addr")
    ] = False
    reply_timeout: Annotated[
        float, Field(gt=0, le=600, description="Seconds to wait for the application's reply")
    ] = 10.0
    reply_timeout_text: Annotated[
        str, Field(description="Sent to the user (session ended) when no reply came in time")
    ] = "Sorry, the service did not respond in time. Please try again later."
    response_time_degraded: Annotated[
        float, Field(gt=0, description="Replies slower than this many seconds: 'degraded'")
    ] = 2.0
    response_time_down: Annotated[
        float, Field(gt=0, description="Replies slower than this many seconds: 'down'")
    ] = 5.0

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.response_time_degraded > self.response_time_down:
            raise ValueError("response_time_degraded must not exceed response_time_down")
        if normalise_path(self.web_path) == normalise_path(self.health_path):
            raise ValueError("web_path and health_path must differ")
        return self


@dataclass(eq=False, slots=True)
class _Held:
    """One Dmark request waiting for the application's reply."""

    inbound: VumiMessage
    request: DmarkRequest
    arrived: float
    reply: VumiMessage | None = None
    replied: trio.Event = field(default_factory=trio.Event)
    #: Set once the reply was written (failure None) or could not be.
    settled: trio.Event = field(default_factory=trio.Event)
    failure: Closed | None = None
    client_gone: bool = False


class DmarkTransport(Transport[DmarkConfig]):
    """Serves Dmark's USSD callbacks; each reply answers the request it is in reply to."""

    kind = "dmark"
    config_type = DmarkConfig

    def __init__(self, config: DmarkConfig, link: TransportLink) -> None:
        super().__init__(config, link)
        self._web_path = normalise_path(config.web_path)
        self._health_path = normalise_path(config.health_path)
        self._sessions = UssdSessions(float(config.ussd_session_timeout))
        self._closed = ClosedRequests(keep_for=float(config.ussd_session_timeout))
        self._held: dict[str, _Held] = {}
        self._reported: dict[str, str] = {}
        self._apology = apology_body(config.reply_timeout_text)
        self._port = 0

    @property
    def port(self) -> int:
        """The port we listen on (the actual one when configured with 0)."""
        return self._port

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ready = Once(task_status)
        listeners = await open_listeners_with_retry(
            self.link, COMPONENT, self.config.web_interface, self.config.web_port, ready
        )
        self._port = listeners[0].socket.getsockname()[1]
        address = f"{self.config.web_interface}:{self._port}"
        log.info("serving Dmark USSD on http://%s%s", address, self._web_path)
        self.link.status(
            COMPONENT,
            StatusLevel.OK,
            "listening",
            f"Listening on {address}",
            {"interface": self.config.web_interface, "port": self._port, "path": self._web_path},
        )
        ready()
        await trio.serve_listeners(self._serve_connection, listeners)

    async def send(self, msg: VumiMessage) -> SendReceipt:
        if msg.in_reply_to is None:
            raise ProviderRejected(
                "dmark can only answer a request: send with reply_to", code="not_a_reply"
            )
        held = self._held.get(msg.in_reply_to)
        if held is None:
            closed = self._closed.get(msg.in_reply_to, trio.current_time())
            if closed is None:
                raise ProviderRejected("Could not find original request.", code="unknown_request")
            raise ProviderRejected(closed.reason, code=closed.code)
        if held.reply is not None:
            raise ProviderRejected(ANSWERED.reason, code=ANSWERED.code)
        held.reply = msg
        held.replied.set()
        # The handler writes at once; waiting for it makes the ack mean "Dmark got it".
        await held.settled.wait()
        if held.failure is not None:
            raise ProviderRejected(held.failure.reason, code=held.failure.code)
        log.info("answered request %s with message %s", held.inbound.message_id, msg.message_id)
        return SendReceipt()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        await serve_http(stream, self._route)

    async def _route(self, connection: HttpConnection, request: HttpRequest) -> None:
        if request.path == self._web_path:
            if request.method in ("GET", "POST"):
                await self._dmark_request(connection, request)
            else:
                await connection.respond(405, b"", allow="GET, POST")
        elif request.path == self._health_path and request.method == "GET":
            body = json.dumps({"pending_requests": len(self._held)}).encode()
            await connection.respond(200, body)
        else:
            await connection.respond(404, b'{"error": "not found"}')

    async def _dmark_request(self, connection: HttpConnection, request: HttpRequest) -> None:
        arrived = trio.current_time()
        parsed = parse_fields(request.query, request.content_type, request.body)
        if isinstance(parsed, list):
            log.warning("Dmark request without %s", ", ".join(parsed))
            await connection.respond(400, missing_fields_body(parsed))
            self._report(
                REQUEST_COMPONENT,
                StatusLevel.DOWN,
                "invalid_inbound_fields",
                "Invalid inbound fields",
                {"missing_parameter": parsed},
            )
            return
        self._report(REQUEST_COMPONENT, StatusLevel.OK, "request_decoded", "Request decoded")
        event = self._sessions.touch(parsed.transaction_id, arrived)
        content = None if event == SessionEvent.NEW else parsed.request_string
        held = _Held(self._inbound_message(parsed, event, content), parsed, arrived)
        self._held[held.inbound.message_id] = held
        try:
            await self.link.inbound(held.inbound)
            log.info(
                "received %s message %s (transaction %s)",
                event.value,
                held.inbound.message_id,
                parsed.transaction_id,
            )
            await self._wait_for_reply(connection, held, arrived + self.config.reply_timeout)
            await self._answer(connection, held)
        finally:
            if connection.can_respond and not held.client_gone:
                # Stopping (or failing): the user gets the apology, not a dropped connection.
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await connection.respond(200, self._apology)
            self._settle(held, STOPPED)

    async def _wait_for_reply(
        self, connection: HttpConnection, held: _Held, deadline: float
    ) -> None:
        """Until the reply arrives, the deadline passes or the client hangs up."""

        async def watch_client() -> None:
            await connection.wait_hang_up()
            held.client_gone = True
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_client)
            with trio.move_on_at(deadline):
                await held.replied.wait()
            nursery.cancel_scope.cancel()

    async def _answer(self, connection: HttpConnection, held: _Held) -> None:
        message_id = held.inbound.message_id
        # No checkpoint from here to the pop: send() sees either the held request or its outcome.
        self._held.pop(message_id, None)
        now = trio.current_time()
        reply = held.reply
        if reply is not None:
            self._closed.add(message_id, ANSWERED, now)
            if ends_session(reply):
                self._sessions.close(held.request.transaction_id)
            written = await connection.respond(200, response_body(reply))
            self._settle(held, None if written else CLIENT_GONE)
            self._report_response_time(now - held.arrived)
            return
        closed = CLIENT_GONE if held.client_gone else TIMED_OUT
        self._closed.add(message_id, closed, now)
        self._sessions.close(held.request.transaction_id)
        if closed is TIMED_OUT:
            log.warning("no reply to %s within %.1f s", message_id, self.config.reply_timeout)
            self._report(
                RESPONSE_COMPONENT,
                StatusLevel.DOWN,
                "timeout",
                "Response timed out",
                {"response_time": round(now - held.arrived, 3)},
            )
            await connection.respond(200, self._apology)
        else:
            log.info("Dmark hung up before the reply to %s", message_id)
        # The session is over for the user; tell the application, as telnet does on hang-up.
        await self.link.inbound(self._inbound_message(held.request, SessionEvent.CLOSE, None))

    def _settle(self, held: _Held, failure: Closed | None) -> None:
        if not held.settled.is_set():
            self._held.pop(held.inbound.message_id, None)
            held.failure = failure
            held.settled.set()

    def _inbound_message(
        self, request: DmarkRequest, event: SessionEvent, content: str | None
    ) -> VumiMessage:
        to_addr = request.service_code
        if self.config.fix_to_addr:
            to_addr = wrap_service_code(to_addr)
        return VumiMessage(
            to_addr=to_addr,
            from_addr=request.msisdn,
            content=content,
            session_event=event,
            provider="dmark",
            transport_type="ussd",
            transport_metadata={
                "dmark_ussd": {
                    "transaction_id": request.transaction_id,
                    "transaction_time": request.transaction_time,
                    "creation_time": request.creation_time,
                }
            },
        )

    def _report_response_time(self, seconds: float) -> None:
        details = {"response_time": round(seconds, 3)}
        if seconds >= self.config.response_time_down:
            self._report(
                RESPONSE_COMPONENT,
                StatusLevel.DOWN,
                "very_slow_response",
                "Very slow response",
                details,
            )
        elif seconds >= self.config.response_time_degraded:
            self._report(
                RESPONSE_COMPONENT, StatusLevel.DEGRADED, "slow_response", "Slow response", details
            )
        else:
            self._report(RESPONSE_COMPONENT, StatusLevel.OK, "response_sent", "Response sent")

    def _report(
        self,
        component: str,
        level: StatusLevel,
        type_: str,
        message: str,
        details: Mapping[str, object] | None = None,
    ) -> None:
        """Only changes are reported: a status per request would flood status_url."""
        if self._reported.get(component) == type_:
            return
        self._reported[component] = type_
        self.link.status(component, level, type_, message, details)
