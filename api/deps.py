"""Typed access to what the routes share: settings, store, broker and the supervisor link."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quart import current_app

if TYPE_CHECKING:
    from api.supervisor_link import SupervisorLink
    from ipc.broker import Broker
    from ipc.names import Namespace
    from ipc.settings import Settings
    from ipc.state import StateStore

EXTENSION_KEY = "junebug"


@dataclass(slots=True, kw_only=True, eq=False)
class ApiContext:
    """Owned by the app: the store and broker are set while it is serving, None otherwise."""

    settings: Settings
    namespace: Namespace
    supervisor: SupervisorLink
    store: StateStore | None = None
    broker: Broker | None = None
    #: Outbound queues this process has declared (with max_priority) since it started.
    declared_queues: set[str] = field(default_factory=set)
    #: Why serving could not start (store or broker unreachable), for the exit code.
    startup_failure: BaseException | None = None
    #: The OpenAPI document, serialized once on first request (api.routes.docs).
    openapi_json: str | None = None

    def state_store(self) -> StateStore:
        if self.store is None:
            raise RuntimeError("the state store is only open while the app is serving")
        return self.store

    def queue_broker(self) -> Broker:
        if self.broker is None:
            raise RuntimeError("the broker is only open while the app is serving")
        return self.broker


def api_context() -> ApiContext:
    # A lookup through Quart's context proxy costs microseconds: hot paths take the context
    # once and use its methods.
    context: ApiContext = current_app.extensions[EXTENSION_KEY]
    return context


def state_store() -> StateStore:
    return api_context().state_store()


def queue_broker() -> Broker:
    return api_context().queue_broker()
