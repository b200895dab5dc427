"""In-process messages between the actors (never serialized), and the status reporter."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from collections.abc import Mapping

    from channel_proc.transports.base import StatusLevel

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReported:
    """A component's new state, for the status actor."""

    component: str
    level: StatusLevel
    type: str
    message: str
    details: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class StatusQuery:
    """Ask the status actor for every component's latest status; it answers on `reply`."""

    reply: trio.MemorySendChannel[dict[str, JsonObject]]


StatusMail = StatusReported | StatusQuery


class StatusReporter:
    """The send side of the status actor's mailbox, for everyone else in the process."""

    def __init__(self, mail_send: trio.MemorySendChannel[StatusMail]) -> None:
        self._mail_send = mail_send

    def report(
        self,
        component: str,
        level: StatusLevel,
        type: str,
        message: str,
        details: Mapping[str, object] | None = None,
    ) -> None:
        """Never blocks: the status actor's intake does no I/O, so its mailbox is only full
        when something emits statuses in a tight loop; then the update is dropped, loudly."""
        report = StatusReported(
            component=component, level=level, type=type, message=message, details=details or {}
        )
        try:
            self._mail_send.send_nowait(report)
        except trio.WouldBlock:
            log.error("status mailbox full; dropped %s status %s", component, type)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The status actor is gone: the process is stopping.
            log.info("status %s/%s not recorded: stopping", component, type)

    async def components(self) -> dict[str, JsonObject]:
        """Every component's latest status, as stored."""
        reply_send, reply_recv = trio.open_memory_channel[dict[str, JsonObject]](1)
        async with reply_recv:
            await self._mail_send.send(StatusQuery(reply_send))
            return await reply_recv.receive()
