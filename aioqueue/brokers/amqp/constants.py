"""AMQP 0-9-1 wire constants our own frame code uses (the spec's numbers, in one place)."""

from __future__ import annotations

import struct

__all__ = (
    "ACK",
    "BODY",
    "CHANNEL_CLOSE",
    "DELIVER",
    "FRAME_END",
    "FRAME_HEADER",
    "FRAME_HEADER_SIZE",
    "HEADER",
    "HEARTBEAT",
    "HEARTBEAT_FRAME",
    "METHOD",
    "METHOD_ID",
    "NACK",
    "PUBLISH",
    "REJECT",
    "RETURN",
    "Unusual",
)

# Frame types.
METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8
#: Every frame: type (1 octet), channel (2), payload size (4); then the payload and FRAME_END.
FRAME_HEADER = struct.Struct(">BHI")
FRAME_HEADER_SIZE = FRAME_HEADER.size
FRAME_END = 0xCE
#: A heartbeat: type 8 on channel 0, no payload.
HEARTBEAT_FRAME = FRAME_HEADER.pack(HEARTBEAT, 0, 0) + bytes((FRAME_END,))

#: A method payload starts with its class id and method id (2 octets each).
METHOD_ID = struct.Struct(">HH")
# (class id, method id) of the methods our code writes or reads itself.
PUBLISH = (60, 40)
RETURN = (60, 50)
DELIVER = (60, 60)
ACK = (60, 80)
REJECT = (60, 90)
NACK = (60, 120)
CHANNEL_CLOSE = (20, 40)


class Unusual(Exception):
    """Input our own readers and writers leave to pamqp or aiormq, which decide what it is
    (its value, or their error); never leaves the package."""
