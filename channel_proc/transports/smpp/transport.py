"""The `smpp` channel type: SMPP 3.4 ESME over one transceiver bind or a transmitter +
receiver pair.

`send` submits each part within the window and mt_tps, rides out ESME_RTHROTTLED /
ESME_RMSGQFUL by pausing the whole bind, and returns once the SMSC accepted every part.
deliver_sm / data_sm become inbound messages or delivery reports, and are answered only
after the link has queued them durably.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Final

import trio

from channel_proc.transports.base import SendReceipt, StatusLevel, Transport
from channel_proc.transports.errors import ProviderRejected
from channel_proc.transports.smpp.bind import BindLoop, BindSettings
from channel_proc.transports.smpp.config import BindType, SmppConfig
from channel_proc.transports.smpp.ledger import IdMatch, Ledger
from channel_proc.transports.smpp.multipart import Reassembler, group_key
from channel_proc.transports.smpp.pdu import ESME_ROK, status_name
from channel_proc.transports.smpp.receipts import Kind, classify
from channel_proc.transports.smpp.session import BindMode
from channel_proc.transports.smpp.submit import Pacer, SubmitLine, Throttle
from channel_proc.transports.smpp.text import (
    ESM_UDHI,
    Concatenation,
    EncodingError,
    decode_text,
    split_udh,
    submit_parts,
)
from ipc.payloads import EventType, VumiEvent, VumiMessage, vumi_timestamp

if TYPE_CHECKING:
    from channel_proc.transports.base import TransportLink
    from channel_proc.transports.smpp.bind import Connection, StatusSink
    from channel_proc.transports.smpp.multipart import Group
    from channel_proc.transports.smpp.pdu import Pdu, PduError
    from channel_proc.transports.smpp.receipts import Receipt
    from channel_proc.transports.smpp.submit import Place, Submission
    from channel_proc.transports.smpp.text import SubmitPart

log = logging.getLogger(__name__)

COMPONENT: Final = "smpp"
#: With a transmitter + receiver pair, the receiver bind reports under its own component.
RECEIVER_COMPONENT: Final = "smpp_receiver"
#: The channel counts as started once every bind tried, or after this long (a connect or
#: bind that hangs must not hold up the channel's start; sends fail until it is bound).
READY_WITHIN: Final = 5.0


class SmppTransport(Transport[SmppConfig]):
    """An SMPP 3.4 client (ESME)."""

    kind = "smpp"
    config_type = SmppConfig
    dedupes_redeliveries = True

    def __init__(self, config: SmppConfig, link: TransportLink) -> None:
        super().__init__(config, link)
        self._options = config.options
        if config.bind_type is BindType.TRANSCEIVER:
            self._tx = BindLoop(
                BindSettings.from_config(config, BindMode.TRANSCEIVER), self, self._sink(COMPONENT)
            )
            self._binds = [self._tx]
        else:
            self._tx = BindLoop(
                BindSettings.from_config(config, BindMode.TRANSMITTER), self, self._sink(COMPONENT)
            )
            rx = BindLoop(
                BindSettings.from_config(config, BindMode.RECEIVER),
                self,
                self._sink(RECEIVER_COMPONENT),
            )
            self._binds = [self._tx, rx]
        self._throttle = Throttle(config.throttle_delay, self._sink(COMPONENT))
        self._line = SubmitLine(self._tx, config.window, self._throttle, Pacer(config.mt_tps))
        self._ledger = Ledger(link, config.third_party_id_expiry)
        self._reassembler = Reassembler(link, config.multipart_reassembly_timeout)
        self._decoding_error = self._options.deliver_sm_decoding_error
        # Random start: references of messages sent just before a restart are not reused.
        self._reference = random.randrange(0x10000)

    @property
    def max_in_flight(self) -> int:
        # The window bounds PDUs awaiting a response (SubmitLine); a send also records the
        # answer in the store afterwards, so twice as many sends keep the window full.
        return 2 * self.config.window

    def _sink(self, component: str) -> StatusSink:
        def report(
            level: StatusLevel, type_: str, message: str, details: dict[str, object]
        ) -> None:
            self.link.status(component, level, type_, message, details)

        return report

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._reassembler.restore()
        async with trio.open_nursery() as nursery:
            for bind in self._binds:
                nursery.start_soon(bind.run)
            nursery.start_soon(self._reassembler.run, self._deliver_incomplete)
            nursery.start_soon(self._line.run)
            with trio.move_on_after(READY_WITHIN):
                for bind in self._binds:
                    await bind.attempted.wait()
            task_status.started()

    # --- outbound ---------------------------------------------------------------------

    async def send(self, msg: VumiMessage) -> SendReceipt:
        # The place in line is taken before the first checkpoint: PDUs go out in call order.
        place = self._line.reserve()
        try:
            return await self._send(msg, place)
        finally:
            self._line.withdraw(place)

    async def _send(self, msg: VumiMessage, place: Place) -> SendReceipt:
        to_addr, from_addr = msg.to_addr, msg.from_addr or ""
        for name, value in (("to_addr", to_addr), ("from_addr", from_addr)):
            if value is None or not value.isascii():
                raise ProviderRejected(f"Invalid {name}: {value}", code="invalid_address")
        assert to_addr is not None
        mid = msg.message_id
        accepted, reference = await self._ledger.sent_state(mid)
        if reference is None:
            reference = self._reference
            self._reference = (self._reference + 1) % 0x10000
        try:
            parts = submit_parts(msg.content or "", self._options, reference)
        except EncodingError as exc:
            raise ProviderRejected(str(exc), code="message_too_long") from exc
        # Accepted before this run: the ack keeps the time it is finally announced.
        accepted_at: str | None = None
        if accepted:
            log.info(
                "message %s: %d of %d part(s) already accepted by the SMSC; not sent again",
                mid,
                len(accepted),
                len(parts),
            )
        todo = [index for index in range(1, len(parts) + 1) if index not in accepted]
        subs = self._line.fill(
            place,
            [self._params(to_addr, from_addr, parts[index - 1]) for index in todo],
            [f" (message {mid} part {index}/{len(parts)})" for index in todo],
        )
        # Every part is on its way at once (within the window); answers are read in order.
        for index, sub in zip(todo, subs, strict=True):
            smsc_id = await self._accepted(sub)
            accepted_at = vumi_timestamp()
            accepted[index] = smsc_id
            early = await self._ledger.part_accepted(
                mid, index, len(parts), smsc_id, accepted, reference
            )
            for receipt in early:
                await self._report(IdMatch(mid, index, len(parts)), receipt)
        ids = ",".join(accepted[i] for i in sorted(accepted))
        # The submit_sm lines name the message and their responses its SMSC ids: at INFO
        # this line would only repeat them (and logging is a good part of the CPU cost).
        log.debug("message %s accepted by the SMSC as %s", mid, ids)
        return SendReceipt(
            ids or None, publish_ack=not self.config.disable_ack, accepted_at=accepted_at
        )

    def _params(self, to_addr: str, from_addr: str, part: SubmitPart) -> dict[str, object]:
        cfg = self.config
        params: dict[str, object] = {
            "service_type": cfg.service_type,
            "source_addr_ton": cfg.source_addr_ton,
            "source_addr_npi": cfg.source_addr_npi,
            "source_addr": from_addr,
            "dest_addr_ton": cfg.dest_addr_ton,
            "dest_addr_npi": cfg.dest_addr_npi,
            "destination_addr": to_addr,
            "esm_class": part.esm_class,
            "registered_delivery": int(cfg.registered_delivery),
            "data_coding": part.data_coding,
        }
        if part.short_message:
            params["short_message"] = part.short_message
        params.update(part.options)
        return params

    async def _accepted(self, sub: Submission) -> str:
        """Wait until the SMSC accepts this PDU (throttled ones go again); its SMSC id.

        Raises:
            ConnectionFailed: not bound, or the bind was lost before the response.
            ProviderRejected: the SMSC refused it (the status name is the reason).
        """
        response = await self._line.response(sub, self.config.submit_sm_expiry)
        if response.ok:
            return response.text("message_id") or ""
        name = status_name(response.status)
        raise ProviderRejected(name, code=name)

    # --- inbound ----------------------------------------------------------------------

    async def request(self, connection: Connection, pdu: Pdu) -> None:
        """Answer a deliver_sm / data_sm once what it carries is durably handed over."""
        status = await self._receive(pdu)
        await connection.respond(pdu, status)

    async def unreadable(self, connection: Connection, error: PduError) -> None:
        await connection.respond(error, self._decoding_error)

    async def _receive(self, pdu: Pdu) -> int:
        content = pdu.octets("message_payload") or pdu.octets("short_message") or b""
        data_coding = pdu.integer("data_coding")
        source = pdu.text("source_addr") or ""
        destination = pdu.text("destination_addr") or ""
        concat: Concatenation | None = None
        body = content
        if pdu.integer("esm_class") & ESM_UDHI:
            try:
                concat, body = split_udh(content)
            except ValueError as exc:
                log.warning("%s from %s: bad UDH (%s)", pdu.command, source, exc)
                return self._decoding_error
        elif "sar_msg_ref_num" in pdu.params:
            concat = Concatenation(
                pdu.integer("sar_msg_ref_num"),
                pdu.integer("sar_total_segments", 1),
                pdu.integer("sar_segment_seqnum", 1),
            )
        try:
            text: str | None = decode_text(body, data_coding, self._options)
        except UnicodeDecodeError:
            text = None
        classified = classify(pdu, text, self._options)
        if classified.kind is Kind.RECEIPT and classified.receipt is not None:
            await self._receipt(classified.receipt)
            return ESME_ROK
        if classified.kind is Kind.BAD_RECEIPT:
            log.warning(
                "esm_class %d says delivery receipt, but the text does not match the regex: %r",
                pdu.integer("esm_class"),
                body[:160],
            )
            return ESME_ROK
        if concat is not None and concat.total > 1:
            return await self._part(pdu, concat, body, source, destination, data_coding)
        if text is None:
            log.warning(
                "cannot decode %s from %s (data_coding %d); answered %s",
                pdu.command,
                source,
                data_coding,
                status_name(self._decoding_error),
            )
            return self._decoding_error
        if not text and not self._options.allow_empty_messages:
            log.warning("empty %s from %s refused", pdu.command, source)
            return self._decoding_error
        await self._deliver(source, destination, text)
        return ESME_ROK

    async def _part(
        self,
        pdu: Pdu,
        concat: Concatenation,
        body: bytes,
        source: str,
        destination: str,
        data_coding: int,
    ) -> int:
        kind = "udh" if pdu.integer("esm_class") & ESM_UDHI else "sar"
        key = group_key(kind, source, destination, concat)
        group = await self._reassembler.add(
            key, concat, body, source=source, destination=destination, data_coding=data_coding
        )
        if group is None:
            return ESME_ROK
        try:
            text = decode_text(group.data(), group.data_coding, self._options)
        except UnicodeDecodeError:
            log.warning(
                "cannot decode multipart message from %s (data_coding %d)", source, data_coding
            )
            await self._reassembler.done(group)
            return self._decoding_error
        await self._deliver(source, destination, text)
        await self._reassembler.done(group)
        return ESME_ROK

    async def _deliver_incomplete(self, group: Group) -> None:
        try:
            text = decode_text(group.data(), group.data_coding, self._options)
        except UnicodeDecodeError:
            log.error("dropped incomplete multipart message from %s: undecodable", group.source)
            return
        metadata: dict[str, object] = {
            "multipart_incomplete": {"parts": group.total, "missing": group.missing()}
        }
        await self._deliver(group.source, group.destination, text, metadata)

    async def _deliver(
        self,
        source: str,
        destination: str,
        text: str,
        metadata: dict[str, object] | None = None,
    ) -> None:
        msg = VumiMessage(
            from_addr=source,
            to_addr=destination,
            content=text,
            transport_type="sms",
            transport_metadata=metadata or {},
        )
        await self.link.inbound(msg)
        log.info("received message %s from %s (%d chars)", msg.message_id, source, len(text))

    # --- delivery receipts ------------------------------------------------------------

    async def _receipt(self, receipt: Receipt) -> None:
        match = await self._ledger.match(receipt)
        if match is not None:
            await self._report(match, receipt)

    async def _report(self, match: IdMatch, receipt: Receipt) -> None:
        if self.config.disable_delivery_report:
            return
        status = receipt.status
        if match.parts > 1:
            combined = await self._ledger.multipart_status(match, status)
            if combined is None:
                return
            status = combined
        event = VumiEvent(
            event_type=EventType.DELIVERY_REPORT,
            user_message_id=match.message_id,
            delivery_status=status,
            transport_metadata={"smpp_delivery_status": receipt.state},
        )
        await self.link.delivery_report(event)
        log.info(
            "delivery report %s (%s) for message %s (SMSC id %s)",
            status.value,
            receipt.state,
            match.message_id,
            receipt.smsc_id,
        )
