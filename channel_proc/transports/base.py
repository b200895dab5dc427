"""The channel-type plug-in seam: the Transport ABC and the TransportLink it calls back into.

A transport talks to one provider and nothing else: no queues, no store, no retries,
no IPC. The channel process gives it a TransportLink and calls `run` and `send`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

import trio
from pydantic import BaseModel

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ipc.payloads import VumiEvent, VumiMessage

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StatusLevel(StrEnum):
    """Status levels of docs 1.8.4, as stored and POSTed to status_url."""

    OK = "ok"
    DEGRADED = "degraded"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class SendReceipt:
    """What the provider said when it accepted a message.

    `provider_message_id` becomes the ack event's `sent_message_id`; None means the
    provider has no id of its own and the message's id is used. `publish_ack` False
    means the channel is configured not to announce acceptance (vumi's disable_ack).
    `accepted_at` (vumi timestamp format) is when the provider accepted it, so that the
    ack sorts before delivery reports that arrived while `send` was finishing.
    """

    provider_message_id: str | None = None
    publish_ack: bool = True
    accepted_at: str | None = None


class TransportLink(Protocol):
    """What a transport may call back into; the channel process implements it."""

    async def inbound(self, msg: VumiMessage) -> None:
        """Queue one inbound message durably.

        Returns only once the message is durably queued, so the transport may then
        acknowledge it to the provider. Raises BrokerUnavailableError when it cannot be queued
        (the transport must not acknowledge the provider then).
        """
        ...

    async def delivery_report(self, event: VumiEvent) -> None:
        """Queue one delivery_report event durably (same guarantee as `inbound`)."""
        ...

    def status(
        self,
        component: str,
        level: StatusLevel,
        type: str,
        message: str,
        details: Mapping[str, object] | None = None,
    ) -> None:
        """Report the state of one component (e.g. "telnet": ok/"listening"). Never blocks."""
        ...

    # A small durable keyed store for what a transport must remember across restarts
    # (provider id maps, parts of inbound messages). Keys are "group:name"; each group is
    # stored apart, so `notes("group:")` reads one group only. Values are JSON objects.
    # Every note method raises StoreUnavailableError when the store cannot be reached.

    async def note_put(
        self, key: str, value: Mapping[str, object], ttl: float | None = None
    ) -> None:
        """Store `value` under `key` for `ttl` seconds (None: the channel's record lifetime,
        the gateway's outbound_message_ttl)."""
        ...

    async def note_put_many(
        self, notes: Mapping[str, Mapping[str, object]], ttl: float | None = None
    ) -> None:
        """Store each value under its key, as note_put would, in one store write (cheaper
        than one note_put each, and both or neither are stored)."""
        ...

    async def note_get(self, key: str) -> dict[str, object] | None:
        """The value under `key`, or None when missing or expired."""
        ...

    async def note_delete(self, key: str) -> bool:
        """Remove one note; False when there was none."""
        ...

    async def notes(self, prefix: str) -> dict[str, dict[str, object]]:
        """Every live note whose key starts with `prefix` (which must name its group,
        "group:..."), by key."""
        ...


class Transport(abc.ABC, Generic[ConfigT]):
    """One channel type. Subclasses set `kind` and `config_type` and implement run/send.

    Args:
        config: the channel's `config` object, already validated as `config_type`.
        link: where inbound messages, delivery reports and statuses go.
    """

    #: Registry key and the channel's `type`, e.g. "telnet".
    kind: ClassVar[str]
    #: The pydantic model of the channel's `config`; its JSON Schema is what the API validates.
    config_type: ClassVar[type[BaseModel]]

    #: True when `send` records what the provider accepted (in the store) before returning,
    #: and a later `send` of the same message is answered from that record instead of going
    #: out again (SMPP's ledger). The channel then frees a send's place in the window as soon
    #: as it returns, while its event is published and its delivery acked: a crash meanwhile
    #: redelivers the message, which the record keeps from being sent twice.
    dedupes_redeliveries: ClassVar[bool] = False

    def __init__(self, config: ConfigT, link: TransportLink) -> None:
        self.config = config
        self.link = link

    @property
    def max_in_flight(self) -> int:
        """How many `send` calls the channel may run at once (1: one after the other).

        With more than 1, the calls are made in queue order, each only once the previous
        call has run up to its first checkpoint; a transport that must keep that order on
        the wire takes its place in line before its first `await`.
        """
        return 1

    @abc.abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect or listen, call `task_status.started()`, then pump inbound traffic until
        cancelled.

        `started()` is called once the transport has made its first attempt to reach the
        provider, even when that attempt failed: expected link loss is retried inside
        `run` and shown through `link.status`, so the channel still becomes ready.

        Raises:
            ConfigError: a problem a restart cannot fix.
        Cancellation: the transport closes its connections and returns promptly.
        """

    @abc.abstractmethod
    async def send(self, msg: VumiMessage) -> SendReceipt:
        """Hand one outbound message to the provider.

        Returns:
            The provider's receipt.
        Raises:
            SendError: a subclass saying whether a retry may help; nothing else is expected.
        Cancellation: safe; the message counts as not sent.
        """
