"""``decoding``'s readers build exactly the objects pamqp builds.

Each payload is read by our reader (``read_deliver``, ``read_content_header``; where it
returns None, the frame stream leaves the frame to aiormq, so pamqp's ``unmarshal`` reads
it) and by pamqp's own ``unmarshal`` into a fresh object built as ``pamqp.frame`` builds
it, and the outcomes must match: every attribute with its type, or the same exception type
and message. Frames: ``Basic.Deliver`` and content headers of every captured message (as
pamqp, the capture's producer and ``encode_publish`` write them), thousands of random ones
with edge values and every property subset, every truncation and corrupted byte of real
frames, other buffer types; and pamqp's own frame decoding is unchanged by a broker.
"""

from __future__ import annotations

import json
import random
import re
import struct
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pamqp.decode
import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.brokers.amqp.decoding import LAYOUT_MATCHES, read_content_header, read_deliver
from aioqueue.brokers.amqp.field_tables import decode_field_table, encode_field_table
from aioqueue.brokers.amqp.frames import encode_publish
from aioqueue.config import Settings

from .test_field_table_decoding import (
    VECTORS,
    assert_same,
    captured_messages,
    random_headers,
    wire_table,
)
from .test_protocol_vectors import envelope_of

Unmarshal = Callable[[Any, bytes], None]
CLASSES: tuple[type[Any], ...] = (spec.Basic.Deliver, ContentHeader)
PAMQP: dict[type[Any], Unmarshal] = {cls: cls.unmarshal for cls in CLASSES}
PROPERTY_FLAGS = spec.Basic.Properties.flags
_handed: list[type[Any]] = []


def _ours(cls: type[Any]) -> Unmarshal:
    """Our reader as an ``unmarshal``: its object's values copied into ``self``; where it
    returns None (or the data is not bytes, which the stream never hands it), pamqp's."""
    read: Callable[[bytes], Any] = read_deliver if cls is spec.Basic.Deliver else (
        read_content_header)

    def unmarshal(self: Any, data: Any) -> None:
        obj = read(data) if type(data) is bytes else None
        if obj is None:
            _handed.append(cls)
            PAMQP[cls](self, data)
        elif cls is ContentHeader:
            self.class_id, self.weight = obj.class_id, obj.weight
            self.body_size, self.properties = obj.body_size, obj.properties
        else:
            for name in cls.__slots__:
                setattr(self, name, getattr(obj, name))

    return unmarshal


FAST: dict[type[Any], Unmarshal] = {cls: _ours(cls) for cls in CLASSES}


@pytest.fixture(autouse=True)
def fallbacks() -> list[type[Any]]:
    """The classes whose payloads our readers left to pamqp."""
    _handed.clear()
    return _handed


def fields(obj: Any) -> dict[str, Any]:
    """Every attribute pamqp sets, datetimes with their tzinfo."""
    if isinstance(obj, ContentHeader):
        properties = obj.properties
        values = {
            "class_id": obj.class_id, "weight": obj.weight, "body_size": obj.body_size,
            "properties": type(properties),
            **{name: getattr(properties, name) for name in properties.__slots__},
            "__dict__": dict(vars(properties)),
        }
    else:
        values = {name: getattr(obj, name) for name in obj.__slots__}
        values["__dict__"] = dict(getattr(obj, "__dict__", {}))
    return {
        key: (value, value.tzinfo, value.isoformat()) if isinstance(value, datetime) else value
        for key, value in values.items()
    }


def outcome(unmarshal: Unmarshal, cls: type[Any], data: Any) -> tuple[Any, ...]:
    obj = cls()  # as pamqp.frame builds it: INDEX_MAPPING[index]() or ContentHeader()
    try:
        unmarshal(obj, data)
    except Exception as exc:  # compared by type and message
        return ("raised", type(exc), str(exc))
    return ("returned", fields(obj))


def check(cls: type[Any], data: Any) -> tuple[Any, ...]:
    """Ours and pamqp's outcome on the payload are the same; pamqp's."""
    theirs = outcome(PAMQP[cls], cls, data)
    assert_same(outcome(FAST[cls], cls, data), theirs)
    return theirs


def short(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return bytes((len(raw),)) + raw


def deliver_payload(
    consumer_tag: str | bytes, tag: int, bits: int, exchange: str | bytes,
    routing_key: str | bytes,
) -> bytes:
    return (
        short(consumer_tag) + struct.pack(">QB", tag, bits) + short(exchange) + short(routing_key)
    )


def header_payload(flags: int, values: list[bytes], body_size: int = 81) -> bytes:
    return struct.pack(">HHQH", 60, 0, body_size, flags) + b"".join(values)


def payload_of(frame: bytes) -> tuple[int, bytes]:
    """(frame type, what pamqp.frame hands to unmarshal: method index stripped)."""
    kind, _, size = struct.unpack_from(">BHI", frame)
    payload = frame[7:7 + size]
    return kind, payload[4:] if kind == 1 else payload


def split_frames(data: bytes) -> list[bytes]:
    frames = []
    while data:
        size = struct.unpack_from(">I", data, 3)[0]
        frames.append(data[:size + 8])
        data = data[size + 8:]
    return frames


# --------------------------------------------------------------------------------------------
# Captured messages
# --------------------------------------------------------------------------------------------


def message_frames(message: dict[str, Any], delivery_tag: int) -> list[bytes]:
    """The Deliver and content header frames a worker would receive for the message."""
    deliver = spec.Basic.Deliver(
        consumer_tag="amq.ctag-3GW5gk_ed1pNV8PgdzuqLg", delivery_tag=delivery_tag,
        redelivered=message["redelivered"], exchange=message["exchange"],
        routing_key=message["routing_key"],
    )
    headers = message["headers"]
    props = message["properties"]
    body_size = message.get("body_size", 123)
    properties = spec.Basic.Properties(headers=headers, **props)
    every = spec.Basic.Properties(**{
        **props, "headers": headers, "message_id": "m-1", "message_type": "task",
        "timestamp": datetime(2030, 1, 2, tzinfo=UTC), "user_id": "guest", "app_id": "celery",
    })
    frames = [
        pamqp.frame.marshal(deliver, 1),
        pamqp.frame.marshal(ContentHeader(0, body_size, properties), 1),
        pamqp.frame.marshal(ContentHeader(0, body_size, every), 1),
    ]
    if "header_wire_types" in message:  # the table as the capture's producer wrote it
        payload = header_payload(0x2000, [wire_table(headers, message["header_wire_types"])])
        frames.append(struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce")
    if "content_type" in props and "content_encoding" in props:  # our publisher's frames
        published = encode_publish(
            1, message["exchange"], message["routing_key"], envelope_of(message), 131064,
        )
        frames.append(split_frames(published)[1])
    return frames


@pytest.mark.parametrize("message", list(captured_messages()))
def test_captured_messages(message: dict[str, Any], fallbacks: list[type[Any]]) -> None:
    for frame in message_frames(message, delivery_tag=7):
        kind, payload = payload_of(frame)
        cls = ContentHeader if kind == 2 else spec.Basic.Deliver
        result = check(cls, payload)
        assert result[0] == "returned"
        check(cls, payload + b"\x05extra")  # bytes after the last field: ignored
    assert not fallbacks


# --------------------------------------------------------------------------------------------
# Random frames
# --------------------------------------------------------------------------------------------

_SHORT = [
    "", "celery", "amq.ctag-3GW5gk_ed1pNV8PgdzuqLg", "celery.pidbox", "x" * 255,
    "é" * 127 + "a", "日本語", "emoji 🎉", "a b:c/d@e#f",
]
_TAGS = [0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]


def random_short(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return "".join(rng.choice("abc-_.é日") for _ in range(rng.randint(0, 60)))
    return rng.choice(_SHORT)


def test_random_deliver(fallbacks: list[type[Any]]) -> None:
    rng = random.Random(20240612)
    for i in range(3000):
        bits = i % 256  # every octet: the redelivered bit and the reserved ones
        tag = rng.choice([*_TAGS, rng.getrandbits(64)])
        payload = deliver_payload(
            random_short(rng), tag, bits, random_short(rng), random_short(rng)
        )
        result = check(spec.Basic.Deliver, payload)
        assert result[1]["delivery_tag"] == struct.unpack(">q", struct.pack(">Q", tag))[0]
        assert result[1]["redelivered"] is bool(bits & 1)
        check(spec.Basic.Deliver, payload + rng.randbytes(rng.randint(1, 9)))
    assert not fallbacks


def test_shortstr_not_utf8(fallbacks: list[type[Any]]) -> None:
    for field in range(3):
        parts: list[str | bytes] = ["ctag", "", "celery"]
        parts[field] = b"\xc3\x28"
        payload = deliver_payload(parts[0], 1, 0, parts[1], parts[2])
        assert check(spec.Basic.Deliver, payload)[0] == "raised"
    flags = PROPERTY_FLAGS["content_type"] | PROPERTY_FLAGS["app_id"]
    payload = header_payload(flags, [short("application/json"), short(b"\xff")])
    assert check(ContentHeader, payload)[0] == "raised"
    assert fallbacks == [spec.Basic.Deliver] * 3 + [ContentHeader]


def random_property(rng: random.Random, kind: str) -> bytes:
    if kind == "shortstr":
        return short(random_short(rng))
    if kind == "octet":
        return bytes((rng.choice([0, 1, 2, 9, 255, rng.randrange(256)]),))
    if kind == "table":
        return encode_field_table(random_headers(rng) if rng.random() < 0.9 else {})
    stamp = rng.choice([
        0, 1, 2**32 - 1, 2**32, 1_700_000_000, 1_700_000_000_123, 2**41 + 1,
        253_402_300_799_999, rng.getrandbits(32), rng.randrange(2**32, 253_402_300_799_999),
    ])
    return struct.pack(">Q", stamp)


def test_every_property_subset(fallbacks: list[type[Any]]) -> None:
    rng = random.Random(5)
    names = spec.Basic.Properties.__slots__
    assert len(names) == 14
    for subset in range(2**14):
        selected = [name for i, name in enumerate(names) if subset >> i & 1]
        flags = sum(PROPERTY_FLAGS[name] for name in selected)
        values = [
            random_property(rng, spec.Basic.Properties.amqp_type(name)) for name in selected
        ]
        payload = header_payload(flags, values, body_size=rng.choice([0, 1, 2**64 - 1]))
        result = check(ContentHeader, payload)
        assert result[0] == "returned"
        if subset % 7 == 0:
            check(ContentHeader, payload + b"\x01\x02")
    assert not fallbacks


@pytest.mark.parametrize(
    "stamp", [2**63, 2**64 - 1, 253_402_300_800_000, 2**53 + 1, 2**32 + 5, 2**32 - 1]
)
def test_timestamps(stamp: int) -> None:
    """Beyond what a datetime holds pamqp raises (not an UnmarshalingException, as it is no
    ValueError); the fast reader hands those to pamqp."""
    payload = header_payload(PROPERTY_FLAGS["timestamp"], [struct.pack(">Q", stamp)])
    check(ContentHeader, payload)


# --------------------------------------------------------------------------------------------
# Malformed and unusual payloads
# --------------------------------------------------------------------------------------------


def real_payloads() -> list[tuple[type[Any], bytes]]:
    """A Deliver and a content header with every property and Celery's captured header
    table, as received."""
    message = json.loads((VECTORS / "amqp_v2_stamped.json").read_text(encoding="utf-8"))
    message = message["messages"][0]
    values = [
        short("application/json"), short("utf-8"),
        wire_table(message["headers"], message["header_wire_types"]), b"\x02", b"\x00",
        short("550b764c-f181-42b2-8041-6445c9206819"), short("069665c0-02d2-33c2-88b6"),
        short("60000"), short("m-1"), struct.pack(">Q", 1_700_000_000), short("task"),
        short("guest"), short("celery"), short("cluster"),
    ]
    return [
        (spec.Basic.Deliver, deliver_payload("amq.ctag-x", 2**40, 1, "celery", "celery.q")),
        (ContentHeader, header_payload(0xFFFC, values)),
    ]


@pytest.mark.parametrize("cls, payload", real_payloads())
def test_truncated_at_every_byte(
    cls: type[Any], payload: bytes, fallbacks: list[type[Any]]
) -> None:
    assert check(cls, payload)[0] == "returned"
    for n in range(len(payload)):
        fallbacks.clear()
        check(cls, payload[:n])  # pamqp may return a shortened last string: it decides
        assert fallbacks == [cls], n
        # The last field cut short, and what follows read in its place.
        check(cls, payload[:n] + b"\x00" * 9)
        check(cls, payload[:n] + b"\x03abc" + payload[n:])


@pytest.mark.parametrize("cls, payload", real_payloads())
def test_corrupted_bytes(cls: type[Any], payload: bytes) -> None:
    rng = random.Random(len(payload))
    for i in range(len(payload)):
        for byte in {0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF, payload[i] ^ 1, rng.randrange(256)}:
            corrupted = payload[:i] + bytes((byte,)) + payload[i + 1:]
            check(cls, corrupted)
            check(cls, corrupted + b"\x04abcd\x00\x00\x00\x00")


def test_flag_words(fallbacks: list[type[Any]]) -> None:
    """A second flags word (bit 0) and the reserved bit 1 go to pamqp, which reads them."""
    content_type = short("text/plain")
    for payload in [
        header_payload(0x8001, [b"\x00\x00", content_type]),
        header_payload(0x8001, [b"\x80\x01\x00\x00", content_type]),
        header_payload(0x8002, [content_type]),
        header_payload(0x0001, []),
    ]:
        check(ContentHeader, payload)
    assert fallbacks == [ContentHeader] * 4


def test_other_buffer_types(fallbacks: list[type[Any]]) -> None:
    for cls, payload in real_payloads():
        for data in (bytearray(payload), memoryview(payload)):
            check(cls, data)
    assert len(fallbacks) == 4


# --------------------------------------------------------------------------------------------
# pamqp itself, beside a broker
# --------------------------------------------------------------------------------------------


def all_frames() -> Iterator[bytes]:
    for param in captured_messages():
        (message,) = param.values
        yield from message_frames(message, delivery_tag=2**63 - 1)
    yield pamqp.frame.marshal(spec.Basic.Ack(1, True), 1)
    yield pamqp.frame.marshal(spec.Basic.Nack(2**63 - 1, True, False), 1)
    yield pamqp.frame.marshal(spec.Basic.Reject(5, True), 1)
    yield pamqp.frame.marshal(spec.Basic.Publish(exchange="", routing_key="celery"), 2)
    yield pamqp.frame.marshal(
        spec.Queue.Declare(queue="celery", durable=True, arguments={"x-max-priority": 9}), 1
    )
    yield pamqp.frame.marshal(ContentBody(b'[[], {}, {"chain": null}]'), 1)
    yield pamqp.frame.marshal(Heartbeat(), 0)
    _, header = real_payloads()[1]
    yield struct.pack(">BHI", 2, 3, len(header)) + header + b"\xce"


def frame_outcome(data: bytes) -> tuple[Any, ...]:
    try:
        size, channel, frame = pamqp.frame.unmarshal(data)
    except Exception as exc:  # pamqp's message names the object: its address left out
        return ("raised", type(exc), re.sub(r" at 0x[0-9a-f]+>", ">", str(exc)))
    if isinstance(frame, ContentHeader | spec.Basic.Deliver | spec.Basic.Ack | spec.Basic.Nack):
        values = fields(frame)
    else:
        values = {name: getattr(frame, name, None) for name in getattr(frame, "__slots__", ())}
        values["__dict__"] = dict(getattr(frame, "__dict__", {}))
    return ("returned", size, channel, type(frame), values)


def reframed(frame: bytes, payload: bytes) -> bytes:
    """The frame with another payload (method index kept), its size to match."""
    kind, channel = struct.unpack_from(">BH", frame)
    if kind == 1:
        payload = frame[7:11] + payload
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def test_a_broker_leaves_pamqps_frame_decoding_alone() -> None:
    frames = list(all_frames())
    for frame in frames[:3] + frames[-1:]:  # Deliver and content headers, cut anywhere
        _, payload = payload_of(frame)
        frames += [reframed(frame, payload[:n]) for n in range(len(payload))]
    frames += [
        pamqp.frame.marshal(spec.Basic.Ack(9), 1)[:-2] + b"\xce",  # size past the end
        reframed(pamqp.frame.marshal(spec.Basic.Ack(9), 1), b"\x00" * 8),
        reframed(pamqp.frame.marshal(spec.Basic.Nack(9), 1), b"\x00" * 8),
    ]
    before = [frame_outcome(frame) for frame in frames]
    assert sum(result[0] == "raised" for result in before) > 100

    AmqpBroker("amqp://guest:guest@127.0.0.1:5672//", Settings())  # made, not connected
    for cls in (*CLASSES, spec.Basic.Ack, spec.Basic.Nack):
        assert "unmarshal" not in cls.__dict__ or cls.__dict__["unmarshal"].__module__.startswith(
            "pamqp.")
    assert pamqp.decode.field_table is not decode_field_table
    assert pamqp.decode.METHODS["table"] is pamqp.decode.field_table
    assert pamqp.decode.TABLE_MAPPING[b"F"] is pamqp.decode.field_table

    after = [frame_outcome(frame) for frame in frames]
    for ours, theirs in zip(after, before, strict=True):
        assert_same(ours, theirs)


def test_the_readers_match_the_pinned_pamqp() -> None:
    """The frame stream hands deliveries over only where they do: on the pamqp pyproject
    pins, they must (else every delivery takes aiormq's path, slower, with a warning)."""
    assert LAYOUT_MATCHES
