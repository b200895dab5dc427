"""Length-prefixed framing over a byte stream: a 4-byte big-endian length, then the payload.

A framing error is fatal to the connection: we never try to resynchronise.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from ipc.errors import ProtocolError

if TYPE_CHECKING:
    import trio

MAX_FRAME: Final = 16 * 1024 * 1024
_HEADER: Final = struct.Struct(">I")
#: Cap on a single receive_some: a stream allocates a buffer of the size asked for.
_READ_MAX: Final = 1024 * 1024
_READ_MIN: Final = 64 * 1024


def check_frame_size(size: int) -> None:
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes exceeds MAX_FRAME ({MAX_FRAME})")


async def send_frame(stream: trio.abc.SendStream, payload: bytes) -> None:
    """Write one frame. Raises ProtocolError (before writing anything) if it is too large.

    Not safe for concurrent use on one stream; `Connection` serialises senders.
    """
    check_frame_size(len(payload))
    # One send_all so a frame is one write when the socket buffer has room.
    await stream.send_all(_HEADER.pack(len(payload)) + payload)


class FrameReader:
    """Reads frames from a stream, buffering whatever extra bytes a receive returns."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def receive_frame(self) -> bytes | None:
        """The next frame's payload, or None on a clean EOF between frames.

        Raises:
            ProtocolError: a frame announces more than MAX_FRAME bytes, or EOF mid-frame.
        """
        if not await self._fill(_HEADER.size):
            return None
        (size,) = _HEADER.unpack_from(self._buf)
        check_frame_size(size)
        end = _HEADER.size + size
        if not await self._fill(end):
            raise ProtocolError(
                f"EOF inside a frame: got {len(self._buf) - _HEADER.size} of {size} bytes"
            )
        payload = bytes(self._buf[_HEADER.size : end])
        # Deleting a prefix of a bytearray is amortised O(1) in CPython (it moves a start offset).
        del self._buf[:end]
        return payload

    async def _fill(self, needed: int) -> bool:
        """Receive until the buffer holds `needed` bytes. False on EOF at a frame boundary.

        Raises ProtocolError on EOF after part of a header.
        """
        while len(self._buf) < needed:
            missing = needed - len(self._buf)
            chunk = await self._stream.receive_some(min(max(missing, _READ_MIN), _READ_MAX))
            if not chunk:
                if not self._buf:
                    return False
                if len(self._buf) < _HEADER.size:
                    raise ProtocolError(f"EOF inside a frame header ({len(self._buf)} bytes)")
                return False
            self._buf += chunk
        return True
