"""AMQP frames received once per message, decoded fast: ``Basic.Deliver``, content headers,
``Basic.Ack`` and ``Basic.Nack``.

pamqp decodes a method frame with the generic ``Frame.unmarshal``: for every field it looks
the type name up, calls ``decode.by_type`` and copies the rest of the buffer; content
header properties go the same way. A worker receives a ``Basic.Deliver`` and a content
header for every message, a client with publisher confirms a ``Basic.Ack`` for every
publish (or one per batch), so that walk costs more than everything else done with those
frames. ``use_fast_frame_decoding`` replaces, once, the ``unmarshal`` method of those four
classes (three ``Basic`` methods and ``ContentHeader``) with readers at fixed offsets (the
header table through :func:`aioqueue.brokers.amqp_headers.decode_field_table`). pamqp
builds the objects as before (``INDEX_MAPPING[index]()``, ``ContentHeader()``) and calls
their ``unmarshal``, so ``pamqp.frame.unmarshal``, and aiormq with it, uses these readers;
every other frame and every other class is untouched.

The objects are the ones pamqp builds, attribute for attribute, types included: delivery
tags as pamqp's signed long-long (2**64 - 1 reads -1), bits as bool (the other bits of the
octet ignored, as pamqp does), short strings as str, ``timestamp`` as pamqp's aware UTC
datetime (milliseconds when above 2**32 - 1, as pamqp guesses), properties absent from the
flags left as the constructor set them, bytes after the last field ignored, no
``validate()`` (pamqp's unmarshal runs none). Only ``bytes`` whose every field lies within
the payload are read here. A bytearray or memoryview, a field cut short or running past
the end (pamqp then returns a shortened string or raises), a short string that is not
utf-8 (pamqp raises), a second flags word or the reserved flag bit, a properties object
that is not ``Basic.Properties``, a timestamp datetime cannot hold, any error: all go to
pamqp's own ``unmarshal``, saved at install, with the object untouched, so those frames get
pamqp's values and its exceptions. A class whose fields are not the ones these readers
were written for (another pamqp version) keeps pamqp's method.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pamqp import commands as spec
from pamqp.header import ContentHeader

from .amqp_headers import decode_field_table, use_fast_field_table_decoding

__all__ = ("use_fast_frame_decoding",)

Unmarshal = Callable[[Any, bytes], None]

_TAG_BITS = struct.Struct(">qB")  # delivery tag, then the octet holding the bits
_TAG_BITS_SIZE = struct.Struct(">qBB")  # Deliver: delivery tag, bits, exchange's length
_HEADER_START = struct.Struct(">HHQH")  # class id, weight, body size, first flags word
_UINT64 = struct.Struct(">Q")
_TIMESTAMP_SECONDS_MAX = 0xFFFF_FFFF  # above it pamqp takes the timestamp for milliseconds

# Property kinds the content header reader knows, by pamqp's type name.
_SHORTSTR, _OCTET, _TABLE, _TIMESTAMP = range(4)
_KINDS = {"shortstr": _SHORTSTR, "octet": _OCTET, "table": _TABLE, "timestamp": _TIMESTAMP}


def _properties_layout() -> tuple[tuple[int, str, int], ...] | None:
    """The properties as (flag, name, kind) in pamqp's order, read from its own class; None
    when one has a type the reader does not know (every content header then goes to pamqp)."""
    cls = spec.Basic.Properties
    kinds = [_KINDS.get(cls.amqp_type(name)) for name in cls.__slots__]
    if None in kinds:
        return None
    return tuple(
        (cls.flags[name], name, kind) for name, kind in zip(cls.__slots__, kinds, strict=True)
        if kind is not None
    )


_PROPERTIES = _properties_layout()
# The properties each flags word selects, as (name, kind); bounded.
_PLANS: dict[int, tuple[tuple[str, int], ...]] = {}
_PLANS_MAX = 256

# pamqp's unmarshal of each class, saved by use_fast_frame_decoding.
_PAMQP_UNMARSHAL: dict[type[Any], Unmarshal] = {}


class _Unusual(Exception):
    """A frame the fast readers leave to pamqp."""


def _pamqp_unmarshal(cls: type[Any]) -> Unmarshal:
    original = _PAMQP_UNMARSHAL.get(cls)
    if original is None:  # not installed: the class's method is still pamqp's
        original = cls.unmarshal
    return original


def _unmarshal_deliver(self: spec.Basic.Deliver, data: bytes) -> None:
    """consumer_tag (shortstr), delivery_tag (longlong), redelivered (bit), exchange and
    routing_key (shortstr)."""
    if type(data) is bytes:
        try:
            end = 1 + data[0]
            consumer_tag = data[1:end].decode()
            delivery_tag, bits, size = _TAG_BITS_SIZE.unpack_from(data, end)
            start = end + 10
            end = start + size
            exchange = data[start:end].decode()
            start = end + 1
            end = start + data[end]
            if end <= len(data):  # the earlier fields end where a later read succeeded
                routing_key = data[start:end].decode()
                self.consumer_tag = consumer_tag
                self.delivery_tag = delivery_tag
                self.redelivered = (bits & 1) != 0
                self.exchange = exchange
                self.routing_key = routing_key
                return
        except Exception:  # malformed: pamqp gives the value or raises its error
            pass
    _pamqp_unmarshal(spec.Basic.Deliver)(self, data)


def _unmarshal_ack(self: spec.Basic.Ack, data: bytes) -> None:
    """delivery_tag (longlong), multiple (bit 0)."""
    if type(data) is bytes and len(data) >= 9:
        self.delivery_tag, bits = _TAG_BITS.unpack_from(data)
        self.multiple = (bits & 1) != 0
        return
    _pamqp_unmarshal(spec.Basic.Ack)(self, data)


def _unmarshal_nack(self: spec.Basic.Nack, data: bytes) -> None:
    """delivery_tag (longlong), multiple (bit 0), requeue (bit 1)."""
    if type(data) is bytes and len(data) >= 9:
        self.delivery_tag, bits = _TAG_BITS.unpack_from(data)
        self.multiple = (bits & 1) != 0
        self.requeue = (bits & 2) != 0
        return
    _pamqp_unmarshal(spec.Basic.Nack)(self, data)


def _unmarshal_content_header(self: ContentHeader, data: bytes) -> None:
    """class_id, weight, body_size, then the properties the flags word selects."""
    if type(data) is bytes and type(self.properties) is spec.Basic.Properties:
        try:
            class_id, weight, body_size, flags = _HEADER_START.unpack_from(data)
            values = _read_properties(data, flags)
        except Exception:  # unusual or malformed: pamqp gives the value or raises its error
            pass
        else:
            self.class_id = class_id
            self.weight = weight
            self.body_size = body_size
            properties = self.properties
            for name, value in values:
                setattr(properties, name, value)
            return
    _pamqp_unmarshal(ContentHeader)(self, data)


def _read_properties(data: bytes, flags: int) -> list[tuple[str, Any]]:
    """The selected properties from offset 14 on, as (name, value) in pamqp's order."""
    plan = _PLANS.get(flags)
    if plan is None:
        plan = _plan(flags)
    values: list[tuple[str, Any]] = []
    offset = 14
    # Each read starts where the previous value ended: a value running past the buffer makes
    # the next read fail, the last one is checked at the end.
    for name, kind in plan:
        if kind == _SHORTSTR:
            end = offset + 1 + data[offset]
            values.append((name, data[offset + 1:end].decode()))
        elif kind == _TABLE:
            consumed, table = decode_field_table(data[offset:])
            end = offset + consumed
            values.append((name, table))
        elif kind == _OCTET:
            end = offset + 1
            values.append((name, data[offset]))
        else:  # timestamp: datetime raises for what it cannot hold, and pamqp then too
            end = offset + 8
            stamp: float = _UINT64.unpack_from(data, offset)[0]
            if stamp > _TIMESTAMP_SECONDS_MAX:
                stamp /= 1000.0
            values.append((name, datetime.fromtimestamp(stamp, tz=UTC)))
        offset = end
    if offset > len(data):
        raise _Unusual
    return values


def _plan(flags: int) -> tuple[tuple[str, int], ...]:
    """The properties a flags word selects; unusual words (bit 0: another flags word
    follows; bit 1: no property) raise."""
    if flags & 0b11 or _PROPERTIES is None:
        raise _Unusual
    plan = tuple((name, kind) for flag, name, kind in _PROPERTIES if flags & flag)
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[flags] = plan
    return plan


# Each class's fast reader, and the fields (name, pamqp type) it was written for.
_FAST_UNMARSHAL: dict[type[Any], tuple[Unmarshal, list[tuple[str, str]] | None]] = {
    spec.Basic.Deliver: (_unmarshal_deliver, [
        ("consumer_tag", "shortstr"), ("delivery_tag", "longlong"), ("redelivered", "bit"),
        ("exchange", "shortstr"), ("routing_key", "shortstr"),
    ]),
    spec.Basic.Ack: (_unmarshal_ack, [("delivery_tag", "longlong"), ("multiple", "bit")]),
    spec.Basic.Nack: (_unmarshal_nack, [
        ("delivery_tag", "longlong"), ("multiple", "bit"), ("requeue", "bit"),
    ]),
    ContentHeader: (_unmarshal_content_header, None),  # properties: see _PROPERTIES
}


def use_fast_frame_decoding() -> None:
    """Make pamqp read Deliver, Ack, Nack and content header frames with the readers above,
    and field tables with ``decode_field_table``; idempotent."""
    use_fast_field_table_decoding()
    for cls, (fast, fields) in _FAST_UNMARSHAL.items():
        if fields is not None and [(name, cls.amqp_type(name)) for name in cls.__slots__] != fields:
            continue  # not the layout the reader knows: pamqp's method stays
        current = cls.unmarshal
        if current is not fast:
            _PAMQP_UNMARSHAL[cls] = current
            setattr(cls, "unmarshal", fast)  # noqa: B010
