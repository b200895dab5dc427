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
    provider has no id of its own and the message's id is used.
    """

    provider_message_id: str | None = None


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

    def __init__(self, config: ConfigT, link: TransportLink) -> None:
        self.config = config
        self.link = link

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
