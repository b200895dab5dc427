"""The outbound actor: `{channel_id}.outbound` -> transport.send -> ack/nack event, then ack."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from channel_proc.backoff import Backoff
from channel_proc.deadletter import dead_letter
from channel_proc.transports.errors import SendError
from ipc.broker import MAX_PRIORITY
from ipc.codec import decode_vumi_message, encode_payload
from ipc.errors import ProtocolError
from ipc.payloads import EventType, VumiEvent, vumi_timestamp

if TYPE_CHECKING:
    import trio

    from channel_proc.lifecycle import Shutdown
    from channel_proc.transports.base import Transport
    from ipc.broker import Broker, Consumer, Delivery
    from ipc.names import Namespace
    from ipc.payloads import VumiMessage

log = logging.getLogger(__name__)

#: Messages are sent one at a time (in queue order); the prefetch only hides broker latency.
OUTBOUND_PREFETCH: Final = 8
#: What `_send` returns for a message the transport accepted without an ack (disable_ack).
SILENT: Final = VumiEvent(event_type=EventType.ACK, user_message_id=None)


class OutboundActor:
    """Sends each queued message through the transport and records the outcome as an event."""

    def __init__(
        self,
        *,
        broker: Broker,
        namespace: Namespace,
        channel_id: str,
        transport: Transport[Any],
        shutdown: Shutdown,
        retry: Backoff | None = None,
    ) -> None:
        self._broker = broker
        self._namespace = namespace
        self._channel_id = channel_id
        self._transport = transport
        self._shutdown = shutdown
        self._retry = retry or Backoff(initial=0.5, cap=30.0)
        self._queue = namespace.outbound_queue(channel_id)
        self._event_queue = namespace.event_queue(channel_id)

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Consume until a stop is requested; unacked messages go back to the queue."""
        await self._broker.declare_queue(self._queue, max_priority=MAX_PRIORITY)
        async with self._broker.consume(self._queue, prefetch=OUTBOUND_PREFETCH) as consumer:
            task_status.started()
            while (delivery := await self._shutdown.receive(consumer)) is not None:
                with self._shutdown.busy():
                    await self._handle(consumer, delivery)

    async def _handle(self, consumer: Consumer, delivery: Delivery) -> None:
        try:
            msg = decode_vumi_message(delivery.body)
        except ProtocolError as exc:
            await dead_letter(
                self._broker,
                self._namespace,
                self._channel_id,
                delivery.body,
                source_queue=self._queue,
                reason=str(exc),
            )
            await consumer.ack(delivery)
            return
        event = await self._send(msg)
        if event is None:
            return
        if event is not SILENT:
            await self._broker.publish(self._event_queue, encode_payload(event))
        await consumer.ack(delivery)

    async def _send(self, msg: VumiMessage) -> VumiEvent | None:
        """The ack or nack event for `msg`; None when a stop interrupted the retries."""
        self._retry.reset()
        while True:
            try:
                receipt = await self._transport.send(msg)
            except SendError as err:
                if not err.retryable:
                    log.warning("message %s rejected (%s): %s", msg.message_id, err.code, err)
                    return VumiEvent(
                        event_type=EventType.NACK,
                        user_message_id=msg.message_id,
                        nack_reason=err.reason,
                        transport_name=self._channel_id,
                    )
                delay = self._retry.next_delay()
                log.warning(
                    "message %s not sent (%s: %s); retrying in %.1f s",
                    msg.message_id,
                    err.code,
                    err,
                    delay,
                )
                # Retrying this message before taking the next keeps the queue's order.
                if not await self._shutdown.sleep(delay):
                    return None
            else:
                if not receipt.publish_ack:
                    return SILENT
                return VumiEvent(
                    event_type=EventType.ACK,
                    timestamp=receipt.accepted_at or vumi_timestamp(),
                    user_message_id=msg.message_id,
                    sent_message_id=receipt.provider_message_id or msg.message_id,
                    transport_name=self._channel_id,
                )
