"""AMQP frames taken whole from the socket's buffer, for aiormq's connection reader.

aiormq's ``FrameReceiver.get_frame`` reads every frame in three awaited ``readexactly``
calls (type, then channel and size, then payload and frame end) into a ``BytesIO`` under
an ``asyncio.Lock``, copying the bytes twice more on the way. A worker receives three
frames per message (deliver, content header, body), a client one per publisher confirm,
and nearly always the whole frame is in the buffer already. ``use_whole_frame_reading``
replaces, once, ``get_frame`` with a method that, when the frame is all there, cuts it out
of the ``StreamReader``'s buffer in one slice and hands it to ``pamqp.frame.unmarshal``
(as aiormq does). In every other case it calls aiormq's own method, saved at install: a
frame not complete yet, the protocol header still to check (``started``), another call
holding aiormq's lock (a read in progress owns the next bytes), an error or end of
stream on the reader. Results and exceptions are aiormq's: the same tuple, pamqp's
errors as ``InvalidFrameError``.

It reads two attributes of ``asyncio.StreamReader`` that are not public but have kept
their meaning since Python 3.4: ``_buffer`` (a bytearray) and ``_maybe_resume_transport()``
(flow control, called after bytes are taken, as every read method does). The method is
installed only where the latter is there and aiormq's ``FrameReceiver`` sets the attributes
it uses (``reader``, ``started``, ``lock``); a reader without a bytearray ``_buffer`` is
left to aiormq.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pamqp.frame
from aiormq.connection import FrameReceiver
from aiormq.exceptions import InvalidFrameError
from pamqp.exceptions import PAMQPException

__all__ = ("use_whole_frame_reading",)

_FRAME_HEADER = 7  # type (1), channel (2), payload size (4); the frame end (1) follows the payload

GetFrame = Callable[[Any], Awaitable[Any]]
_aiormq_get_frame: list[GetFrame] = []  # aiormq's own method, once installed


async def _get_frame(self: Any) -> Any:
    """``FrameReceiver.get_frame``: the next frame, cut from the buffer when it is all there."""
    reader = getattr(self, "reader", None)  # aiormq deletes it at the end of the stream
    if reader is not None and self.started and not self.lock.locked():
        buffer = getattr(reader, "_buffer", None)
        if (type(buffer) is bytearray and len(buffer) > _FRAME_HEADER
                and reader.exception() is None):
            end = _FRAME_HEADER + int.from_bytes(buffer[3:_FRAME_HEADER]) + 1
            if len(buffer) >= end:
                data = bytes(buffer[:end])
                del buffer[:end]
                reader._maybe_resume_transport()
                try:
                    return pamqp.frame.unmarshal(data)
                except PAMQPException as exc:
                    raise InvalidFrameError(str(exc)) from exc
    return await _aiormq_get_frame[0](self)


def _supported() -> bool:
    # Checked on the classes: an instance would need an event loop. ``_buffer`` is checked
    # on each call instead (an instance attribute), which costs next to nothing.
    names = FrameReceiver.__init__.__code__.co_names
    return callable(getattr(asyncio.StreamReader, "_maybe_resume_transport", None)) and all(
        name in names for name in ("reader", "started", "lock")
    )


def use_whole_frame_reading() -> None:
    """Install the method above on aiormq's ``FrameReceiver``; idempotent, and a no-op where
    the attributes it relies on are missing."""
    if _aiormq_get_frame or not _supported():
        return
    _aiormq_get_frame.append(FrameReceiver.get_frame)
    FrameReceiver.get_frame = _get_frame  # type: ignore[method-assign]
