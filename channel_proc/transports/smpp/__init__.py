"""The `smpp` channel type (SMPP 3.4): a package, as it outgrew one module.

config (the channel's config), pdu (PDU codec over smpplib), session (the sans-IO
session), text (encodings and long messages), receipts (delivery receipts), ledger and
multipart (what is remembered in the link's notes), bind (one bind's I/O) and transport.
"""

from __future__ import annotations

from channel_proc.transports.smpp.config import SmppConfig
from channel_proc.transports.smpp.transport import SmppTransport

__all__ = ["SmppConfig", "SmppTransport"]
