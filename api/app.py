"""create_app(): the Quart-Trio app, its blueprints, error envelope and serving lifespan."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from quart_trio import QuartTrio

from api.asgi import HTTPConnection
from api.auth import authenticator
from api.deps import EXTENSION_KEY, ApiContext
from api.errors import http_error_response, register_error_handlers
from api.routes import (
    channels,
    control,
    dead_letters,
    destinations,
    docs,
    health,
    logs,
    messages,
    metrics,
    routers,
)
from ipc.broker import open_broker
from ipc.errors import BrokerUnavailableError, StoreUnavailableError
from ipc.names import Namespace
from ipc.state import open_state

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from quart import Response
    from werkzeug.exceptions import HTTPException

    from api.supervisor_link import SupervisorLink
    from ipc.settings import Settings

log = logging.getLogger(__name__)

#: Largest request body read (413 beyond). No body of this API comes near it; the default
#: stops one client from making a worker buffer megabytes. (A Settings field would make it
#: configurable per gateway; create_app takes it as an argument meanwhile.)
MAX_BODY_SIZE = 1024 * 1024
#: Seconds for a body to arrive once its headers have (408 beyond): slow clients cannot
#: hold a request open indefinitely.
BODY_TIMEOUT = 30


class JunebugApp(QuartTrio):
    """Routing errors (404, 405 and the 308 slash redirect included) answer in the envelope."""

    asgi_http_class = HTTPConnection

    async def handle_http_exception(self, error: HTTPException) -> Response:
        # Quart returns RoutingExceptions such as RequestRedirect untouched, bypassing the
        # error handlers; the original answered those in the envelope too.
        return http_error_response(error)


def create_app(
    settings: Settings,
    *,
    supervisor: SupervisorLink,
    max_body_size: int = MAX_BODY_SIZE,
    body_timeout: float = BODY_TIMEOUT,
) -> JunebugApp:
    """The API app. While serving it holds the state store and the broker; `supervisor` is
    run by the caller (api.main or a test), which decides when the worker is ready.
    """
    # No static files: every path is an API route (or /docs, /openapi.json).
    app = JunebugApp(__name__, static_folder=None)
    # Every response carries the envelope, so OPTIONS is not answered automatically.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.config["MAX_CONTENT_LENGTH"] = max_body_size
    app.config["BODY_TIMEOUT"] = body_timeout
    context = ApiContext(
        settings=settings, namespace=Namespace(settings.namespace), supervisor=supervisor
    )
    app.extensions[EXTENSION_KEY] = context

    @app.while_serving
    async def hold_clients() -> AsyncGenerator[None, None]:
        serving = False
        try:
            async with (
                open_state(settings, context.namespace) as store,
                open_broker(settings) as broker,
            ):
                context.store, context.broker = store, broker
                serving = True
                try:
                    yield
                finally:
                    context.store = context.broker = None
        except (StoreUnavailableError, BrokerUnavailableError) as exc:
            if not serving:
                context.startup_failure = exc
            raise

    authenticate = authenticator(settings)
    if authenticate is not None:
        # Before routing errors too: without a token, no answer tells which paths exist.
        app.before_request(authenticate)
    for blueprint in (
        channels.blueprint,
        messages.blueprint,
        control.blueprint,
        logs.blueprint,
        metrics.blueprint,
        routers.blueprint,
        destinations.blueprint,
        dead_letters.blueprint,
        health.blueprint,
        docs.blueprint,
    ):
        app.register_blueprint(blueprint)
    register_error_handlers(app)
    return app
