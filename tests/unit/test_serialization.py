"""Serializers and compressors: kombu's JSON conventions on orjson, msgpack, compression."""

from __future__ import annotations

import base64
import gzip
import json
import math
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from aioqueue.exceptions import AioQueueError, ContentDisallowed, SerializationError
from aioqueue.serialization import accepted_types, compress, decompress, dumps, loads

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
JSON = "application/json"
MSGPACK = "application/x-msgpack"


def json_round_trip(value: Any) -> Any:
    body, content_type, encoding = dumps(value)
    assert (content_type, encoding) == (JSON, "utf-8")
    return loads(body, content_type, frozenset({JSON}))


# Every kombu envelope type (celery-protocol.md §1.5): value, __type__, __value__.
ENVELOPES = [
    pytest.param(
        datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        "datetime",
        "2030-01-02T03:04:05+00:00",
        id="datetime-utc",
    ),
    pytest.param(
        datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=-5))),
        "datetime",
        "2030-01-02T03:04:05.678901-05:00",
        id="datetime-offset",
    ),
    pytest.param(
        datetime(2030, 1, 2, 3, 4, 5), "datetime", "2030-01-02T03:04:05", id="datetime-naive"
    ),
    pytest.param(date(2030, 1, 2), "date", "2030-01-02", id="date"),
    pytest.param(time(3, 4, 5), "time", "03:04:05", id="time"),
    pytest.param(time(3, 4, 5, 120000), "time", "03:04:05.120000", id="time-micro"),
    pytest.param(Decimal("1.10"), "decimal", "1.10", id="decimal"),
    pytest.param(Decimal("-1E+3"), "decimal", "-1E+3", id="decimal-exp"),
    pytest.param(
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "uuid",
        {"hex": "12345678123456781234567812345678"},
        id="uuid",
    ),
    pytest.param(b"raw", "bytes", "raw", id="bytes-utf8"),
    pytest.param("ünï".encode(), "bytes", "ünï", id="bytes-utf8-non-ascii"),
    pytest.param(b"\xff\x00", "base64", "/wA=", id="bytes-binary"),
]


@pytest.mark.parametrize(("value", "kind", "wire"), ENVELOPES)
def test_kombu_envelope_round_trip(value: Any, kind: str, wire: Any) -> None:
    body, _, _ = dumps([value, {"k": value}])
    assert json.loads(body) == [
        {"__type__": kind, "__value__": wire},
        {"k": {"__type__": kind, "__value__": wire}},
    ]
    back = json_round_trip([value, {"k": value}])
    assert back == [value, {"k": value}]
    assert type(back[0]) is type(value) and type(back[1]["k"]) is type(value)
    if isinstance(value, datetime):
        assert back[0].utcoffset() == value.utcoffset()


def test_envelopes_inside_tuples_and_nested_containers() -> None:
    ident = uuid.UUID(int=1)
    value = {"outer": ({"when": date(2030, 1, 2)}, [ident, (b"x",)])}
    assert json_round_trip(value) == {"outer": [{"when": date(2030, 1, 2)}, [ident, [b"x"]]]}


def test_decode_captured_special_types_body() -> None:
    captured = json.loads((VECTORS / "amqp_v2_json_special_types.json").read_text("utf-8"))
    body = captured["messages"][0]["body_raw"].encode()
    args, kwargs, _ = loads(body, JSON, frozenset({JSON}))
    assert args == [
        datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        date(2030, 1, 2),
        time(3, 4, 5),
        Decimal("1.10"),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        b"raw",
        b"\xff\x00",
    ]
    assert kwargs == {}


def test_object_with_other_keys_is_not_an_envelope() -> None:
    value = {"__type__": "decimal", "__value__": "1", "extra": True}
    assert json_round_trip(value) == value
    assert json_round_trip({"__type__": "decimal"}) == {"__type__": "decimal"}


def test_unknown_envelope_type_is_an_error() -> None:
    with pytest.raises(SerializationError, match="'pickle'"):
        loads(b'{"__type__": "pickle", "__value__": "x"}', JSON)


def test_bad_envelope_value_is_an_error() -> None:
    with pytest.raises(SerializationError):
        loads(b'{"__type__": "datetime", "__value__": "not a time"}', JSON)


def test_plain_json_types_round_trip() -> None:
    value = [1, 2.5, None, True, False, "ünï", {"nested": {"a": [1, 2]}, "empty": []}]
    assert json_round_trip(value) == value
    back = json_round_trip(value)
    assert type(back[0]) is int and type(back[1]) is float and back[3] is True


def test_tuples_become_lists() -> None:
    assert json_round_trip((1, (2, 3), {"t": (4,)})) == [1, [2, 3], {"t": [4]}]


def test_non_ascii_is_valid_utf8_json() -> None:
    body, _, _ = dumps(["ünï"])
    assert json.loads(body.decode("utf-8")) == ["ünï"]


# Stock JSON (Python's json module) writes these; orjson refuses them: fall back on read.
STDLIB_ONLY = [
    pytest.param(b"[NaN]", id="nan"),
    pytest.param(b"[Infinity, -Infinity]", id="infinity"),
    pytest.param(b"[123456789012345678901234567890]", id="big-int"),
    pytest.param(b"[-18446744073709551617]", id="big-negative-int"),
    # orjson does not refuse these: it returns floats and the low digits are lost.
    pytest.param(b"[18446744073709551616]", id="2**64"),
    pytest.param(b"[-9223372036854775809]", id="-2**63-1"),
]


@pytest.mark.parametrize("body", STDLIB_ONLY)
def test_stdlib_only_json_falls_back(body: bytes) -> None:
    ours = loads(body, JSON, frozenset({JSON}))
    expected = json.loads(body)
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected, strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == b
        assert type(a) is type(b)


def test_long_digit_runs_keep_exact_values() -> None:
    body = b'{"id": "12345678901234567890123", "f": 0.12345678901234567890123, "i": 2e19}'
    assert loads(body, JSON) == json.loads(body)
    assert loads(b"[9223372036854775807, -9223372036854775808]", JSON) == [2**63 - 1, -(2**63)]


def test_fallback_still_unwraps_envelopes() -> None:
    body = b'[NaN, {"__type__": "decimal", "__value__": "2.50"}, 99999999999999999999999]'
    nan, amount, big = loads(body, JSON)
    assert math.isnan(nan) and amount == Decimal("2.50") and big == 99999999999999999999999


def test_undecodable_json_is_a_serialization_error() -> None:
    with pytest.raises(SerializationError, match="application/json"):
        loads(b"[1, 2", JSON)
    with pytest.raises(SerializationError):
        loads(b"\xff\xfe", JSON)


def test_unserializable_object_raises_serialization_error() -> None:
    class Opaque:
        pass

    with pytest.raises(SerializationError, match="Opaque") as info:
        dumps([Opaque()])
    assert isinstance(info.value, AioQueueError)


def test_unknown_serializer() -> None:
    with pytest.raises(SerializationError, match="yaml"):
        dumps([1], "yaml")


def test_msgpack_round_trip() -> None:
    pytest.importorskip("msgpack")
    value = [[4, 4], {"k": "ünï", "b": b"\x00\xff", "f": 2.5}, {"callbacks": None}]
    body, content_type, encoding = dumps(value, "msgpack")
    assert (content_type, encoding) == (MSGPACK, "binary")
    assert loads(body, MSGPACK, frozenset({MSGPACK})) == value
    assert loads(dumps((1, (2,)), "msgpack")[0], MSGPACK) == [1, [2]]


def test_msgpack_captured_body() -> None:
    pytest.importorskip("msgpack")
    captured = json.loads((VECTORS / "amqp_v2_msgpack.json").read_text("utf-8"))
    message = captured["messages"][0]
    body = base64.b64decode(message["body_base64"])
    assert loads(body, MSGPACK, frozenset({MSGPACK})) == message["body_decoded"]
    assert dumps(message["body_decoded"], "msgpack")[0] == body


def test_accepted_types_maps_names_to_mime_types() -> None:
    assert accepted_types(["json"]) == frozenset({JSON})
    assert accepted_types(["json", "msgpack", "pickle"]) == frozenset(
        {JSON, MSGPACK, "application/x-python-serialize"}
    )
    # MIME types (and names we do not know) are kept as given.
    assert accepted_types([JSON, "application/x-yaml"]) == frozenset({JSON, "application/x-yaml"})
    assert accepted_types([]) == frozenset()


def test_content_outside_accept_is_disallowed() -> None:
    body, _, _ = dumps([1])
    with pytest.raises(ContentDisallowed, match=MSGPACK):
        loads(body, MSGPACK, frozenset({JSON}))
    with pytest.raises(ContentDisallowed, match="application/x-yaml"):
        loads(b"- 1", "application/x-yaml", frozenset({"application/x-yaml"}))
    assert issubclass(ContentDisallowed, SerializationError)
    assert loads(body, JSON, None) == [1]  # accept=None: no restriction


COMPRESSIONS = [
    pytest.param("gzip", "application/x-gzip", id="gzip"),
    pytest.param("zlib", "application/x-gzip", id="zlib"),
    pytest.param("bzip2", "application/x-bz2", id="bzip2"),
    pytest.param("lzma", "application/x-lzma", id="lzma"),
]


@pytest.mark.parametrize(("method", "mime"), COMPRESSIONS)
def test_compress_round_trip(method: str, mime: str) -> None:
    data = b'[[4, 4], {}, {"callbacks": null}]' * 20
    packed, header = compress(data, method)
    assert header == mime
    assert packed != data and len(packed) < len(data)
    assert decompress(packed, header) == data
    assert decompress(packed, method) == data  # the method name is accepted as well


def test_gzip_is_zlib_format_like_kombu() -> None:
    packed, _ = compress(b"payload", "gzip")
    assert packed[:1] == b"\x78"  # zlib stream, not the gzip magic 1f 8b


def test_decompress_real_gzip_stream() -> None:
    # Another implementation could send a real gzip stream under application/x-gzip.
    assert decompress(gzip.compress(b"payload"), "application/x-gzip") == b"payload"


def test_decompress_captured_gzip_body() -> None:
    captured = json.loads((VECTORS / "amqp_v2_gzip.json").read_text("utf-8"))
    message = captured["messages"][0]
    body = base64.b64decode(message["body_base64"])
    assert len(body) == message["body_size"]
    plain = decompress(body, message["headers"]["compression"])
    assert plain == message["body_decompressed_raw"].encode()
    assert loads(plain, JSON) == message["body_decoded"]


def test_unknown_or_corrupt_compression() -> None:
    with pytest.raises(SerializationError, match="snappy"):
        compress(b"x", "snappy")
    with pytest.raises(SerializationError, match="application/x-snappy"):
        decompress(b"x", "application/x-snappy")
    with pytest.raises(SerializationError, match="application/x-bz2"):
        decompress(b"not bzip2", "application/x-bz2")


@pytest.mark.parametrize(("value", "kind", "wire"), ENVELOPES)
def test_kombu_reads_ours_and_we_read_kombu(value: Any, kind: str, wire: Any) -> None:
    """Cross-check with the stock library itself (a dev dependency), both directions."""
    kombu_json = pytest.importorskip("kombu.utils.json")
    ours, _, _ = dumps({"v": [value]})
    assert kombu_json.loads(ours) == {"v": [value]}
    theirs = kombu_json.dumps({"v": [value]})
    assert loads(theirs.encode("utf-8"), JSON) == {"v": [value]}
