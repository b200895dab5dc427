"""The `dmark` channel type: Dmark Mobile's USSD over HTTP, served inside the channel process.

`protocol` is the sans-IO core (fields, sessions, response bodies), `http` the small h11
server it runs on, `transport` the Transport holding each request open until the reply.
"""

from __future__ import annotations

from channel_proc.transports.dmark.transport import DmarkConfig, DmarkTransport

__all__ = ["DmarkConfig", "DmarkTransport"]
