"""Custom channel types loaded through `settings.channels` by the process and e2e tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import trio
from pydantic import BaseModel

from channel_proc.transports.base import SendReceipt, Transport
from channel_proc.transports.errors import ConfigError, ProviderRejected

if TYPE_CHECKING:
    from ipc.payloads import VumiMessage


class EmptyConfig(BaseModel):
    secret_key: str = ""


class CrashingTransport(Transport[EmptyConfig]):
    """Fails with an unexpected error once started: the process must exit 70."""

    kind: ClassVar[str] = "crashing"
    config_type = EmptyConfig

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.lowlevel.checkpoint()
        raise RuntimeError(f"provider library exploded (key {self.config.secret_key})")

    async def send(self, msg: VumiMessage) -> SendReceipt:
        raise ProviderRejected("never sends")


class MisconfiguredTransport(Transport[EmptyConfig]):
    """Finds out at run time that its configuration cannot work: the process must exit 78."""

    kind: ClassVar[str] = "misconfigured"
    config_type = EmptyConfig

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise ConfigError("the provider says this account does not exist")

    async def send(self, msg: VumiMessage) -> SendReceipt:
        raise ProviderRejected("never sends")


class ExplodingTransport(Transport[EmptyConfig]):
    """Runs quietly; sending fails with an unexpected error, so the process crashes (exit 70)."""

    kind: ClassVar[str] = "exploding"
    config_type = EmptyConfig

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def send(self, msg: VumiMessage) -> SendReceipt:
        raise ValueError(f"Bad value {msg.content!r} (key {self.config.secret_key})")
