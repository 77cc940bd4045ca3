"""``field_tables.decode_field_table`` reads every field table exactly as pamqp does.

Each table is decoded by ours and by pamqp's own ``field_table``, and the outcomes must
match: bytes consumed and the value with its
types (bool is not int, bytes is not str), or the same exception type and message. Tables:
the headers of every captured message (as they were on the wire and as we encode them),
thousands of random tables with usual and unusual tags, nesting and trailing bytes, and
truncated or corrupted ones; and pamqp's own frame decoding stays pamqp's after a broker
was made.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pamqp.decode
import pamqp.encode
import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp.header import ContentHeader

from aioqueue.brokers.amqp import AmqpBroker, field_tables
from aioqueue.brokers.amqp.field_tables import decode_field_table, encode_field_table
from aioqueue.config import Settings

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
USUAL_TAGS = frozenset("SVtIldFAbBsuiLf")  # what the fast path reads; D T x go to pamqp
Decoder = Callable[[bytes], tuple[int, Any]]


PAMQP_FIELD_TABLE: Decoder = pamqp.decode.field_table
assert (PAMQP_FIELD_TABLE.__module__, PAMQP_FIELD_TABLE.__name__) == ("pamqp.decode", "field_table")


@pytest.fixture(autouse=True)
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The tables the fast decoder handed to pamqp (our module's reference to pamqp's
    decoder, wrapped for the test's duration)."""
    handed: list[bytes] = []

    def spy(value: bytes) -> tuple[int, Any]:
        handed.append(value)
        return PAMQP_FIELD_TABLE(value)

    monkeypatch.setattr(field_tables, "_pamqp_table", spy)
    return handed


def outcome(decode: Decoder, data: Any) -> tuple[Any, ...]:
    try:
        consumed, value = decode(data)
    except Exception as exc:  # compared by type and message
        return ("raised", type(exc), str(exc))
    return ("returned", consumed, value)


def assert_same(ours: Any, theirs: Any, path: str = "$") -> None:
    """Equal values of the same types, dicts in the same key order, floats bit for bit."""
    assert type(ours) is type(theirs), f"{path}: {ours!r} != {theirs!r}"
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), f"{path}: keys {list(ours)} != {list(theirs)}"
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, list | tuple):
        assert len(ours) == len(theirs), f"{path}: {ours!r} != {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(theirs, float):
        assert struct.pack(">d", ours) == struct.pack(">d", theirs), f"{path}: {ours!r}"
    else:
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"


def check(data: Any) -> tuple[Any, ...]:
    """Ours and pamqp's outcome on data are the same; pamqp's."""
    theirs = outcome(PAMQP_FIELD_TABLE, data)
    assert_same(outcome(decode_field_table, data), theirs)
    return theirs


# --------------------------------------------------------------------------------------------
# Captured messages
# --------------------------------------------------------------------------------------------

_FORMATS = {"b": ">b", "s": ">h", "I": ">i", "l": ">q", "d": ">d"}


def wire_table(headers: dict[str, Any], tags: dict[str, Any]) -> bytes:
    """The table as the capture's producer wrote it, from its header_wire_types."""
    body = b"".join(
        bytes((len(key.encode()),)) + key.encode() + wire_value(headers[key], tag)
        for key, tag in tags.items()
    )
    return struct.pack(">I", len(body)) + body


def wire_value(value: Any, tag: Any) -> bytes:
    if isinstance(tag, dict):
        ((kind, inner),) = tag.items()
        if kind == "F":
            return b"F" + wire_table(value, inner)
        body = b"".join(wire_value(v, t) for v, t in zip(value, inner, strict=True))
        return b"A" + struct.pack(">I", len(body)) + body
    if tag == "S":
        raw: bytes = value.encode()
        return b"S" + struct.pack(">I", len(raw)) + raw
    if tag == "V":
        return b"V"
    if tag == "t":
        return b"t" + bytes((value,))
    return str(tag).encode() + struct.pack(_FORMATS[tag], value)


def wire_tags(tags: Any) -> set[str]:
    if isinstance(tags, dict):
        found: set[str] = set()
        for tag in tags.values():
            if isinstance(tag, dict):
                ((kind, inner),) = tag.items()
                found |= {kind} | wire_tags(dict(enumerate(inner)) if kind == "A" else inner)
            else:
                found.add(tag)
        return found
    return {tags}


def captured_messages() -> Iterator[Any]:
    for path in sorted(VECTORS.glob("*.json")):
        vector = json.loads(path.read_text(encoding="utf-8"))
        messages = [
            *vector.get("messages", []),
            *vector.get("reply_messages", []),
            *(case["as_published_by_aio_pika"] for case in vector.get("cases", [])),
        ]
        for i, message in enumerate(messages):
            if "headers" in message:
                yield pytest.param(message, id=f"{path.stem}[{i}]")


@pytest.mark.parametrize("message", list(captured_messages()))
def test_captured_headers(message: dict[str, Any], fallbacks: list[bytes]) -> None:
    headers = message["headers"]
    tables: list[tuple[bytes, bool | None]] = [
        (encode_field_table(headers), True),
        (pamqp.encode.field_table(headers), None),  # ints in b/s/u/... unless patched
    ]
    if "header_wire_types" in message:
        tags = message["header_wire_types"]
        tables.append((wire_table(headers, tags), wire_tags(tags) <= USUAL_TAGS))
    for data, fast in tables:
        fallbacks.clear()
        assert check(data)[:2] == ("returned", len(data))
        check(data + b"\xce")  # the frame goes on
        if fast is not None:
            assert not fallbacks if fast else fallbacks


# --------------------------------------------------------------------------------------------
# Random tables
# --------------------------------------------------------------------------------------------

_TEXT = ["", "py", "proto.add", "gen123@host", "héllo wörld", "日本語", "emoji 🎉", "a" * 300]
_INT_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]
_FLOAT_EDGES = [0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 5e-324, 1e308]


class RandomTables:
    """Raw field tables; ``plain`` tells whether the last one holds only what the fast path
    reads (usual tags, utf-8 keys), so must be decoded without pamqp."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.plain = True
        self.unusual = 0.0

    def new(self, unusual: float) -> bytes:
        self.plain, self.unusual = True, unusual
        return self.table(0)

    def table(self, depth: int) -> bytes:
        rng = self.rng
        body = b"".join(
            self.key() + self.value(depth) for _ in range(rng.randint(0, 8 if depth else 12))
        )
        return struct.pack(">I", len(body)) + body

    def key(self) -> bytes:
        rng = self.rng
        if rng.random() < self.unusual * 0.05:
            self.plain = False
            raw = b"\xff" + rng.randbytes(rng.randint(0, 4))  # not utf-8: pamqp raises
        else:
            raw = rng.choice([*_TEXT[:7], "x-" + str(rng.randint(0, 9)), "k" * 255]).encode()
        return bytes((len(raw),)) + raw

    def value(self, depth: int) -> bytes:
        rng = self.rng
        if rng.random() < self.unusual * 0.15:
            self.plain = False
            return self.unusual_value()
        tag = rng.choice("SSSVVtIldFA" if depth < 3 else "SVtIld")
        if tag == "S":
            if rng.random() < 0.2:
                raw = rng.randbytes(rng.randint(1, 12))  # often not utf-8: pamqp keeps bytes
            else:
                raw = rng.choice(_TEXT).encode()
            return b"S" + struct.pack(">I", len(raw)) + raw
        if tag == "V":
            return b"V"
        if tag == "t":
            return b"t" + bytes((rng.choice([0, 1, 2, 255]),))
        if tag == "I":
            return b"I" + struct.pack(">i", rng.choice([*_INT_EDGES[:5], rng.randint(-9, 9)]))
        if tag == "l":
            return b"l" + struct.pack(">q", rng.choice([*_INT_EDGES, rng.getrandbits(63)]))
        if tag == "d":
            if rng.random() < 0.3:
                return b"d" + rng.randbytes(8)  # any bit pattern, NaN payloads included
            return b"d" + struct.pack(">d", rng.choice([*_FLOAT_EDGES, rng.uniform(-1e9, 1e9)]))
        if tag == "F":
            return b"F" + self.table(depth + 1)
        items = b"".join(self.value(depth + 1) for _ in range(rng.randint(0, 4)))
        return b"A" + struct.pack(">I", len(items)) + items

    def unusual_value(self) -> bytes:
        rng = self.rng
        tag = rng.choice("bBsuiLfDTx\x00")
        if tag in "bBsuiLf":
            size = {"b": 1, "B": 1, "s": 2, "u": 2, "i": 4, "L": 8, "f": 4}[tag]
            return tag.encode() + rng.randbytes(size)
        if tag == "D":
            return b"D" + bytes((rng.randint(0, 9),)) + rng.randbytes(4)
        if tag == "T":
            return b"T" + struct.pack(">Q", rng.choice([0, 1_700_000_000, 1_700_000_000_000]))
        if tag == "x":
            raw = rng.randbytes(rng.randint(0, 6))
            return b"x" + struct.pack(">I", len(raw)) + raw
        return b"\x00"


def test_random_tables(fallbacks: list[bytes]) -> None:
    tables = RandomTables(seed=20240611)
    counts = {"fast": 0, "unusual": 0, "raised": 0}
    for i in range(3000):
        data = tables.new(unusual=0.0 if i % 3 else 0.3)
        tail = tables.rng.randbytes(tables.rng.randint(1, 16))
        fallbacks.clear()
        result = check(data)
        check(data + tail)
        if tables.plain:
            assert not fallbacks, data
            assert result[:2] == ("returned", len(data))
            counts["fast"] += 1
        else:
            counts["unusual"] += 1
            counts["raised"] += result[0] == "raised"
    assert counts["fast"] > 2000
    assert counts["unusual"] > 300
    assert 0 < counts["raised"] < counts["unusual"]


def random_header_value(rng: random.Random, depth: int) -> Any:
    kind = rng.choice("sssnbiiflLD" if depth < 3 else "sssnbiifl")
    if kind == "s":
        return rng.choice([*_TEXT, str(rng.random())])
    if kind == "n":
        return None
    if kind == "b":
        return rng.random() < 0.5
    if kind == "i":
        return rng.choice([*_INT_EDGES, rng.randint(-(2**31), 2**31 - 1)])
    if kind == "l":
        return rng.randint(-(2**63), 2**63 - 1)
    if kind == "f":
        return rng.choice([*_FLOAT_EDGES, rng.uniform(-1e6, 1e6)])
    if kind == "L":
        return [random_header_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return random_headers(rng, depth + 1)


def random_headers(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    keys = ["lang", "task", "id", "eta", "retries", "timelimit", "stamps", "x-é", ""]
    return {rng.choice(keys): random_header_value(rng, depth) for _ in range(rng.randint(0, 9))}


def test_random_headers_as_we_encode_them(fallbacks: list[bytes]) -> None:
    rng = random.Random(7)
    for _ in range(2000):
        data = encode_field_table(random_headers(rng))
        assert check(data)[:2] == ("returned", len(data))
        check(data + b"\x01\x02")
    assert not fallbacks


# --------------------------------------------------------------------------------------------
# Malformed tables
# --------------------------------------------------------------------------------------------


def celery_header_table() -> bytes:
    message = json.loads((VECTORS / "amqp_v2_stamped.json").read_text(encoding="utf-8"))
    message = message["messages"][0]
    return wire_table(message["headers"], message["header_wire_types"])


def test_truncated_at_every_byte() -> None:
    data = celery_header_table()
    for n in range(len(data)):
        assert check(data[:n])[0] == "raised"
        if n >= 4:
            # The table's length fixed to what is left: a value is cut short inside it, and
            # pamqp reads on into whatever follows (nothing, or the bytes after the table).
            cut = struct.pack(">I", n - 4) + data[4:n]
            check(cut)
            check(cut + data[n:])
            check(cut + b"\x00" * 8)


def test_corrupted_bytes() -> None:
    data = celery_header_table()
    rng = random.Random(3)
    for i in range(len(data)):
        for byte in {0x00, 0x01, 0x7F, 0xFF, data[i] + 1 & 0xFF, rng.randrange(256)}:
            corrupted = data[:i] + bytes((byte,)) + data[i + 1 :]
            check(corrupted)
            check(corrupted + b"S\x00\x00\x00\x01xyz")


def table_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x00\x00", id="short-length"),
        pytest.param(b"\x00\x00\x00\x00", id="empty-table"),
        pytest.param(b"\x00\x00\x00\x05\x01a", id="length-past-end"),
        pytest.param(table_of(b"\x01aZ"), id="unknown-tag"),
        pytest.param(table_of(b"\x05aV"), id="key-past-end"),
        pytest.param(table_of(b"\x01a"), id="key-without-value"),
        pytest.param(table_of(b"\x01a") + b"V", id="value-after-table"),
        pytest.param(table_of(b"\x01aS\x00\x00\x00\x03") + b"xyz", id="string-after-table"),
        pytest.param(table_of(b"\x01aS\x00\x00\x00\x09xyz"), id="string-past-end"),
        pytest.param(table_of(b"\x01aI\x00\x00"), id="int-cut"),
        pytest.param(table_of(b"\x01aI\x00\x00") + b"\x00\x07", id="int-into-next"),
        pytest.param(table_of(b"\x01at"), id="bool-cut"),
        pytest.param(table_of(b"\x01aA\x00\x00\x00\x02V"), id="array-past-end"),
        pytest.param(table_of(b"\x01aA\x00\x00\x00\x01I") + b"\x00\x00\x00\x01", id="array-item"),
        pytest.param(table_of(b"\x01aF\x00\x00\x00\x03\x01bV") + b"V", id="nested-past-end"),
        pytest.param(table_of(b"\x01aF\x00\x00\x00\x02\x01b") + b"V", id="nested-key-end"),
        pytest.param(table_of(b"\x01a\x00"), id="nul-tag"),
        pytest.param(table_of(b"\x02\xc3\x28V"), id="key-not-utf8"),
        pytest.param(table_of(b"\x01aV\x01aI\x00\x00\x00\x02"), id="duplicate-key"),
        pytest.param(table_of(b"\x01aT\xff\xff\xff\xff\xff\xff\xff\xff"), id="timestamp-huge"),
    ],
)
def test_malformed_and_odd_tables(data: bytes) -> None:
    check(data)


def nested(depth: int) -> bytes:
    data = table_of(b"\x01aV")
    for _ in range(depth):
        data = table_of(b"\x01aF" + data)
    return data


def test_nesting(fallbacks: list[bytes]) -> None:
    assert check(nested(10))[0] == "returned"
    assert not fallbacks
    # Deeper than the fast path goes: pamqp reads it, and decides where its recursion stops.
    assert check(nested(60))[0] == "returned"
    assert fallbacks
    for decode in (decode_field_table, PAMQP_FIELD_TABLE):
        with pytest.raises(RecursionError):
            decode(nested(5000))


def test_other_buffer_types() -> None:
    data = celery_header_table()
    check(bytearray(data))
    check(memoryview(data))


# --------------------------------------------------------------------------------------------
# Installed into pamqp
# --------------------------------------------------------------------------------------------


def frames() -> list[bytes]:
    message = json.loads((VECTORS / "amqp_v2_chord.json").read_text(encoding="utf-8"))
    message = message["messages"][0]
    headers = message["headers"]
    properties = spec.Basic.Properties(
        content_type="application/json",
        content_encoding="utf-8",
        headers={
            **headers,
            "x-odd": {"b": bytearray(b"\xff"), "t": datetime(2030, 1, 2, tzinfo=UTC)},
        },
        delivery_mode=2,
        priority=3,
        correlation_id=headers["id"],
        reply_to="reply.q",
        expiration="60000",
        message_id="m-1",
        timestamp=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        message_type="task",
        user_id="guest",
        app_id="app",
    )
    marshalled = pamqp.frame.marshal(ContentHeader(0, 123, properties), 7)
    # The captured table as it was on the wire, in a frame of content type and headers only.
    table = wire_table(headers, message["header_wire_types"])
    payload = struct.pack(">HHQH", 60, 0, 123, 0x8000 | 0x2000) + b"\x10application/json"
    payload += table
    captured = struct.pack(">BHI", 2, 7, len(payload)) + payload + b"\xce"
    declare = spec.Queue.Declare(
        queue="celery", durable=True, arguments={"x-queue-type": "quorum", "x-max-priority": 9}
    )
    return [marshalled, captured, pamqp.frame.marshal(declare, 1)]


def frame_fields(frame: Any) -> dict[str, Any]:
    if isinstance(frame, ContentHeader):
        properties = frame.properties
        fields = {name: getattr(properties, name) for name in properties.__slots__}
        return {"body_size": frame.body_size, **fields}
    return {name: getattr(frame, name) for name in frame.__slots__}


async def test_a_broker_leaves_pamqps_decoding_alone() -> None:
    before = [pamqp.frame.unmarshal(frame) for frame in frames()]
    unusual = table_of(b"\x01ab\xff\x01cF" + table_of(b"\x01ds\x01\x00"))
    nested_before = pamqp.decode.embedded_value(b"F" + unusual)
    assert nested_before == (1 + len(unusual), {"a": -1, "c": {"d": 256}})

    AmqpBroker("amqp://guest:guest@127.0.0.1:5672//", Settings())  # made, not connected
    assert pamqp.decode.field_table is PAMQP_FIELD_TABLE
    assert pamqp.decode.METHODS["table"] is PAMQP_FIELD_TABLE
    assert pamqp.decode.TABLE_MAPPING[b"F"] is PAMQP_FIELD_TABLE

    after = [pamqp.frame.unmarshal(frame) for frame in frames()]
    assert before[0][2].properties.headers  # type: ignore[union-attr]
    for (size, channel, frame), (size_after, channel_after, frame_after) in zip(
        before, after, strict=True
    ):
        assert (size_after, channel_after, type(frame_after)) == (size, channel, type(frame))
        assert_same(frame_fields(frame_after), frame_fields(frame))
    assert_same(pamqp.decode.embedded_value(b"F" + unusual), nested_before)
    assert_same(pamqp.decode.by_type(unusual, "table"), pamqp.decode.field_table(unusual))
