"""Content types on the wire: JSON by default (orjson), msgpack and pickle when opted in.

JSON follows kombu's conventions so stock Celery reads what we write: values JSON has no
type for travel as ``{"__type__": T, "__value__": V}`` envelopes, and are turned back on read.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import json
import lzma
import re
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import orjson

from .exceptions import ContentDisallowed, SerializationError

__all__ = (
    "SERIALIZERS",
    "DecompressedTooLarge",
    "Serializer",
    "accepted_types",
    "check_accepted",
    "compress",
    "decompress",
    "dumps",
    "loads",
)

_DUMP_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"__type__": "datetime", "__value__": value.isoformat()}
    if isinstance(value, date):
        return {"__type__": "date", "__value__": value.isoformat()}
    if isinstance(value, time):
        return {"__type__": "time", "__value__": value.isoformat()}
    if isinstance(value, Decimal):
        return {"__type__": "decimal", "__value__": str(value)}
    if isinstance(value, bytes | bytearray):
        try:
            return {"__type__": "bytes", "__value__": bytes(value).decode("utf-8")}
        except UnicodeDecodeError:
            return {"__type__": "base64", "__value__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_SCALARS = (str, int, float, bool, type(None))


def _wrap_uuids(value: Any) -> Any:
    """orjson writes UUIDs natively as strings; kombu wants an envelope, so convert first."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, uuid.UUID):
        return {"__type__": "uuid", "__value__": {"hex": value.hex}}
    if isinstance(value, list | tuple):
        if all(isinstance(v, _SCALARS) for v in value):
            return value
        return [_wrap_uuids(v) for v in value]
    if isinstance(value, dict):
        return {k: _wrap_uuids(v) for k, v in value.items()}
    return value


def _needs_wrapping(value: Any) -> bool:
    """Whether ``_wrap_uuids`` would change anything: a UUID somewhere, or a container
    subclass it would copy. Walks without allocating, since most task bodies have neither."""
    kind = type(value)
    if kind is list or kind is tuple:
        for item in value:
            if not isinstance(item, _SCALARS) and _needs_wrapping(item):
                return True
        return False
    if kind is dict:
        for item in value.values():
            if not isinstance(item, _SCALARS) and _needs_wrapping(item):
                return True
        return False
    return isinstance(value, uuid.UUID | list | tuple | dict)


def _json_dumps(obj: Any) -> bytes:
    if _needs_wrapping(obj):
        obj = _wrap_uuids(obj)
    return orjson.dumps(obj, default=_json_default, option=_DUMP_OPTIONS)


_ENVELOPE_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "time": time.fromisoformat,
    "decimal": Decimal,
    "uuid": lambda v: uuid.UUID(hex=v["hex"]),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": base64.b64decode,
}


def _unwrap(value: Any) -> Any:
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 2 and "__type__" in value and "__value__" in value:
            kind = value["__type__"]
            decoder = _ENVELOPE_DECODERS.get(kind)
            if decoder is None:
                raise SerializationError(f"unknown JSON envelope type {kind!r}")
            return decoder(value["__value__"])
        return {k: _unwrap(v) for k, v in value.items()}
    return value


# orjson reads an integer outside the 64-bit range as a float (its digits are lost) and
# refuses NaN/Infinity; stock JSON writes both. Such an integer has 19 digits or more, so
# a body with a run of 19 digits goes to the standard library parser, which is exact.
_LONG_DIGITS = re.compile(rb"\d{19}")


def _json_loads(data: bytes | bytearray) -> Any:
    if _LONG_DIGITS.search(data) is not None:
        value = json.loads(data)
    else:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            value = json.loads(data)  # NaN, Infinity
    if b'"__type__"' in data:
        value = _unwrap(value)
    return value


def _msgpack_dumps(obj: Any) -> bytes:
    import msgpack  # optional extra: aioqueue[msgpack]

    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _msgpack_loads(data: bytes | bytearray) -> Any:
    import msgpack

    return msgpack.unpackb(data, raw=False)


def _pickle_dumps(obj: Any) -> bytes:
    import pickle

    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _pickle_loads(data: bytes | bytearray) -> Any:
    import pickle

    return pickle.loads(data)


@dataclass(frozen=True, slots=True)
class Serializer:
    name: str
    content_type: str
    content_encoding: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes | bytearray], Any]


SERIALIZERS: dict[str, Serializer] = {
    s.name: s
    for s in (
        Serializer("json", "application/json", "utf-8", _json_dumps, _json_loads),
        Serializer("msgpack", "application/x-msgpack", "binary", _msgpack_dumps, _msgpack_loads),
        Serializer(
            "pickle", "application/x-python-serialize", "binary", _pickle_dumps, _pickle_loads
        ),
    )
}
_BY_CONTENT_TYPE = {s.content_type: s for s in SERIALIZERS.values()}


def _serializer(name: str) -> Serializer:
    try:
        return SERIALIZERS[name]
    except KeyError:
        raise SerializationError(
            f"unknown serializer {name!r}; known: {', '.join(sorted(SERIALIZERS))}"
        ) from None


def accepted_types(accept_content: Iterable[str]) -> frozenset[str]:
    """Turn ``accept_content`` (names such as ``json`` or MIME types) into MIME types."""
    types = set()
    for item in accept_content:
        types.add(SERIALIZERS[item].content_type if item in SERIALIZERS else item)
    return frozenset(types)


def dumps(obj: Any, serializer: str = "json") -> tuple[bytes, str, str]:
    """Serialize ``obj``; returns ``(body, content_type, content_encoding)``."""
    s = _serializer(serializer)
    try:
        return s.dumps(obj), s.content_type, s.content_encoding
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"cannot serialize with {serializer}: {exc}") from exc


def check_accepted(content_type: str, accept: frozenset[str] | None) -> None:
    """Raise ``ContentDisallowed`` for a content type outside ``accept`` (None: any)."""
    if accept is not None and content_type not in accept:
        raise ContentDisallowed(
            f"refusing content of type {content_type!r}; accept_content allows "
            f"{', '.join(sorted(accept))}"
        )


def loads(data: bytes | bytearray, content_type: str, accept: frozenset[str] | None = None) -> Any:
    """Deserialize a body of ``content_type``; refuses types outside ``accept``."""
    check_accepted(content_type, accept)
    s = _BY_CONTENT_TYPE.get(content_type)
    if s is None:
        raise ContentDisallowed(f"no serializer for content type {content_type!r}")
    try:
        return s.loads(data)
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"cannot decode {content_type} body: {exc}") from exc


_COMPRESSORS: dict[str, tuple[str, Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    "gzip": ("application/x-gzip", zlib.compress, zlib.decompress),
    "zlib": ("application/x-gzip", zlib.compress, zlib.decompress),
    "bzip2": ("application/x-bz2", bz2.compress, bz2.decompress),
    "lzma": ("application/x-lzma", lzma.compress, lzma.decompress),
}
_DECOMPRESSORS = {mime: unpack for mime, _, unpack in _COMPRESSORS.values()}


def compress(data: bytes, method: str) -> tuple[bytes, str]:
    """Compress a body; returns the bytes and the MIME type for the ``compression`` header."""
    try:
        mime, pack, _ = _COMPRESSORS[method]
    except KeyError:
        raise SerializationError(
            f"unknown compression {method!r}; known: {', '.join(sorted(_COMPRESSORS))}"
        ) from None
    return pack(data), mime


class DecompressedTooLarge(SerializationError):
    """A compressed body inflates past the limit it was given (a decompression bomb)."""


_LZMA_MEMLIMIT = 128 * 1024 * 1024  # the most an lzma stream may ask for (xz -9 needs 64 MiB)

# Streaming decompressors: ``decompress(data, max_length)`` stops after ``max_length`` bytes
# of output, so a bomb costs about the limit, not what it would inflate to.
_STREAMING: dict[Callable[[bytes], bytes], Callable[[], Any]] = {
    zlib.decompress: lambda: zlib.decompressobj(32 + zlib.MAX_WBITS),  # zlib or gzip framing
    bz2.decompress: bz2.BZ2Decompressor,
    # Its window comes on top of the output: a hostile header could ask for 1.5 GiB.
    lzma.decompress: lambda: lzma.LZMADecompressor(memlimit=_LZMA_MEMLIMIT),
}


_STEP = 1 << 20  # output per call: a bomb is stopped within the limit, not a block past it


def _bounded_decompress(
    unpack: Callable[[bytes], bytes], data: bytes, limit: int
) -> bytes | bytearray:
    """Inflate into one growing buffer, a MiB at a time, and stop once it exceeds ``limit``:
    a bomb costs about ``limit`` bytes. The buffer is returned as is (every ``loads`` reads a
    bytearray), so a body near the limit is not copied once more at the end."""
    out = bytearray()
    zlib_framing = unpack is zlib.decompress
    while True:  # a stream may hold several members (gzip, bzip2, xz), as the one-shot calls read
        decompressor = _STREAMING[unpack]()
        chunk: bytes = decompressor.decompress(data, min(_STEP, limit - len(out) + 1))
        while True:
            out += chunk
            if len(out) > limit:
                raise DecompressedTooLarge(
                    f"body inflates past worker_max_decompressed_size ({limit} bytes)"
                )
            if decompressor.eof:
                break
            if zlib_framing:  # input left over when max_length stopped it
                pending = decompressor.unconsumed_tail
                if not pending and not chunk:
                    raise SerializationError("compressed data ended before the end of the stream")
            else:
                if decompressor.needs_input:
                    raise SerializationError("compressed data ended before the end of the stream")
                pending = b""
            chunk = decompressor.decompress(pending, min(_STEP, limit - len(out) + 1))
        data = decompressor.unused_data
        if not data:
            return out


def decompress(data: bytes, mime: str, limit: int | None = None) -> bytes | bytearray:
    """Undo ``compress`` given the ``compression`` header's MIME type (or method name).

    With ``limit``, the output is inflated in one streaming pass that stops once it exceeds
    ``limit`` bytes (``DecompressedTooLarge``), having allocated about ``limit`` bytes; it
    returns a bytearray then.
    """
    unpack = _DECOMPRESSORS.get(mime) or (_COMPRESSORS[mime][2] if mime in _COMPRESSORS else None)
    if unpack is None:
        raise SerializationError(f"unknown compression {mime!r}")
    try:
        if limit is not None:
            return _bounded_decompress(unpack, data, limit)
        if unpack is zlib.decompress and data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        return unpack(data)
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"cannot decompress body ({mime}): {exc}") from exc
