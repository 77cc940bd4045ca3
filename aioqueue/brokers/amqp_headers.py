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

``encode_field_table`` writes the same bytes as patched pamqp for the types task headers
hold (str, None, bool, int, float, dict, list) about four times faster; the publisher
(:mod:`aioqueue.brokers.amqp_frames`) uses it for every message. Anything else (other types,
non-str keys, keys pamqp would truncate, values out of range) goes to pamqp's own
``field_table`` for the whole table, so unusual tables get pamqp's bytes and its errors.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pamqp.encode

__all__ = ("encode_field_table", "use_pyamqp_compatible_field_tables")

_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")
_FLOAT64 = struct.Struct(">d")
_UINT32 = struct.Struct(">I")
_EMPTY_TABLE = b"\x00\x00\x00\x00"
# Field tables' key layouts by their key tuple (see _layout); bounded.
_LAYOUTS: dict[tuple[str, ...], list[tuple[str, bytes]]] = {}
_LAYOUTS_MAX = 256
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


class _Unusual(Exception):
    """A value the fast encoder leaves to pamqp (which gives the bytes or the error)."""


def encode_field_table(table: dict[str, Any] | None) -> bytes:
    """An AMQP field table, byte for byte what pamqp (with the patch above) writes."""
    if not table:
        return _EMPTY_TABLE
    try:
        return _table(table)
    except _Unusual:
        use_pyamqp_compatible_field_tables()
        return pamqp.encode.field_table(table)


def _table(table: dict[str, Any]) -> bytes:
    if type(table) is not dict:
        raise _Unusual
    if not table:
        return _EMPTY_TABLE
    names = tuple(table)
    layout = _LAYOUTS.get(names)
    if layout is None:
        layout = _layout(names)
    parts: list[bytes] = []
    append = parts.append
    for key, encoded_key in layout:
        append(encoded_key)
        value = table[key]
        # The common header values inline; the rest through _value.
        if value is None:
            append(b"V")
        elif type(value) is str and value.isascii():
            append(b"S" + _UINT32.pack(len(value)) + value.encode())
        else:
            append(_value(value))
    data = b"".join(parts)
    return _UINT32.pack(len(data)) + data


def _layout(names: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """The keys in pamqp's (sorted) order, each with its encoded short string; cached, as
    messages of one client carry the same header names in the same order."""
    if any(type(name) is not str for name in names):
        raise _Unusual
    layout = []
    for name in sorted(names):
        try:
            encoded = name.encode()
        except UnicodeEncodeError:
            raise _Unusual from None
        if len(encoded) > 128:  # pamqp truncates (and warns)
            raise _Unusual
        layout.append((name, bytes((len(encoded),)) + encoded))
    if len(_LAYOUTS) >= _LAYOUTS_MAX:
        _LAYOUTS.clear()
    _LAYOUTS[names] = layout
    return layout


def _value(value: Any) -> bytes:
    kind = type(value)
    if kind is str:
        try:
            data: bytes = value.encode()
        except UnicodeEncodeError:
            raise _Unusual from None
        if len(data) > 0xFFFF_FFFF:
            raise _Unusual
        return b"S" + _UINT32.pack(len(data)) + data
    if value is None:
        return b"V"
    if kind is bool:
        return b"t\x01" if value else b"t\x00"
    if kind is int:
        if -0x8000_0000 <= value <= 0x7FFF_FFFF:
            return b"I" + _INT32.pack(value)
        if -0x8000_0000_0000_0000 <= value <= 0x7FFF_FFFF_FFFF_FFFF:
            return b"l" + _INT64.pack(value)
        raise _Unusual
    if kind is float:
        return b"d" + _FLOAT64.pack(value)
    if kind is dict:
        return b"F" + _table(value)
    if kind is list:
        data = b"".join([_value(item) for item in value])
        return b"A" + _UINT32.pack(len(data)) + data
    raise _Unusual
