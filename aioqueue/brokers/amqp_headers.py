"""Header integers that every py-amqp version reads (a documented, tested patch of pamqp).

pamqp picks the smallest AMQP integer type for each int in a field table (tags b, s, u, I,
i, l) and writes floats as 32-bit f. Stock Celery workers on py-amqp <= 5.3.1 misread those
tags: 's' (int16) is taken for a short string and the worker drops its connection in a loop
(a `timelimit` of [300, 240] is enough), 'b' is read unsigned (-1 -> 255), 'f' loses
precision (reference/celery-protocol.md section 1.7). pamqp has no hook for this, so the one
function that encodes a field-table value is replaced, once, when the first AmqpBroker is
built: ints become I (int32) or l (int64), floats d (float64), exactly what py-amqp writes;
every other type goes to pamqp's own encoder. The result is valid AMQP for every reader,
RabbitMQ compares integer arguments by value whatever their width, and pamqp's nested
tables and arrays call this function by its module name, so they are covered too.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pamqp.encode

__all__ = ("use_pyamqp_compatible_field_tables",)

_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")
_FLOAT64 = struct.Struct(">d")
_pamqp_encode_table_value: Callable[[Any], bytes] | None = None


def _encode_table_value(value: Any) -> bytes:
    if isinstance(value, int) and not isinstance(value, bool):
        if -0x8000_0000 <= value <= 0x7FFF_FFFF:
            return b"I" + _INT32.pack(value)
        if -0x8000_0000_0000_0000 <= value <= 0x7FFF_FFFF_FFFF_FFFF:
            return b"l" + _INT64.pack(value)
        raise TypeError(f"integer {value} does not fit in an AMQP field table (64 bits)")
    if isinstance(value, float):
        return b"d" + _FLOAT64.pack(value)
    assert _pamqp_encode_table_value is not None
    return _pamqp_encode_table_value(value)


def use_pyamqp_compatible_field_tables() -> None:
    """Make pamqp write header ints as I/l and floats as d (see above); idempotent."""
    global _pamqp_encode_table_value
    current = pamqp.encode.encode_table_value
    if current is not _encode_table_value:
        _pamqp_encode_table_value = current
        setattr(pamqp.encode, "encode_table_value", _encode_table_value)  # noqa: B010
