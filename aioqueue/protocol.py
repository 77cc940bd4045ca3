"""Celery's task message protocol v2: a task call <-> (headers, properties, body).

``Envelope`` is what every broker carries; ``TaskMessage`` is a decoded task request.
The field list, defaults and value formats follow Celery 5.x as captured on the wire.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

from .exceptions import MessageError
from .serialization import check_accepted, compress, decompress, dumps, loads

__all__ = (
    "Envelope",
    "MessageLimits",
    "MessageTooLarge",
    "TaskMessage",
    "decode_task",
    "encode_task",
    "format_time",
    "new_task_id",
    "origin",
    "parse_time",
)

ARGSREPR_MAXSIZE = 1024
KWARGSREPR_MAXSIZE = 1024
EMPTY_EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

# UUID4 layout: version 4 in bits 76-79, RFC 4122 variant (10) in bits 62-63.
_UUID4_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID4_SET = (0x4 << 76) | (0x2 << 62)


def new_task_id() -> str:
    """A task id as Celery makes them, ``str(uuid.uuid4())`` (same randomness, os.urandom),
    at half the cost: no UUID object."""
    h = f"{(int.from_bytes(os.urandom(16)) & _UUID4_CLEAR) | _UUID4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(slots=True)
class Envelope:
    """A message as every broker carries it: body bytes, application headers, properties."""

    body: bytes
    headers: dict[str, Any]
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    correlation_id: str | None = None
    reply_to: str | None = None
    priority: int | None = None
    delivery_mode: int = 2
    expiration: str | None = None  # milliseconds, as a decimal string (AMQP per-message TTL)


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """What one message may make the worker allocate (the ``worker_max_*`` settings)."""

    message_size: int = 64 << 20  # body bytes as received
    decompressed_size: int = 64 << 20  # body bytes after the ``compression`` header's codec
    header_count: int = 256  # entries of the header table, nested tables and lists included
    header_size: int = 1 << 20  # bytes of the header table's keys and values
    body_depth: int = 64  # nesting of lists and dicts in the decoded body

    @classmethod
    def from_conf(cls, conf: Any) -> MessageLimits:
        return cls(
            conf.worker_max_message_size, conf.worker_max_decompressed_size,
            conf.worker_max_header_count, conf.worker_max_header_size,
            conf.worker_max_body_depth,
        )


_CONTAINERS = (list, dict, tuple)
_STRINGS = (str, bytes, bytearray)
_BYTES = (bytes, bytearray)


class MessageTooLarge(MessageError):
    """A message crosses one of ``MessageLimits``; the message names the setting."""


def _check_headers(headers: dict[str, Any], limits: MessageLimits) -> None:
    """Count the header table's entries and bytes, nested ones too, without recursion.

    One pass over the top level (about 20 entries from Celery, mostly str/None/int); only a
    nested table or list takes the slower walk.
    """
    count = len(headers)
    if count > limits.header_count:
        raise MessageTooLarge(
            f"{count} headers exceed worker_max_header_count ({limits.header_count})"
        )
    try:
        size = sum(map(len, headers))  # the keys: str from every broker
    except TypeError:
        size = 8 * count
    nested: list[Any] = []
    for value in headers.values():
        kind = type(value)
        if kind is str:
            size += len(value)
        elif value is None or kind is int or kind is bool:
            size += 8
        elif kind is list or kind is dict or kind is tuple or kind is bytes or kind is bytearray:
            if value:
                nested.append(value)
        else:
            size += 8
    while nested:
        node = nested.pop()
        if isinstance(node, _BYTES):
            size += len(node)
            continue
        count += len(node)
        if count > limits.header_count:
            raise MessageTooLarge(
                f"more than {limits.header_count} header entries (nested ones included) "
                "exceed worker_max_header_count"
            )
        if type(node) is dict:
            size += sum(len(k) if isinstance(k, _STRINGS) else 8 for k in node)
            node = node.values()
        for value in node:
            if value is None:
                size += 8
            elif isinstance(value, _STRINGS):
                size += len(value)
            elif isinstance(value, _CONTAINERS):
                nested.append(value)
            else:
                size += 8
        if size > limits.header_size:
            break
    if size > limits.header_size:
        raise MessageTooLarge(
            f"header table of more than {limits.header_size} bytes exceeds "
            "worker_max_header_size"
        )


def _check_depth(body: Any, limit: int) -> None:
    """Refuse a body nested deeper than ``limit`` lists/dicts (no recursion, scalars skipped)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise MessageTooLarge(f"body nested deeper than worker_max_body_depth ({limit})")
        for value in node.values() if isinstance(node, dict) else node:
            if isinstance(value, _CONTAINERS):
                stack.append((value, depth + 1))


@dataclass(slots=True)
class TaskMessage:
    """A decoded task request."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    embed: dict[str, Any] = field(default_factory=lambda: dict(EMPTY_EMBED))
    eta: datetime | None = None
    expires: datetime | None = None
    retries: int = 0
    timelimit: tuple[float | None, float | None] = (None, None)  # (hard, soft)
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    shadow: str | None = None
    ignore_result: bool | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    priority: int | None = None
    headers: dict[str, Any] = field(default_factory=dict)


@cache
def origin() -> str:
    """The sender node name Celery puts in ``origin``: ``gen<pid>@<hostname>``."""
    return f"gen{os.getpid()}@{socket.gethostname()}"


def _as_utc(value: datetime) -> datetime:
    """An aware UTC time; a naive value is taken as UTC (as Celery reads one)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def format_time(value: datetime) -> str:
    """ISO-8601 of an aware UTC time, as Celery writes ``eta``/``expires``."""
    return _as_utc(value).isoformat()


def parse_time(value: Any, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise MessageError(f"header {name!r} must be an ISO-8601 string, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise MessageError(f"header {name!r} is not an ISO-8601 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _repr(value: Any, limit: int) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_task(
    *,
    task: str,
    task_id: str,
    args: tuple[Any, ...] | list[Any],
    kwargs: dict[str, Any],
    serializer: str = "json",
    eta: datetime | None = None,
    expires: datetime | None = None,
    now: datetime | None = None,
    retries: int = 0,
    timelimit: tuple[float | None, float | None] = (None, None),
    root_id: str | None = None,
    parent_id: str | None = None,
    group: str | None = None,
    group_index: int | None = None,
    shadow: str | None = None,
    ignore_result: bool | None = False,
    reply_to: str | None = None,
    priority: int | None = None,
    embed: dict[str, Any] | None = None,
    headers: dict[str, Any] | None = None,
    compression: str | None = None,
) -> Envelope:
    """Build a protocol v2 task message, header for header as stock Celery 5.x sends it.

    Raises ``SerializationError`` if the arguments cannot be serialized; nothing is sent then.
    """
    body, content_type, content_encoding = dumps(
        [list(args), kwargs, embed if embed is not None else EMPTY_EMBED], serializer
    )
    message_headers: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": shadow,
        "eta": format_time(eta) if eta is not None else None,
        "expires": format_time(expires) if expires is not None else None,
        "group": group,
        "group_index": group_index,
        "retries": retries,
        "timelimit": list(timelimit),
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        # repr of args as given: a tuple for delay()/apply_async((...)), a list for
        # send_task(args=[...]) (vectors amqp_v2_delay, amqp_v2_send_task_types).
        "argsrepr": _repr(args, ARGSREPR_MAXSIZE),
        "kwargsrepr": _repr(kwargs, KWARGSREPR_MAXSIZE),
        "origin": origin(),
        "ignore_result": ignore_result,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    if headers:
        message_headers.update(headers)
    if compression:
        body, message_headers["compression"] = compress(body, compression)
    expiration = None
    if expires is not None:
        remaining = (_as_utc(expires) - _as_utc(now or datetime.now(UTC))).total_seconds()
        expiration = str(max(0, int(remaining * 1000)))
    return Envelope(
        body=body,
        headers=message_headers,
        content_type=content_type,
        content_encoding=content_encoding,
        correlation_id=task_id,
        reply_to=reply_to,
        priority=priority if priority is not None else 0,
        delivery_mode=2,
        expiration=expiration,
    )


def _optional_str(headers: dict[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if value is None or isinstance(value, str):
        return value
    raise MessageError(f"header {name!r} must be a string or null, got {type(value).__name__}")


def _optional_int(headers: dict[str, Any], name: str, default: int | None) -> int | None:
    value = headers.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"header {name!r} must be an integer, got {value!r}")
    return value


def _timelimit(value: Any) -> tuple[float | None, float | None]:
    if value is None:
        return (None, None)
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise MessageError(f"header 'timelimit' must be [hard, soft], got {value!r}")
    hard, soft = value
    for limit in (hard, soft):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)):
            raise MessageError(f"header 'timelimit' holds a non-number: {value!r}")
    return (hard, soft)


def _v1_to_v2(body: Any) -> tuple[dict[str, Any], list[Any]]:
    """Protocol v1 keeps everything in the body; lift it into v2 headers and body."""
    if not isinstance(body, dict) or "task" not in body or "id" not in body:
        raise MessageError("message has no 'task' header and is not a protocol v1 body")
    headers = {
        k: body.get(k)
        for k in ("task", "id", "eta", "expires", "group", "group_index", "retries", "timelimit")
    }
    embed = {
        "callbacks": body.get("callbacks"),
        "errbacks": body.get("errbacks"),
        "chain": None,
        "chord": body.get("chord"),
    }
    return headers, [body.get("args") or [], body.get("kwargs") or {}, embed]


def decode_task(
    envelope: Envelope,
    accept: frozenset[str] | None = None,
    limits: MessageLimits | None = None,
) -> TaskMessage:
    """Decode and validate a task message; raises ``MessageError``/``SerializationError``.

    With ``limits`` (the worker passes them), sizes are checked before anything else is
    allocated: the body as received, then the header table, then the body as it inflates,
    then the nesting of the decoded body. Crossing one raises ``MessageTooLarge`` or
    ``DecompressedTooLarge``.
    """
    headers = envelope.headers if isinstance(envelope.headers, dict) else {}
    raw = envelope.body
    if limits is not None:
        if len(raw) > limits.message_size:
            raise MessageTooLarge(
                f"body of {len(raw)} bytes exceeds worker_max_message_size "
                f"({limits.message_size})"
            )
        _check_headers(headers, limits)
    data: bytes | bytearray = raw
    compression = headers.get("compression")
    if compression is not None:
        if not isinstance(compression, str):
            raise MessageError(f"header 'compression' must be a string, got {compression!r}")
        check_accepted(envelope.content_type, accept)  # refused before it is inflated
        data = decompress(raw, compression, None if limits is None else limits.decompressed_size)
    body = loads(data, envelope.content_type, accept)
    if (limits is not None and isinstance(body, _CONTAINERS)
            # JSON nests no deeper than it has brackets: most bodies need no walk
            and (envelope.content_type != "application/json"
                 or data.count(b"[") + data.count(b"{") > limits.body_depth)):
        _check_depth(body, limits.body_depth)
    if "task" not in headers:
        headers, body = _v1_to_v2(body)
    task = headers.get("task")
    task_id = headers.get("id")
    if not isinstance(task, str) or not task:
        raise MessageError(f"header 'task' must be a non-empty string, got {task!r}")
    if not isinstance(task_id, str) or not task_id:
        raise MessageError(f"header 'id' must be a non-empty string, got {task_id!r}")
    if not isinstance(body, list | tuple) or len(body) != 3:
        raise MessageError("body must be a list [args, kwargs, embed]")
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        raise MessageError(f"args must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise MessageError(f"kwargs must be an object, got {type(kwargs).__name__}")
    if embed is None:
        embed = {}
    if not isinstance(embed, dict):
        raise MessageError(f"embed must be an object or null, got {type(embed).__name__}")
    ignore_result = headers.get("ignore_result")
    if ignore_result is not None and not isinstance(ignore_result, bool):
        raise MessageError(f"header 'ignore_result' must be a bool, got {ignore_result!r}")
    return TaskMessage(
        id=task_id,
        task=task,
        args=list(args),
        kwargs=kwargs,
        embed=embed,
        eta=parse_time(headers.get("eta"), "eta"),
        expires=parse_time(headers.get("expires"), "expires"),
        retries=_optional_int(headers, "retries", 0) or 0,
        timelimit=_timelimit(headers.get("timelimit")),
        root_id=_optional_str(headers, "root_id"),
        parent_id=_optional_str(headers, "parent_id"),
        group=_optional_str(headers, "group"),
        group_index=_optional_int(headers, "group_index", None),
        shadow=_optional_str(headers, "shadow"),
        ignore_result=ignore_result,
        reply_to=envelope.reply_to,
        correlation_id=envelope.correlation_id,
        priority=envelope.priority,
        headers=headers,
    )
