"""Router and destination logs: `{logging_path}/{router_id}` and `{logging_path}/{destination_id}`
(the data of GET /routers/{rid}/logs and .../destinations/{did}/logs), in the channel log's format.

Records go to named loggers; they also propagate to the channel's own log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from channel_proc.logs import ChannelLogHandler, JsonLineFormatter

if TYPE_CHECKING:
    from channel_proc.logs import Redactor
    from channel_proc.routers.loading import Routing
    from ipc.settings import Settings


def router_logger(router_id: str) -> logging.Logger:
    return logging.getLogger(f"junebug.router.{router_id}")


def destination_logger(destination_id: str) -> logging.Logger:
    return logging.getLogger(f"junebug.destination.{destination_id}")


def attach_log_files(settings: Settings, routing: Routing, redact: Redactor) -> None:
    """Give the router and each destination its log file, once per process.

    Only the router's home process (see channel_proc.routers) writes them: two processes
    rotating one file would lose entries.
    """
    log_dir = Path(settings.logging_path)
    log_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    owners = [(router_logger(routing.router_id), routing.router_id)]
    owners += [(destination_logger(did), did) for did in routing.destinations]
    for logger, owner_id in owners:
        handler = ChannelLogHandler(
            log_dir / owner_id,
            max_bytes=settings.log_rotate_size,
            max_files=settings.max_log_files,
        )
        handler.setLevel(logging.INFO)
        handler.setFormatter(JsonLineFormatter(owner_id, redact))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
