"""Task messages against traffic captured from stock Celery (tests/vectors), field by field.

* decode: every captured task message (protocol v2, the v1 legacy body, and the messages
  aio-pika published to a stock worker) decodes to the values Celery put in it;
* encode: for every message a stock client (or worker) published, ``encode_task`` given the
  same inputs produces the same headers in the same order, the same properties and the same
  body (compared as parsed JSON/msgpack: byte spacing may differ, celery-protocol.md §1.5);
* header Python types match the AMQP field-table tags py-amqp wrote (celery-protocol.md §1.7);
* malformed messages are refused with ``MessageError``/``SerializationError``.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from aioqueue.exceptions import (
    AioQueueError,
    ContentDisallowed,
    MessageError,
    SerializationError,
)
from aioqueue.protocol import Envelope, TaskMessage, decode_task, encode_task, parse_time

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
ACCEPT_ALL = frozenset({"application/json", "application/x-msgpack"})
MSGPACK = "application/x-msgpack"

# ISO-8601 as ``datetime.isoformat()`` writes an aware UTC time (microseconds optional).
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?\+00:00")
ORIGIN = re.compile(r"gen\d+@\S+")


@cache
def load(name: str) -> dict[str, Any]:
    with (VECTORS / f"{name}.json").open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def raw_body(message: dict[str, Any]) -> bytes:
    """The body bytes as they were on the wire."""
    if "body_raw" in message:
        return str(message["body_raw"]).encode("utf-8")
    if "body_base64" in message:
        return base64.b64decode(message["body_base64"])
    return bytes.fromhex(message["body_hex"])


def envelope_of(message: dict[str, Any]) -> Envelope:
    props = message["properties"]
    return Envelope(
        body=raw_body(message),
        headers=dict(message["headers"]),
        content_type=props["content_type"],
        content_encoding=props["content_encoding"],
        correlation_id=props.get("correlation_id"),
        reply_to=props.get("reply_to"),
        priority=props.get("priority"),
        delivery_mode=props.get("delivery_mode", 2),
        expiration=props.get("expiration"),
    )


def strict_equal(ours: Any, theirs: Any, path: str = "$") -> None:
    """Equal values of the same types (no 1 == 1.0 == True), dicts in the same key order."""
    assert type(ours) is type(theirs), f"{path}: {ours!r} ({type(ours).__name__}) != {theirs!r}"
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), f"{path}: keys {list(ours)} != {list(theirs)}"
        for key in theirs:
            strict_equal(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), f"{path}: {ours!r} != {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            strict_equal(a, b, f"{path}[{i}]")
    else:
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------

# What the kombu envelopes of amqp_v2_json_special_types stand for (from its producer.call).
SPECIAL_ARGS: list[Any] = [
    datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
    date(2030, 1, 2),
    time(3, 4, 5),
    Decimal("1.10"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    b"raw",
    b"\xff\x00",
]


def captured_task_messages() -> Iterator[Any]:
    """Every captured message carrying a task: ``messages[]`` with a ``task`` header, the v1
    legacy body, the parked chord header and the messages aio-pika sent to a stock worker."""
    for path in sorted(VECTORS.glob("amqp_*.json")):
        for i, message in enumerate(load(path.stem).get("messages", [])):
            if "task" in message["headers"] or path.stem == "amqp_v1_legacy":
                yield pytest.param(message, id=f"{path.stem}[{i}]")
    for case in load("interop_aiopika_to_stock_worker")["cases"]:
        yield pytest.param(case["as_published_by_aio_pika"], id=f"interop[{case['name']}]")


def expected_fields(message: dict[str, Any]) -> dict[str, Any]:
    """The values the stock client put in the message, taken from the capture itself."""
    props = message["properties"]
    if "task" in message["headers"]:
        h = message["headers"]
        args, kwargs, embed = message["body_decoded"]
    else:  # protocol v1: everything is in the body
        h = message["body_decoded"]
        args, kwargs = h["args"], h["kwargs"]
        embed = {
            "callbacks": h["callbacks"],
            "errbacks": h["errbacks"],
            "chain": None,
            "chord": h["chord"],
        }
    if '"__type__"' in message.get("body_raw", ""):
        args = SPECIAL_ARGS
    timelimit = h.get("timelimit") or [None, None]
    return {
        "id": h["id"],
        "task": h["task"],
        "args": args,
        "kwargs": kwargs,
        "embed": embed if embed is not None else {},
        "eta": datetime.fromisoformat(h["eta"]) if h.get("eta") else None,
        "expires": datetime.fromisoformat(h["expires"]) if h.get("expires") else None,
        "retries": h.get("retries", 0),
        "timelimit": (timelimit[0], timelimit[1]),
        "root_id": h.get("root_id"),
        "parent_id": h.get("parent_id"),
        "group": h.get("group"),
        "group_index": h.get("group_index"),
        "shadow": h.get("shadow"),
        "ignore_result": h.get("ignore_result"),
        "reply_to": props.get("reply_to"),
        "correlation_id": props.get("correlation_id"),
        "priority": props.get("priority"),
    }


@pytest.mark.parametrize("message", list(captured_task_messages()))
def test_decode_captured_message(message: dict[str, Any]) -> None:
    if message["properties"]["content_type"] == MSGPACK:
        pytest.importorskip("msgpack")
    task = decode_task(envelope_of(message), ACCEPT_ALL)
    assert isinstance(task, TaskMessage)
    for name, expected in expected_fields(message).items():
        value = getattr(task, name)
        assert value == expected, f"{name}: {value!r} != {expected!r}"
        if isinstance(expected, list):
            for got, want in zip(value, expected, strict=True):
                assert type(got) is type(want), f"{name}: {got!r} is not a {type(want)}"
    for name in ("eta", "expires"):
        moment = getattr(task, name)
        assert moment is None or moment.utcoffset() == timedelta(0), f"{name} not aware UTC"
    assert isinstance(task.retries, int)
    # Headers we do not model (custom ones, stamps, x-delivery-count) stay available.
    for key, value in message["headers"].items():
        assert task.headers[key] == value


def test_decode_special_types_have_their_python_types() -> None:
    message = load("amqp_v2_json_special_types")["messages"][0]
    task = decode_task(envelope_of(message), frozenset({"application/json"}))
    assert [type(a) for a in task.args] == [type(a) for a in SPECIAL_ARGS]
    assert task.args == SPECIAL_ARGS
    assert task.args[0].tzinfo is not None


def test_decode_gzip_body() -> None:
    message = load("amqp_v2_gzip")["messages"][0]
    env = envelope_of(message)
    assert env.headers["compression"] == "application/x-gzip"
    assert env.body[:1] == b"\x78"  # kombu's "gzip" is really zlib.compress
    task = decode_task(env, frozenset({"application/json"}))
    assert (task.args, task.kwargs) == ([4, 4], {})
    assert task.embed == json.loads(message["body_decompressed_raw"])[2]


def test_decode_msgpack_body_with_callback() -> None:
    pytest.importorskip("msgpack")
    message = load("amqp_v2_msgpack")["messages"][0]
    task = decode_task(envelope_of(message), frozenset({MSGPACK}))
    assert task.embed["callbacks"] == [
        {
            "task": "proto.mul",
            "args": [2],
            "kwargs": {},
            "options": {},
            "subtask_type": None,
            "immutable": False,
        }
    ]


def test_decode_v1_legacy_lifts_body_into_fields() -> None:
    message = load("amqp_v1_legacy")["messages"][0]
    task = decode_task(envelope_of(message), frozenset({"application/json"}))
    assert task.id == message["body_decoded"]["id"]
    assert task.eta == datetime(2026, 11, 24, 22, 23, 41, 542682, tzinfo=UTC)
    assert task.embed["callbacks"][0]["task"] == "proto.mul"
    assert task.ignore_result is None and task.root_id is None


def test_decode_options_timelimit_is_hard_then_soft() -> None:
    message = load("amqp_v2_options")["messages"][0]
    task = decode_task(envelope_of(message), frozenset({"application/json"}))
    assert task.timelimit == (30, 20)  # time_limit=30, soft_time_limit=20
    assert task.shadow == "proto.add.shadowed"
    assert task.ignore_result is True
    assert task.retries == 2
    assert task.headers["x-custom"] == "value"


# --------------------------------------------------------------------------------------------
# Encode
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """The inputs of a captured call, as ``encode_task`` takes them.

    ``eta_in``/``expires_in`` are relative to the moment of the call (``countdown=30``,
    ``expires=60``); ``eta_at`` is an absolute time. ``from_capture`` names ``encode_task``
    arguments whose value is an input read from the captured message itself (ids of the
    parent/root/group, canvas signatures in the embed)."""

    task: str = "proto.add"
    args: tuple[Any, ...] | list[Any] = (4, 4)
    kwargs: dict[str, Any] = field(default_factory=dict)
    eta_in: timedelta | None = None
    eta_at: datetime | None = None
    expires_in: timedelta | None = None
    options: dict[str, Any] = field(default_factory=dict)
    from_capture: tuple[str, ...] = ()


EMBED = "embed"
ENCODE_CASES: dict[tuple[str, int], Call] = {
    ("amqp_v2_delay", 0): Call(),
    ("amqp_v2_countdown", 0): Call(eta_in=timedelta(seconds=30)),
    ("amqp_v2_eta", 0): Call(eta_at=datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)),
    ("amqp_v2_expires_seconds", 0): Call(expires_in=timedelta(seconds=60)),
    ("amqp_v2_expires_datetime", 0): Call(expires_in=timedelta(hours=1)),
    ("amqp_v2_options", 0): Call(
        options={
            "retries": 2,
            "timelimit": (30, 20),
            "shadow": "proto.add.shadowed",
            "ignore_result": True,
            "headers": {"x-custom": "value"},
        }
    ),
    ("amqp_v2_priority", 0): Call(options={"priority": 7}),
    ("amqp_v2_send_task_types", 0): Call(
        args=[1, 2.5, None, True, "\u00fcn\u00ef"],
        kwargs={"nested": {"a": [1, 2]}, "empty": []},
        options={"ignore_result": None},  # send_task leaves it to the task's default
    ),
    ("amqp_v2_json_special_types", 0): Call(
        args=list(SPECIAL_ARGS), options={"ignore_result": None}
    ),
    ("amqp_v2_custom_queue", 0): Call(),
    ("amqp_v2_routed", 0): Call(task="proto.mul", args=(2, 3)),
    ("amqp_v2_topic_exchange", 0): Call(),
    ("amqp_v2_gzip", 0): Call(options={"compression": "gzip"}),
    ("amqp_v2_msgpack", 0): Call(options={"serializer": "msgpack"}, from_capture=(EMBED,)),
    ("amqp_v2_link", 0): Call(from_capture=(EMBED,)),
    ("amqp_v2_chain", 0): Call(from_capture=(EMBED,)),
    ("amqp_v2_group", 0): Call(args=(1, 1), from_capture=("group", "group_index")),
    ("amqp_v2_group", 1): Call(args=(2, 2), from_capture=("group", "group_index")),
    ("amqp_v2_chord", 0): Call(args=(1, 1), from_capture=("group", "group_index", EMBED)),
    ("amqp_v2_chord", 1): Call(args=(2, 2), from_capture=("group", "group_index", EMBED)),
    ("amqp_v2_stamped", 0): Call(
        options={"headers": {"stamped_headers": ["mystamp"], "stamps": {"mystamp": "stamp-value"}}}
    ),
    # Messages a stock worker published (retry, link callback): same encoder, more inputs.
    ("amqp_v2_retry_republished", 0): Call(
        task="proto.retry_once",
        args=(7,),
        kwargs={"retry_queue": "retry_parked"},
        eta_in=timedelta(seconds=1),
        options={"retries": 1},
        from_capture=("root_id", "parent_id"),
    ),
    ("amqp_v2_callback_published_by_worker", 0): Call(
        task="proto.mul", args=(3, 10), from_capture=("root_id", "parent_id")
    ),
    # celery 5.4.0 / kombu 5.4.2, for the header set and its order.
    ("amqp_v2_celery54_client", 0): Call(),
    ("amqp_v2_celery54_client", 1): Call(
        eta_in=timedelta(seconds=10), expires_in=timedelta(seconds=60)
    ),
}

# Differences between our encoder and the captures that are known and accepted.
#
# * argsrepr is for logs only; Celery's saferepr writes bytes that are not UTF-8 as hex
#   (b'\xff\x00' -> b'ff00') where we write Python's repr.
KNOWN_ARGSREPR = {("amqp_v2_json_special_types", 0): ("b'\\xff\\x00'", "b'ff00'")}


def encode_like(vector: str, index: int, now: datetime) -> tuple[Envelope, dict[str, Any]]:
    """Our message for the captured call, and the captured message."""
    message = load(vector)["messages"][index]
    call = ENCODE_CASES[vector, index]
    headers, props = message["headers"], message["properties"]
    inputs: dict[str, Any] = dict(call.options)
    for name in call.from_capture:
        inputs[name] = message["body_decoded"][2] if name == EMBED else headers[name]
    if call.eta_in is not None:
        inputs["eta"] = now + call.eta_in
    if call.eta_at is not None:
        inputs["eta"] = call.eta_at
    if call.expires_in is not None:
        inputs["expires"] = now + call.expires_in
    envelope = encode_task(
        task=call.task,
        task_id=headers["id"],
        args=call.args,
        kwargs=call.kwargs,
        now=now,
        reply_to=props["reply_to"],
        **inputs,
    )
    return envelope, message


def parsed_body(envelope_body: bytes, content_type: str, compression: str | None) -> Any:
    """Decode a body without our own decoder (zlib/json/msgpack directly), envelopes kept."""
    if compression is not None:
        assert compression == "application/x-gzip"
        envelope_body = zlib.decompress(envelope_body)
    if content_type == MSGPACK:
        import msgpack

        return msgpack.unpackb(envelope_body, raw=False)
    return json.loads(envelope_body)


def kombu_envelopes(value: Any) -> list[Any]:
    """Every ``{"__type__", "__value__"}`` object in a parsed body, in document order."""
    found: list[Any] = []
    if isinstance(value, dict):
        if set(value) == {"__type__", "__value__"}:
            found.append(value)
        for v in value.values():
            found.extend(kombu_envelopes(v))
    elif isinstance(value, list):
        for v in value:
            found.extend(kombu_envelopes(v))
    return found


ENCODE_IDS = [f"{v}[{i}]" for v, i in ENCODE_CASES]


@pytest.mark.parametrize(("vector", "index"), list(ENCODE_CASES), ids=ENCODE_IDS)
def test_encode_matches_capture(vector: str, index: int) -> None:
    call = ENCODE_CASES[vector, index]
    if call.options.get("serializer") == "msgpack":
        pytest.importorskip("msgpack")
    now = datetime.now(UTC)
    ours, captured = encode_like(vector, index, now)
    cap_headers, cap_props = captured["headers"], captured["properties"]

    # Headers: the same keys, in the same order, with equal values of the same types.
    assert list(ours.headers) == list(cap_headers)
    for key, theirs in cap_headers.items():
        value = ours.headers[key]
        if key in ("eta", "expires"):
            if theirs is None:
                assert value is None, key
                continue
            assert isinstance(value, str) and ISO_UTC.fullmatch(value), (key, value)
            assert ISO_UTC.fullmatch(theirs), (key, theirs)
            if key == "eta" and call.eta_at is not None:
                assert value == theirs  # an absolute time must come out byte for byte
            else:
                delta = call.eta_in if key == "eta" else call.expires_in
                assert delta is not None
                meant = now + delta
                assert abs(datetime.fromisoformat(value) - meant) < timedelta(seconds=1)
        elif key == "origin":
            assert ORIGIN.fullmatch(value), value
            assert ORIGIN.fullmatch(theirs), theirs
        elif key == "argsrepr" and (vector, index) in KNOWN_ARGSREPR:
            ours_part, celery_part = KNOWN_ARGSREPR[vector, index]
            assert value == repr(call.args)
            assert value.replace(ours_part, celery_part) == theirs
        else:
            strict_equal(value, theirs, key)
    if cap_headers.get("eta") and cap_headers.get("expires"):
        # Both relative to the same "now": the gap between them must be the same.
        cap_gap = datetime.fromisoformat(cap_headers["expires"]) - datetime.fromisoformat(
            cap_headers["eta"]
        )
        our_gap = datetime.fromisoformat(ours.headers["expires"]) - datetime.fromisoformat(
            ours.headers["eta"]
        )
        assert abs(our_gap - cap_gap) < timedelta(seconds=1)

    # Properties.
    assert ours.content_type == cap_props["content_type"]
    assert ours.content_encoding == cap_props["content_encoding"]
    assert ours.delivery_mode == cap_props["delivery_mode"]
    assert ours.correlation_id == cap_props["correlation_id"] == cap_headers["id"]
    assert ours.reply_to == cap_props["reply_to"]
    if "priority" in cap_props:
        assert ours.priority == cap_props["priority"]
    else:
        # Celery leaves it out for some routes (queues created on the fly, topic queues) and
        # in every 5.4 capture; AMQP treats a missing priority as 0, which is what we send.
        assert ours.priority == 0
    if call.expires_in is None:
        assert ours.expiration is None and "expiration" not in cap_props
    else:
        assert ours.expiration is not None and re.fullmatch(r"\d+", ours.expiration)
        assert int(ours.expiration) == int(call.expires_in.total_seconds() * 1000)
        # Celery measured it a moment after computing "expires", so it may be a ms short.
        assert abs(int(ours.expiration) - int(cap_props["expiration"])) < 1000

    # Body: the same document (spacing and ASCII escaping may differ, §1.5).
    compression = cap_headers.get("compression")
    ours_doc = parsed_body(ours.body, ours.content_type, compression)
    theirs_doc = parsed_body(raw_body(captured), cap_props["content_type"], compression)
    strict_equal(ours_doc, theirs_doc, "body")
    assert kombu_envelopes(ours_doc) == kombu_envelopes(theirs_doc)


def test_encode_special_types_use_kombu_envelopes() -> None:
    ours, captured = encode_like("amqp_v2_json_special_types", 0, datetime.now(UTC))
    expected = [
        {"__type__": "datetime", "__value__": "2030-01-02T03:04:05+00:00"},
        {"__type__": "date", "__value__": "2030-01-02"},
        {"__type__": "time", "__value__": "03:04:05"},
        {"__type__": "decimal", "__value__": "1.10"},
        {"__type__": "uuid", "__value__": {"hex": "12345678123456781234567812345678"}},
        {"__type__": "bytes", "__value__": "raw"},
        {"__type__": "base64", "__value__": "/wA="},
    ]
    assert kombu_envelopes(json.loads(ours.body)) == expected
    assert kombu_envelopes(json.loads(raw_body(captured))) == expected


def test_encode_gzip_is_zlib_like_kombu() -> None:
    ours, captured = encode_like("amqp_v2_gzip", 0, datetime.now(UTC))
    theirs = raw_body(captured)
    assert ours.headers["compression"] == "application/x-gzip"
    # kombu's "gzip" compressor is zlib.compress: zlib header, not the gzip magic 1f 8b.
    assert theirs[:2] == ours.body[:2] == b"\x78\x9c"
    assert zlib.decompress(theirs) == captured["body_decompressed_raw"].encode()
    assert json.loads(zlib.decompress(ours.body)) == captured["body_decoded"]
    # And we read our own output back.
    assert decode_task(ours, frozenset({"application/json"})).args == [4, 4]


def test_encode_msgpack_body_is_byte_identical() -> None:
    pytest.importorskip("msgpack")
    ours, captured = encode_like("amqp_v2_msgpack", 0, datetime.now(UTC))
    assert ours.body == raw_body(captured)


def test_encode_expiration_edge_cases() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    past = encode_task(
        task="t", task_id="i", args=(), kwargs={}, expires=now - timedelta(seconds=5), now=now
    )
    assert past.expiration == "0"  # already expired: "0", never negative
    naive = encode_task(
        task="t",
        task_id="i",
        args=(),
        kwargs={},
        eta=datetime(2030, 1, 1, 0, 0, 30),
        expires=datetime(2030, 1, 1, 0, 1),
        now=now,
    )  # naive times are UTC, as Celery reads them
    assert naive.headers["eta"] == "2030-01-01T00:00:30+00:00"
    assert naive.headers["expires"] == "2030-01-01T00:01:00+00:00"
    assert naive.expiration == "60000"


def test_format_and_parse_time() -> None:
    plus_one = datetime(2030, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    msg = encode_task(task="t", task_id="i", args=(), kwargs={}, eta=plus_one)
    assert msg.headers["eta"] == "2030-01-02T03:04:05+00:00"  # converted to UTC, no µs
    assert parse_time("2030-01-02T03:04:05", "eta") == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_time(None, "eta") is None


# --------------------------------------------------------------------------------------------
# Header types vs. AMQP field-table tags
# --------------------------------------------------------------------------------------------

# The Python type each tag py-amqp writes stands for (celery-protocol.md §1.7).
TAG_TYPES: dict[str, type] = {"S": str, "V": type(None), "I": int, "t": bool}


def assert_tag_type(value: Any, tag: Any, path: str) -> None:
    if isinstance(tag, dict):
        ((kind, inner),) = tag.items()
        if kind == "A":
            assert type(value) is list, f"{path}: {value!r} is not a list"
            assert len(value) == len(inner), path
            for i, (v, t) in enumerate(zip(value, inner, strict=True)):
                assert_tag_type(v, t, f"{path}[{i}]")
        else:
            assert kind == "F", path
            assert type(value) is dict, f"{path}: {value!r} is not a dict"
            assert list(value) == list(inner), path
            for k, t in inner.items():
                assert_tag_type(value[k], t, f"{path}.{k}")
        return
    # type() and not isinstance(): a bool is not an int, an int is not a float.
    assert type(value) is TAG_TYPES[tag], f"{path}: {value!r} should be tag {tag}"


@pytest.mark.parametrize(("vector", "index"), list(ENCODE_CASES), ids=ENCODE_IDS)
def test_header_types_match_wire_tags(vector: str, index: int) -> None:
    if ENCODE_CASES[vector, index].options.get("serializer") == "msgpack":
        pytest.importorskip("msgpack")
    ours, captured = encode_like(vector, index, datetime.now(UTC))
    tags = captured["header_wire_types"]
    assert list(tags) == list(ours.headers)
    for key, tag in tags.items():
        assert_tag_type(ours.headers[key], tag, key)


# --------------------------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------------------------

GOOD_HEADERS: dict[str, Any] = {"task": "proto.add", "id": "6a4f1c3e-0000-4000-8000-000000000001"}
GOOD_BODY = b'[[4, 4], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
_DROP = object()


def malformed(
    body: bytes = GOOD_BODY,
    content_type: str = "application/json",
    **headers: Any,
) -> Envelope:
    merged = {**GOOD_HEADERS, **headers}
    return Envelope(
        body=body,
        headers={k: v for k, v in merged.items() if v is not _DROP},
        content_type=content_type,
    )


MALFORMED = [
    pytest.param(malformed(id=_DROP), MessageError, "'id'", id="missing-id"),
    pytest.param(malformed(id=""), MessageError, "'id'", id="empty-id"),
    pytest.param(malformed(id=7), MessageError, "'id'", id="non-string-id"),
    pytest.param(malformed(task=_DROP), MessageError, "'task'", id="missing-task"),
    pytest.param(malformed(task=42), MessageError, "'task'", id="non-string-task"),
    pytest.param(malformed(body=b'{"a": 1}'), MessageError, "body", id="body-not-list"),
    pytest.param(malformed(body=b"[[4, 4], {}]"), MessageError, "body", id="body-2-elements"),
    pytest.param(malformed(body=b'[{"a": 1}, {}, {}]'), MessageError, "args", id="args-dict"),
    pytest.param(malformed(body=b"[[4, 4], [], {}]"), MessageError, "kwargs", id="kwargs-list"),
    pytest.param(malformed(body=b"[[], {}, []]"), MessageError, "embed", id="embed-list"),
    pytest.param(malformed(eta="tomorrow"), MessageError, "'eta'", id="bad-eta-string"),
    pytest.param(malformed(eta=1700000000), MessageError, "'eta'", id="eta-wrong-type"),
    pytest.param(malformed(expires=["x"]), MessageError, "'expires'", id="expires-wrong-type"),
    pytest.param(malformed(timelimit=[30]), MessageError, "timelimit", id="timelimit-1"),
    pytest.param(malformed(timelimit=30), MessageError, "timelimit", id="timelimit-scalar"),
    pytest.param(
        malformed(timelimit=["30", None]), MessageError, "timelimit", id="timelimit-string"
    ),
    pytest.param(malformed(retries="2"), MessageError, "'retries'", id="retries-string"),
    pytest.param(malformed(retries=True), MessageError, "'retries'", id="retries-bool"),
    pytest.param(malformed(group_index=1.5), MessageError, "group_index", id="group-index"),
    pytest.param(malformed(root_id=5), MessageError, "root_id", id="root-id-not-str"),
    pytest.param(malformed(ignore_result="yes"), MessageError, "ignore_result", id="ignore"),
    pytest.param(malformed(body=b"[[4, 4], {}, "), SerializationError, "json", id="bad-json"),
    pytest.param(
        malformed(content_type="application/x-python-serialize"),
        ContentDisallowed,
        "application/x-python-serialize",
        id="content-not-accepted",
    ),
    pytest.param(
        malformed(compression="application/x-snappy"),
        SerializationError,
        "application/x-snappy",
        id="unknown-compression",
    ),
    pytest.param(
        malformed(compression="application/x-gzip"),
        SerializationError,
        "decompress",
        id="not-compressed",
    ),
    pytest.param(malformed(compression=1), MessageError, "compression", id="compression-int"),
    pytest.param(
        malformed(body=b'[[{"__type__": "pickle", "__value__": "x"}], {}, {}]'),
        SerializationError,
        "pickle",
        id="unknown-kombu-envelope",
    ),
    pytest.param(
        Envelope(body=b'{"args": [1]}', headers={}), MessageError, "task", id="v1-without-task"
    ),
]


@pytest.mark.parametrize(("envelope", "error", "mentions"), MALFORMED)
def test_decode_refuses_malformed(
    envelope: Envelope, error: type[AioQueueError], mentions: str
) -> None:
    with pytest.raises(error) as info:
        decode_task(envelope, frozenset({"application/json"}))
    assert isinstance(info.value, AioQueueError)
    assert mentions.lower() in str(info.value).lower()


def test_decode_accepts_minimal_and_null_embed() -> None:
    task = decode_task(malformed(body=b"[[2, 3], {}, null]"), None)
    assert (task.args, task.kwargs, task.embed) == ([2, 3], {}, {})
    assert task.retries == 0 and task.timelimit == (None, None) and task.eta is None
