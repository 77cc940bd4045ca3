"""AMQP field tables as aioqueue writes and reads them; nothing here changes pamqp.

**Writing.** pamqp picks the smallest AMQP integer type for each int in a field table (tags
b, s, u, I, i, l) and writes floats as 32-bit f. Stock Celery workers on py-amqp <= 5.3.1
misread those tags: 's' (int16) is taken for a short string and the worker drops its
connection in a loop (a ``timelimit`` of [300, 240] is enough), 'b' is read unsigned (-1 ->
255), 'f' loses precision (reference/celery-protocol.md section 1.7). So every table
aioqueue publishes is written here, never by pamqp's ``field_table``: ints as I (int32) or
l (int64), floats as d (float64), exactly what py-amqp writes, every other type as pamqp
would write it (pamqp's public value encoders for D, T, x and short strings). The result is
valid AMQP for every reader, and RabbitMQ compares integer arguments by value whatever their
width. ``encode_field_table`` has an inline path for what task headers hold (str keys and
str, None, bool, int, float, dict, list values) and a general one for everything else,
which raises pamqp's ``TypeError`` for a type AMQP cannot carry. The frames module puts the
bytes into our own publish frames, and ``HeaderProperties`` into aiormq's ``basic_publish``
when the fast paths are off.

**Reading.** ``decode_field_table`` is used on deliveries our own frame reader hands over
(:mod:`aioqueue.brokers.amqp.stream`): pamqp's decoder copies the rest of the buffer for
every field (about 15 us for a 20-field Celery header table), this one walks the bytes with
an offset (about 6.5 us). It reads every fixed-size tag and S, V, t, F, A, and returns what
pamqp returns, types included (bool for t, bytes for a long string that is not utf-8). Any
other tag (D, T, x), a value or key running past the end of its table or array, deep
nesting or any error sends the whole table to pamqp's public ``decode.field_table``, so
unusual or malformed tables get pamqp's values and its errors. Frames that take aiormq's
path are decoded by pamqp, unchanged.
"""

from __future__ import annotations

import datetime
import decimal
import struct
import time
from typing import Any

import pamqp.decode
import pamqp.encode
from pamqp import commands as spec

from .constants import Unusual

__all__ = (
    "HeaderProperties",
    "decode_field_table",
    "encode_field_table",
)

_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")
_FLOAT64 = struct.Struct(">d")
_UINT32 = struct.Struct(">I")
_EMPTY_TABLE = b"\x00\x00\x00\x00"
# Field tables' key layouts by their key tuple (see _layout); bounded.
_LAYOUTS: dict[tuple[str, ...], list[tuple[str, bytes]]] = {}
_LAYOUTS_MAX = 256
# The fixed-size values the decoder reads (by tag): I, l, d.
# Fixed-size tags: pamqp's formats (I and b s signed, B u i unsigned; L read as signed too).
_FIXED = {
    0x49: _INT32, 0x6C: _INT64, 0x64: _FLOAT64,  # I l d: what Celery and we write
    0x62: struct.Struct(">b"), 0x42: struct.Struct(">B"), 0x73: struct.Struct(">h"),
    0x75: struct.Struct(">H"), 0x69: struct.Struct(">L"), 0x4C: _INT64,
    0x66: struct.Struct(">f"),  # b B s u i L f: what pamqp (aio-pika) writes
}
# Nesting the fast decoder reads; deeper tables go to pamqp, whose recursion decides.
_MAX_DEPTH = 32


def encode_field_table(table: dict[str, Any] | None) -> bytes:
    """An AMQP field table: ints as I/l, floats as d, the rest as pamqp writes it."""
    if not table:
        return _EMPTY_TABLE
    try:
        return _table(table)
    except Unusual:
        return _general_table(table)


def _table(table: dict[str, Any]) -> bytes:
    if type(table) is not dict:
        raise Unusual
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
        raise Unusual
    layout = []
    for name in sorted(names):
        try:
            encoded = name.encode()
        except UnicodeEncodeError:
            raise Unusual from None
        if len(encoded) > 128:  # pamqp truncates (and warns)
            raise Unusual
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
            raise Unusual from None
        if len(data) > 0xFFFF_FFFF:
            raise Unusual
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
        raise Unusual
    if kind is float:
        return b"d" + _FLOAT64.pack(value)
    if kind is dict:
        return b"F" + _table(value)
    if kind is list:
        data = b"".join([_value(item) for item in value])
        return b"A" + _UINT32.pack(len(data)) + data
    raise Unusual


def _general_table(table: Any) -> bytes:
    """Any table pamqp's ``field_table`` takes, laid out as it lays it out (sorted keys,
    keys over 128 bytes cut), with ints and floats as ``_general_value`` writes them."""
    if not table:
        return _EMPTY_TABLE
    if not isinstance(table, dict):
        raise TypeError(f"dict required, received {type(table)}")
    parts: list[bytes] = []
    for key, value in sorted(table.items()):
        encoded = key.encode()
        if len(encoded) > 128:  # AMQP's limit for a field name; pamqp cuts it too
            key = encoded[:128].decode("utf-8", "ignore")
        parts.append(pamqp.encode.short_string(key))
        parts.append(_general_value(value))
    data = b"".join(parts)
    return _UINT32.pack(len(data)) + data


def _general_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"t\x01" if value else b"t\x00"
    if isinstance(value, int):
        if -0x8000_0000 <= value <= 0x7FFF_FFFF:
            return b"I" + _INT32.pack(value)
        if -0x8000_0000_0000_0000 <= value <= 0x7FFF_FFFF_FFFF_FFFF:
            return b"l" + _INT64.pack(value)
        raise TypeError(f"integer {value} does not fit in an AMQP field table (64 bits)")
    if isinstance(value, decimal.Decimal):
        return b"D" + pamqp.encode.decimal(value)
    if isinstance(value, float):
        return b"d" + _FLOAT64.pack(value)
    if isinstance(value, str):
        return b"S" + pamqp.encode.long_string(value)
    if isinstance(value, (datetime.datetime, time.struct_time)):
        return b"T" + pamqp.encode.timestamp(value)
    if isinstance(value, dict):
        return b"F" + _general_table(value)
    if isinstance(value, list):
        data = b"".join([_general_value(item) for item in value])
        return b"A" + _UINT32.pack(len(data)) + data
    if isinstance(value, bytearray):
        return b"x" + pamqp.encode.byte_array(value)
    if value is None:
        return b"V"
    raise TypeError(f"Unknown type: {type(value)} ({value!r})")


class HeaderProperties(spec.Basic.Properties):
    """pamqp's message properties, but the headers table written by ``encode_field_table``:
    for aiormq's public ``basic_publish`` (the fast paths off), on our messages only. No
    ``__slots__`` of its own: pamqp walks ``self.__slots__`` to find the properties, which
    must stay its class's."""

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers":
            return encode_field_table(value)
        return super().encode_property(name, value)


_pamqp_table = pamqp.decode.field_table  # pamqp's decoder, for what ours leaves to it


def decode_field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    """pamqp's ``field_table``: (4 + the table's length, the table), read in place."""
    if type(value) is bytes:  # pamqp slices a bytearray into bytearrays: leave those to it
        try:
            consumed, table = _read_table(value, 0, 0)
            if consumed <= len(value):  # past the buffer's end pamqp raises, whatever it read
                return consumed, table
        except Exception:  # unusual or malformed: pamqp gives the value or raises its error
            pass
    consumed, table = _pamqp_table(value)
    return consumed, table


# The readers check bounds once per table or array, at its end: offsets only grow and every
# value's bytes lie between its start and the next offset, so a container whose last value
# ends exactly at its end, inside the buffer, was read from its own bytes only, as pamqp
# reads it. Any other ending (pamqp would read on into the bytes that follow) goes to pamqp.


def _read_table(data: bytes, offset: int, depth: int) -> tuple[int, dict[str, Any]]:
    """The table at offset: (its end, the table)."""
    if depth > _MAX_DEPTH:
        raise Unusual
    end = offset + 4 + _UINT32.unpack_from(data, offset)[0]
    offset += 4
    table: dict[str, Any] = {}
    while offset < end:
        start = offset + 1
        offset = start + data[offset]
        key = data[start:offset].decode()
        # The usual header values inline (S and V most of all), the rest through _read_value.
        tag = data[offset]
        if tag == 0x53:  # S
            start = offset + 5
            offset = start + _UINT32.unpack_from(data, offset + 1)[0]
            try:
                table[key] = data[start:offset].decode()
            except UnicodeDecodeError:
                table[key] = data[start:offset]
        elif tag == 0x56:  # V
            table[key] = None
            offset += 1
        elif tag == 0x49:  # I
            table[key] = _INT32.unpack_from(data, offset + 1)[0]
            offset += 5
        elif tag == 0x74:  # t: pamqp gives bool(octet)
            table[key] = data[offset + 1] != 0
            offset += 2
        else:
            offset, table[key] = _read_value(data, offset, depth)
    if offset != end:
        raise Unusual
    return end, table


def _read_value(data: bytes, offset: int, depth: int) -> tuple[int, Any]:
    """The tagged value at offset: (its end, the value)."""
    tag = data[offset]
    offset += 1
    fixed = _FIXED.get(tag)
    if fixed is not None:
        return offset + fixed.size, fixed.unpack_from(data, offset)[0]
    if tag == 0x53:  # S
        start = offset + 4
        end = start + _UINT32.unpack_from(data, offset)[0]
        try:
            return end, data[start:end].decode()
        except UnicodeDecodeError:
            return end, data[start:end]
    if tag == 0x56:  # V
        return offset, None
    if tag == 0x74:  # t
        return offset + 1, data[offset] != 0
    if tag == 0x46:  # F
        return _read_table(data, offset, depth + 1)
    if tag == 0x41 and depth < _MAX_DEPTH:  # A
        end = offset + 4 + _UINT32.unpack_from(data, offset)[0]
        offset += 4
        items = []
        while offset < end:
            offset, item = _read_value(data, offset, depth + 1)
            items.append(item)
        if offset != end:
            raise Unusual
        return end, items
    raise Unusual
