"""A message connection: typed IPC messages as frames over one trio stream.

Translates trio's stream errors to ConnectionClosedError, once, here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import trio

from ipc.codec import decode_ipc, encode_ipc
from ipc.errors import ConnectionClosedError
from ipc.framing import FrameReader, check_frame_size, send_frame

if TYPE_CHECKING:
    from ipc.messages import Message

#: How long closing may take when we are being cancelled.
_CLOSE_GRACE: Final = 2.0


class Connection:
    """Sends and receives Messages. Any number of tasks may `send`; one task may `receive`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._reader = FrameReader(stream)
        self._send_lock = trio.Lock()
        self._closed = False

    async def send(self, msg: Message) -> None:
        """Send one message; concurrent senders never interleave their frames.

        Raises:
            ProtocolError: the message encodes to more than MAX_FRAME (nothing was sent).
            ConnectionClosedError: the connection is closed or broken.
        Cancellation: if cancelled while the frame is being written, the stream may hold
        half a frame, so the connection is closed rather than left corrupt.
        """
        data = encode_ipc(msg)
        check_frame_size(len(data))
        async with self._send_lock:
            if self._closed:
                raise ConnectionClosedError("connection is closed")
            # Raise a pending cancellation here, where nothing has been written yet,
            # so that only a cancellation during the write costs us the connection.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                await send_frame(self._stream, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._closed = True
                raise ConnectionClosedError(f"cannot send: {_describe(exc)}") from exc
            except trio.Cancelled:
                await self.aclose()
                raise

    async def receive(self) -> Message:
        """The next message.

        Raises:
            ConnectionClosedError: the peer closed the connection (or we did).
            ProtocolError: a bad frame or undecodable message; the caller should close.
        """
        try:
            frame = await self._reader.receive_frame()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._closed = True
            raise ConnectionClosedError(f"cannot receive: {_describe(exc)}") from exc
        if frame is None:
            raise ConnectionClosedError("peer closed the connection")
        return decode_ipc(frame)

    async def aclose(self) -> None:
        """Close the stream. Idempotent; bounded even when called from a cancelled task."""
        self._closed = True
        with trio.move_on_after(_CLOSE_GRACE, shield=True):
            await self._stream.aclose()


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
