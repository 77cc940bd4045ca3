"""AMQP field tables: header integers every py-amqp version reads, fast encode and decode.

Both directions are documented, tested patches of pamqp, installed by explicit calls.

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

``decode_field_table`` is the reading side: pamqp's decoder copies the rest of the buffer
for every field (about 15 us for a 20-field Celery header table), this one walks the bytes
with an offset (about 6.5 us). It reads every fixed-size tag and S, V, t, F, A, and
returns what pamqp returns, types included (bool for t, bytes for a long string that is not
utf-8). Any other tag (D, T, x), a value or key running past the end of its table or array (pamqp
would read on into the bytes that follow), deep nesting or any error sends the whole table
to pamqp's own ``field_table``, so unusual or malformed tables get pamqp's values and its
errors. ``use_fast_field_table_decoding`` installs it everywhere pamqp looks a table
decoder up: the module attribute, ``METHODS['table']`` and ``TABLE_MAPPING[b'F']``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pamqp.decode
import pamqp.encode

__all__ = (
    "decode_field_table",
    "encode_field_table",
    "use_fast_field_table_decoding",
    "use_pyamqp_compatible_field_tables",
)

_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")
_FLOAT64 = struct.Struct(">d")
_UINT32 = struct.Struct(">I")
_EMPTY_TABLE = b"\x00\x00\x00\x00"
# Field tables' key layouts by their key tuple (see _layout); bounded.
_LAYOUTS: dict[tuple[str, ...], list[tuple[str, bytes]]] = {}
_LAYOUTS_MAX = 256
_pamqp_encode_table_value: Callable[[Any], bytes] | None = None
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
_pamqp_decode_table: Callable[[bytes], tuple[int, Any]] | None = None


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
    """A value the fast encoder or decoder leaves to pamqp (which gives the result or the
    error)."""


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


def use_fast_field_table_decoding() -> None:
    """Make pamqp read field tables with ``decode_field_table`` (see above); idempotent."""
    global _pamqp_decode_table
    current = pamqp.decode.field_table
    if current is not decode_field_table:
        _pamqp_decode_table = current
        setattr(pamqp.decode, "field_table", decode_field_table)  # noqa: B010
    # Properties and method frames find it through METHODS, nested 'F' values through
    # TABLE_MAPPING: both hold the function itself, not its module name.
    pamqp.decode.METHODS["table"] = decode_field_table
    pamqp.decode.TABLE_MAPPING[b"F"] = decode_field_table


def decode_field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    """pamqp's ``field_table``: (4 + the table's length, the table), read in place."""
    if type(value) is bytes:  # pamqp slices a bytearray into bytearrays: leave those to it
        try:
            consumed, table = _read_table(value, 0, 0)
            if consumed <= len(value):  # past the buffer's end pamqp raises, whatever it read
                return consumed, table
        except Exception:  # unusual or malformed: pamqp gives the value or raises its error
            pass
    original = _pamqp_decode_table
    if original is None:  # not installed: the module's function is still pamqp's
        original = pamqp.decode.field_table
    consumed, table = original(value)
    return consumed, table


# The readers check bounds once per table or array, at its end: offsets only grow and every
# value's bytes lie between its start and the next offset, so a container whose last value
# ends exactly at its end, inside the buffer, was read from its own bytes only, as pamqp
# reads it. Any other ending (pamqp would read on into the bytes that follow) goes to pamqp.


def _read_table(data: bytes, offset: int, depth: int) -> tuple[int, dict[str, Any]]:
    """The table at offset: (its end, the table)."""
    if depth > _MAX_DEPTH:
        raise _Unusual
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
        raise _Unusual
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
            raise _Unusual
        return end, items
    raise _Unusual
