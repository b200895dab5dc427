"""The local-IPC wire schema: a closed, versioned, tagged union of typed messages.

Every connection starts with a Hello in each direction. Requests carry an `id`;
the reply echoes it. A failed request is answered with ErrorReply.
Handlers dispatch with `match` and end in `assert_never`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1


class Role(StrEnum):
    SUPERVISOR = "supervisor"
    API = "api"
    CHANNEL = "channel"
    CLI = "cli"


class ChildState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"  # waiting to be restarted after a crash
    FAILED = "failed"  # restart budget exhausted or config error; retried slowly
    STOPPING = "stopping"
    STOPPED = "stopped"


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Request(_Msg):
    id: int


# --- handshake -------------------------------------------------------------------------


class Hello(_Msg):
    """First frame in each direction. A channel child sends it once it is ready to work."""

    type: Literal["hello"] = "hello"
    protocol: int = PROTOCOL_VERSION
    role: Role
    pid: int
    channel_id: str | None = None


# --- requests to the supervisor ---------------------------------------------------------


class StartChannel(_Request):
    """Start the channel from its stored properties, or restart it if running (config changed)."""

    type: Literal["start_channel"] = "start_channel"
    channel_id: str


class StopChannel(_Request):
    """Stop the channel process (drain, then SIGTERM, then SIGKILL) and forget it."""

    type: Literal["stop_channel"] = "stop_channel"
    channel_id: str


class RestartChannel(_Request):
    type: Literal["restart_channel"] = "restart_channel"
    channel_id: str


class ListChildren(_Request):
    type: Literal["list_children"] = "list_children"


class GetCatalog(_Request):
    """Ask for the channel types available and the JSON Schema of each one's `config`."""

    type: Literal["get_catalog"] = "get_catalog"


# --- requests to a channel process ------------------------------------------------------


class GetStatus(_Request):
    type: Literal["get_status"] = "get_status"


class Drain(_Request):
    """Stop consuming, finish in-flight work within the grace period, then exit 0."""

    type: Literal["drain"] = "drain"


class Ping(_Request):
    type: Literal["ping"] = "ping"


# --- replies ----------------------------------------------------------------------------


class ChildInfo(_Msg):
    channel_id: str
    state: ChildState
    pid: int | None = None
    restarts: int = 0
    reason: str | None = None


class Ok(_Msg):
    type: Literal["ok"] = "ok"
    id: int
    detail: str = ""


class ChildrenReply(_Msg):
    type: Literal["children"] = "children"
    id: int
    children: list[ChildInfo]


#: In a router type's `config` schema, a top-level property carrying this keyword (true) names
#: a channel the router routes (a channel id, or a list of them). The API enforces one router
#: per channel with it; the channel process runs the router of the channel it finds named.
ROUTER_CHANNEL_KEYWORD = "x-junebug-channel"
#: In a destination `config` schema, a boolean property carrying this keyword (true) marks the
#: router's default destination: at most one destination of a router may set it.
ROUTER_DEFAULT_KEYWORD = "x-junebug-default"


class RouterSchemas(_Msg):
    """What the API needs to validate a router type's bodies (JSON Schema, draft 2020-12)."""

    config: dict[str, Any]
    destination_config: dict[str, Any]


class CatalogReply(_Msg):
    type: Literal["catalog"] = "catalog"
    id: int
    #: channel type -> JSON Schema (draft 2020-12, from pydantic) of its `config` object.
    config_schemas: dict[str, dict[str, Any]]
    #: router type -> its schemas. Defaulted so that a sender without routers still validates.
    router_schemas: dict[str, RouterSchemas] = Field(default_factory=dict)


class StatusReply(_Msg):
    type: Literal["status"] = "status"
    id: int
    channel_id: str
    components: dict[str, dict[str, Any]]
    queued_outbound: int = 0
    queued_inbound: int = 0
    queued_events: int = 0


class ErrorReply(_Msg):
    type: Literal["error"] = "error"
    id: int
    #: An HTTP-like code the API may pass on (400 bad request, 404 unknown, 503 unavailable).
    code: int
    error_type: str
    message: str


Request = (
    StartChannel
    | StopChannel
    | RestartChannel
    | ListChildren
    | GetCatalog
    | GetStatus
    | Drain
    | Ping
)
Reply = Ok | ChildrenReply | CatalogReply | StatusReply | ErrorReply

Message = Annotated[
    Hello
    | StartChannel
    | StopChannel
    | RestartChannel
    | ListChildren
    | GetCatalog
    | GetStatus
    | Drain
    | Ping
    | Ok
    | ChildrenReply
    | CatalogReply
    | StatusReply
    | ErrorReply,
    Field(discriminator="type"),
]
