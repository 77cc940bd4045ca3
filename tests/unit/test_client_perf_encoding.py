"""The client's fast encoders give exactly what the general ones give.

* ``frames.encode_publish`` against the frames aiormq builds with pamqp (with our headers
  table: ``HeaderProperties``), byte for byte, on every captured Celery message and on
  random headers; where pamqp raises, the same error;
* ``field_tables.encode_field_table`` against ``wide_int_table``, a reference written here:
  pamqp's layout and value encoders, ints as I/l and floats as d (what py-amqp writes);
* JSON bodies written with and without the copy that wraps UUIDs;
* ``resp.parse`` on every RESP2/RESP3 reply type, split anywhere.
"""

from __future__ import annotations

import random
import string
import struct
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pamqp.encode
import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from aioqueue.brokers.amqp.field_tables import encode_field_table
from aioqueue.brokers.amqp.frames import encode_publish, pamqp_properties, random_message_id
from aioqueue.protocol import Envelope, encode_task
from aioqueue.results.resp import Push, ReplyError, parse
from aioqueue.serialization import _DUMP_OPTIONS, _json_default, _wrap_uuids, dumps

from .test_protocol_vectors import captured_task_messages, envelope_of

FRAME_MAX = 131072
MAX_BODY = FRAME_MAX - 8  # aiormq's max_content_size


def aiormq_frames(
    channel: int, exchange: str, routing_key: str, envelope: Envelope, message_id: str,
    max_body: int = MAX_BODY,
) -> bytes:
    """What ``AmqpBroker.publish`` sends through aiormq's ``basic_publish`` (fast paths off)."""
    properties = pamqp_properties(envelope, message_id)  # as the broker hands them to aiormq
    if len(routing_key) > 255:
        raise ValueError("Routing key too long (max 255 bytes)")
    publish = spec.Basic.Publish(exchange=exchange, routing_key=routing_key)
    header = ContentHeader(properties=properties, body_size=len(envelope.body))
    body = envelope.body  # split as aiormq splits it: max_body bytes a frame, none if empty
    bodies = [ContentBody(body[i:i + max_body]) for i in range(0, len(body), max_body)]
    return ChannelFrame.marshall(channel, [publish, header, *bodies]).payload


def wide_int_table(table: Any) -> bytes:
    """The reference for our tables: pamqp's ``field_table`` as it lays a table out, every
    value through pamqp's public ``encode_table_value`` but ints (I, else l) and floats (d)."""
    if not table:
        return b"\x00\x00\x00\x00"
    if not isinstance(table, dict):
        raise TypeError(f"dict required, received {type(table)}")
    data = b"".join(
        pamqp.encode.short_string(key.encode()[:128].decode("utf-8", "ignore"))
        + wide_int_value(value)
        for key, value in sorted(table.items())
    )
    return struct.pack(">I", len(data)) + data


def wide_int_value(value: Any) -> bytes:
    if isinstance(value, int) and not isinstance(value, bool):
        if -(2**31) <= value < 2**31:
            return b"I" + struct.pack(">i", value)
        if -(2**63) <= value < 2**63:
            return b"l" + struct.pack(">q", value)
        raise TypeError(f"integer {value} does not fit in an AMQP field table (64 bits)")
    if isinstance(value, float):
        return b"d" + struct.pack(">d", value)
    if isinstance(value, dict):
        return b"F" + wide_int_table(value)
    if isinstance(value, list):
        data = b"".join(wide_int_value(item) for item in value)
        return b"A" + struct.pack(">I", len(data)) + data
    return pamqp.encode.encode_table_value(value)


def outcome(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:  # compared by type and message
        return (type(exc), str(exc))


def assert_same_publish(
    envelope: Envelope, exchange: str = "", routing_key: str = "celery", channel: int = 1,
    max_body: int = MAX_BODY,
) -> None:
    message_id = random_message_id()
    ours = outcome(lambda: encode_publish(
        channel, exchange, routing_key, envelope, max_body, message_id=message_id
    ))
    theirs = outcome(lambda: aiormq_frames(
        channel, exchange, routing_key, envelope, message_id, max_body
    ))
    assert ours == theirs


@pytest.mark.parametrize("message", list(captured_task_messages()))
def test_captured_messages_encode_as_pamqp_does(message: dict[str, Any]) -> None:
    assert_same_publish(envelope_of(message))


def test_our_own_messages_encode_as_pamqp_does() -> None:
    task_id = str(uuid.uuid4())
    for options in (
        {},
        {"priority": 9, "timelimit": (300, 240), "retries": 2, "group": "g", "group_index": 3},
        {"eta": datetime(2030, 1, 1, tzinfo=UTC), "expires": datetime(2031, 1, 1, tzinfo=UTC)},
        {"headers": {"x": [1, 2.5, None, {"deep": [True, "é"]}]}, "compression": "gzip"},
        {"serializer": "msgpack", "shadow": "name", "ignore_result": True},
    ):
        envelope = encode_task(task="t.add", task_id=task_id, args=(1, "x"), kwargs={"k": 2},
                               reply_to="r", **options)
        assert_same_publish(envelope, routing_key="q")
        assert_same_publish(envelope, exchange="ex.topic", routing_key="a.b.c", channel=300)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "bigint", "float", "bool", "none", "unicode"]
    if depth < 3:
        kinds += ["dict", "list"]
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choices(string.printable, k=rng.randint(0, 40)))
    if kind == "unicode":
        return "".join(chr(rng.randint(0x80, 0x2FFF)) for _ in range(rng.randint(1, 10)))
    if kind == "int":
        return rng.randint(-(2**31), 2**31 - 1)
    if kind == "bigint":
        return rng.choice([2**31, -(2**31) - 1, 2**63 - 1, -(2**63), rng.randint(2**32, 2**62)])
    if kind == "float":
        return rng.choice([0.0, -1.5, 1e300, float("inf"), rng.random()])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "dict":
        return random_table(rng, depth + 1)
    return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]


def random_table(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    names = ["id", "task", "lang", "ä", "x" * rng.randint(1, 128), "a-b", "Z", "_"]
    return {rng.choice(names) + str(rng.randint(0, 9)): random_value(rng, depth)
            for _ in range(rng.randint(0, 8))}


def test_random_headers_encode_as_pamqp_does() -> None:
    rng = random.Random(1234)
    for _ in range(500):
        headers = random_table(rng)
        assert encode_field_table(headers) == wide_int_table(headers)
        assert_same_publish(Envelope(body=rng.randbytes(rng.randint(0, 300)), headers=headers))


@pytest.mark.parametrize("value", [
    (1, 2),  # tuples: pamqp refuses them
    b"raw",
    bytearray(b"\x01"),
    Decimal("1.25"),
    datetime(2024, 1, 2, tzinfo=UTC),
    2**64,
    "\ud800",  # a lone surrogate cannot be UTF-8
    OrderedDict(a=1),
    {1: "non-str key"},
    {"k" * 129: "a key pamqp truncates"},
    {"k": object()},
    [("nested", "tuple")],
])
def test_unusual_header_values_encode_as_the_reference_does(value: Any) -> None:
    headers = {"h": value}
    assert outcome(lambda: encode_field_table(headers)) == outcome(
        lambda: wide_int_table(headers)
    )
    assert_same_publish(Envelope(body=b"[]", headers=headers))


@pytest.mark.parametrize("fields", [
    {"priority": None},
    {"priority": 0},
    {"priority": 255},
    {"priority": 256},
    {"priority": -1},
    {"delivery_mode": 1},
    {"delivery_mode": 3},
    {"content_type": "", "content_encoding": ""},
    {"correlation_id": "", "reply_to": None, "expiration": "0"},
    {"correlation_id": "x" * 256},
    {"reply_to": "é" * 128},
    {"headers": {}},
])
def test_properties_encode_as_pamqp_does(fields: dict[str, Any]) -> None:
    base: dict[str, Any] = {"body": b"[1]", "headers": {"task": "t"}}
    assert_same_publish(Envelope(**{**base, **fields}))


@pytest.mark.parametrize(("exchange", "routing_key"), [
    ("", "q" * 255),
    ("", "q" * 256),
    ("", "é" * 200),  # 200 characters but 400 bytes
    ("bad name!", "q"),
    ("e" * 128, "q"),
    ("celery.pidbox", ""),
])
def test_publish_method_encodes_as_pamqp_does(exchange: str, routing_key: str) -> None:
    assert_same_publish(Envelope(body=b"{}", headers={}), exchange, routing_key)


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 250, 1000])
def test_large_bodies_split_as_aiormq_does(size: int) -> None:
    body = random.Random(size).randbytes(size)
    assert_same_publish(Envelope(body=body, headers={"a": 1}), max_body=100)


def test_message_ids_are_random_uuid4_hex() -> None:
    ids = {random_message_id() for _ in range(1000)}
    assert len(ids) == 1000
    for value in list(ids)[:50]:
        parsed = uuid.UUID(hex=value)
        assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid.RFC_4122, value)


# -- JSON bodies ------------------------------------------------------------------------------


class Tagged(tuple):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize("value", [
    [[1, "a"], {"k": None}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
    [[uuid.UUID(int=5)], {}, {}],
    [[{"deep": [uuid.UUID(int=7), (1, 2)]}], {"u": uuid.UUID(int=8)}, None],
    [(1, (2, [3])), {"t": (4,)}],
    [[{1, 2}, Decimal("1.5"), datetime(2024, 1, 1, tzinfo=UTC), b"\xff"], {}],
    [OrderedDict(a=[1]), [Tagged((1, [2]))]],
    "plain",
    uuid.UUID(int=3),
])
def test_json_bodies_are_the_same_with_or_without_the_copy(value: Any) -> None:
    def old() -> bytes:
        return orjson.dumps(_wrap_uuids(value), default=_json_default, option=_DUMP_OPTIONS)

    assert outcome(lambda: dumps(value)[0]) == outcome(old)


# -- RESP ------------------------------------------------------------------------------------

REPLIES = (
    b">3\r\n$7\r\nmessage\r\n$3\r\nkey\r\n$5\r\nhello\r\n"
    b"*3\r\n$9\r\nsubscribe\r\n$1\r\nk\r\n:1\r\n"
    b"+PONG\r\n-ERR wrong\r\n:42\r\n(12345678901234567890\r\n_\r\n$-1\r\n*-1\r\n"
    b"*2\r\n$0\r\n\r\n_\r\n%1\r\n+a\r\n*1\r\n:1\r\n~1\r\n#t\r\n,1.5\r\n"
    b"=8\r\ntxt:abcd\r\n!5\r\nERR x\r\n|1\r\n+ttl\r\n:3\r\n$2\r\nok\r\n"
)
PARSED: list[Any] = [
    [b"message", b"key", b"hello"], [b"subscribe", b"k", 1], b"PONG", ReplyError("ERR wrong"),
    42, 12345678901234567890, None, None, None, [b"", None], {b"a": [1]}, [True], 1.5, b"abcd",
    ReplyError("ERR x"), b"ok",
]


def normal(values: list[Any]) -> list[Any]:
    return [(type(v), str(v)) if isinstance(v, ReplyError) else v for v in values]


def test_parse_every_reply_type() -> None:
    replies, rest, needed = parse(REPLIES)
    assert normal(replies) == normal(PARSED)
    assert (rest, needed) == (b"", 1)
    assert isinstance(replies[0], Push) and not isinstance(replies[1], Push)


def test_parse_keeps_an_incomplete_reply_for_later() -> None:
    for cut in range(len(REPLIES)):
        first, rest, needed = parse(REPLIES[:cut])
        assert needed >= 1
        second, left, _ = parse(rest + REPLIES[cut:])
        assert normal(first + second) == normal(PARSED)
        assert left == b""


def test_parse_says_how_much_a_long_bulk_string_needs() -> None:
    data = b"$1000\r\n" + b"x" * 10
    replies, rest, needed = parse(data)
    assert (replies, rest, needed) == ([], data, 1000 + 7 + 2)


def test_parse_refuses_what_is_not_resp() -> None:
    with pytest.raises(ValueError):
        parse(b"?what\r\n")


def test_task_ids_look_like_str_uuid4() -> None:
    from aioqueue.protocol import new_task_id

    ids = {new_task_id() for _ in range(1000)}
    assert len(ids) == 1000
    for value in list(ids)[:50]:
        parsed = uuid.UUID(value)
        assert (str(parsed), parsed.version, parsed.variant) == (value, 4, uuid.RFC_4122)
