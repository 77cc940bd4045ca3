"""The frames a consumer receives per message, read at fixed offsets: ``Basic.Deliver`` and
the content header, for the deliveries our frame reader hands over itself
(:mod:`aioqueue.brokers.amqp.stream`).

pamqp decodes a method frame with the generic ``Frame.unmarshal``: for every field it looks
the type name up, calls ``decode.by_type`` and copies the rest of the buffer; content
header properties go the same way. A worker receives a ``Basic.Deliver`` and a content
header for every message, so that walk costs more than everything else done with them.
``read_deliver`` and ``read_content_header`` build pamqp's own objects (``Basic.Deliver``,
``ContentHeader`` with ``Basic.Properties``), attribute for attribute what pamqp's unmarshal
gives, types included: delivery tags as pamqp's signed long-long (2**64 - 1 reads -1), bits
as bool (the other bits of the octet ignored, as pamqp does), short strings as str,
``timestamp`` as pamqp's aware UTC datetime (milliseconds when above 2**32 - 1, as pamqp
guesses), properties absent from the flags left as the constructor set them, bytes after
the last field ignored, no ``validate()`` (pamqp's unmarshal runs none); the header table
through :func:`aioqueue.brokers.amqp.field_tables.decode_field_table`.

They return None for anything unusual: a field cut short or running past the end, a short
string that is not utf-8, a second flags word or the reserved flag bit, a timestamp datetime
cannot hold, any error, or a pamqp whose classes lack the fields these readers were written
for (``LAYOUT_MATCHES``, checked by a test on the pinned pamqp). The stream then leaves the
delivery to aiormq, which decodes it with pamqp as always.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

from pamqp import commands as spec
from pamqp.header import ContentHeader

from .constants import Unusual
from .field_tables import decode_field_table

__all__ = ("LAYOUT_MATCHES", "read_content_header", "read_deliver")

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

# The fields (name, pamqp type) ``read_deliver`` was written for.
_DELIVER_FIELDS = [
    ("consumer_tag", "shortstr"), ("delivery_tag", "longlong"), ("redelivered", "bit"),
    ("exchange", "shortstr"), ("routing_key", "shortstr"),
]
#: Whether the installed pamqp's classes have the layout these readers were written for.
LAYOUT_MATCHES = _PROPERTIES is not None and [
    (name, spec.Basic.Deliver.amqp_type(name)) for name in spec.Basic.Deliver.__slots__
] == _DELIVER_FIELDS


def read_deliver(data: bytes) -> spec.Basic.Deliver | None:
    """A ``Basic.Deliver`` from its arguments (the method payload after class and method
    ids): consumer_tag (shortstr), delivery_tag (longlong), redelivered (bit), exchange and
    routing_key (shortstr); None if unusual."""
    try:
        end = 1 + data[0]
        consumer_tag = data[1:end].decode()
        delivery_tag, bits, size = _TAG_BITS_SIZE.unpack_from(data, end)
        start = end + 10
        end = start + size
        exchange = data[start:end].decode()
        start = end + 1
        end = start + data[end]
        if end > len(data):  # the earlier fields end where a later read succeeded
            return None
        routing_key = data[start:end].decode()
    except Exception:  # malformed: aiormq's path gives pamqp's value or error
        return None
    deliver = spec.Basic.Deliver()
    deliver.consumer_tag = consumer_tag
    deliver.delivery_tag = delivery_tag
    deliver.redelivered = (bits & 1) != 0
    deliver.exchange = exchange
    deliver.routing_key = routing_key
    return deliver


def read_content_header(data: bytes) -> ContentHeader | None:
    """A content header from its frame payload: class_id, weight, body_size, then the
    properties the flags word selects; None if unusual."""
    try:
        class_id, weight, body_size, flags = _HEADER_START.unpack_from(data)
        values = _read_properties(data, flags)
    except Exception:  # unusual or malformed: aiormq's path gives pamqp's value or error
        return None
    header = ContentHeader(weight, body_size)
    header.class_id = class_id
    properties = header.properties
    for name, value in values:
        setattr(properties, name, value)
    return header


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
        raise Unusual
    return values


def _plan(flags: int) -> tuple[tuple[str, int], ...]:
    """The properties a flags word selects; unusual words (bit 0: another flags word
    follows; bit 1: no property) raise."""
    if flags & 0b11 or _PROPERTIES is None:
        raise Unusual
    plan = tuple((name, kind) for flag, name, kind in _PROPERTIES if flags & flag)
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[flags] = plan
    return plan
