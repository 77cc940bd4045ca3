"""Every size a message can make the worker allocate is bounded (issue 13, item 1)."""

from __future__ import annotations

import bz2
import json
import lzma
import subprocess
import sys
import zlib

import pytest

from aioqueue import AioQueue
from aioqueue.exceptions import ConfigurationError, SerializationError
from aioqueue.protocol import Envelope, MessageLimits, MessageTooLarge, decode_task, encode_task
from aioqueue.serialization import DecompressedTooLarge, compress, decompress

LIMITS = MessageLimits()


def gzip_bomb(inflated: int) -> bytes:
    """A zlib stream of ``inflated`` zero bytes, built without holding them (~1/1000 size)."""
    packer = zlib.compressobj(9)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(inflated >> 20)]
    parts.append(packer.flush())
    return b"".join(parts)


def task_envelope(body: bytes, **headers: object) -> Envelope:
    return Envelope(body, {"task": "t.add", "id": "limit-1", **headers})


def test_defaults_and_checks() -> None:
    conf = AioQueue("t").conf
    assert MessageLimits.from_conf(conf) == LIMITS
    assert conf.worker_max_decompressed_size == 64 << 20
    with pytest.raises(ConfigurationError, match="worker_max_body_depth"):
        conf.worker_max_body_depth = 0
    with pytest.raises(ConfigurationError, match="worker_max_message_size"):
        conf.update(worker_max_message_size="big")


def test_ordinary_messages_pass() -> None:
    for method in ("gzip", "zlib", "bzip2", "lzma"):
        env = encode_task(task="t.add", task_id="ok", args=[[{"a": [1, 2]}]], kwargs={"k": "v"},
                          compression=method)
        assert decode_task(env, limits=LIMITS).args == [[{"a": [1, 2]}]]


def test_body_as_received_is_checked_first() -> None:
    limits = MessageLimits(message_size=1000)
    # Not even valid JSON: the size is refused before any decoding.
    with pytest.raises(MessageTooLarge, match=r"worker_max_message_size \(1000\)"):
        decode_task(task_envelope(b"x" * 1001), limits=limits)
    decode_task(task_envelope(b"[[], {}, {}]" + b" " * 988), limits=limits)


@pytest.mark.parametrize(
    ("compressor", "method"),
    [(zlib.compress, "gzip"), (bz2.compress, "bzip2"), (lzma.compress, "lzma")],
)
def test_each_codec_stops_at_the_limit(compressor: object, method: str) -> None:
    inner = json.dumps([["x" * 5000], {}, {}]).encode()
    data, mime = compress(inner, method)
    with pytest.raises(DecompressedTooLarge, match="worker_max_decompressed_size"):
        decode_task(task_envelope(data, compression=mime),
                    limits=MessageLimits(decompressed_size=4096))
    assert decode_task(task_envelope(data, compression=mime), limits=LIMITS).args == ["x" * 5000]


def test_disallowed_content_is_refused_before_it_is_inflated() -> None:
    from aioqueue.exceptions import ContentDisallowed

    envelope = task_envelope(gzip_bomb(64 << 20), compression="application/x-gzip")
    envelope.content_type = "application/x-python-serialize"
    with pytest.raises(ContentDisallowed):
        decode_task(envelope, frozenset({"application/json"}),
                    MessageLimits(decompressed_size=10))  # would be DecompressedTooLarge


def test_gzip_framing_and_several_members() -> None:
    import gzip

    two = gzip.compress(b"[[1], ") + gzip.compress(b"{}, {}]")
    assert decompress(two, "application/x-gzip", 100) == b"[[1], {}, {}]"
    with pytest.raises(DecompressedTooLarge):
        decompress(two, "application/x-gzip", 10)


def test_truncated_stream_is_an_error() -> None:
    from aioqueue.exceptions import SerializationError

    data = zlib.compress(b"[[1], {}, {}]" * 100)
    with pytest.raises(SerializationError, match="ended"):
        decompress(data[:-8], "application/x-gzip", 1 << 20)


def test_header_count_and_size() -> None:
    body = b"[[], {}, {}]"
    many = {f"h{i}": i for i in range(300)}
    with pytest.raises(MessageTooLarge, match=r"worker_max_header_count \(256\)"):
        decode_task(task_envelope(body, **many), limits=LIMITS)
    nested = {"stamps": {f"s{i}": [i, i] for i in range(100)}}
    with pytest.raises(MessageTooLarge, match="worker_max_header_count"):
        decode_task(task_envelope(body, **nested), limits=LIMITS)
    with pytest.raises(MessageTooLarge, match="worker_max_header_size"):
        decode_task(task_envelope(body, big="x" * (1 << 20)), limits=LIMITS)
    with pytest.raises(MessageTooLarge, match="worker_max_header_size"):
        decode_task(task_envelope(body, big=[b"y" * (600 << 10), "z" * (600 << 10)]),
                    limits=LIMITS)
    with pytest.raises(MessageTooLarge, match="worker_max_header_size"):
        decode_task(task_envelope(body, a=b"y" * (600 << 10), b={"k": "z" * (600 << 10)}),
                    limits=LIMITS)
    # What Celery sends passes, nested entries included.
    decode_task(encode_task(task="t.add", task_id="i", args=[1], kwargs={}), limits=LIMITS)


def test_body_depth() -> None:
    deep = "[" * 70 + "]" * 70
    body = f"[[{deep}], {{}}, {{}}]".encode()
    with pytest.raises(MessageTooLarge, match=r"worker_max_body_depth \(64\)"):
        decode_task(task_envelope(body), limits=LIMITS)
    decode_task(task_envelope(body), limits=MessageLimits(body_depth=80))
    # Past orjson's own limit (1024) the body is still refused, not a crash.
    deeper = ("[" * 5000 + "]" * 5000).encode()
    from aioqueue.exceptions import SerializationError

    with pytest.raises(SerializationError, match=r"(?i)depth|recursion"):
        decode_task(task_envelope(b"[[" + deeper + b"], {}, {}]"), limits=LIMITS)


_MEASURE = r"""
import resource, sys, time, zlib
sys.path[:0] = [{root!r}]
from tests.unit.test_message_limits import gzip_bomb, task_envelope
from aioqueue.protocol import MessageLimits, decode_task
from aioqueue.serialization import DecompressedTooLarge
bomb = gzip_bomb(1 << 30)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    decode_task(task_envelope(bomb, compression="application/x-gzip"), limits=MessageLimits())
except DecompressedTooLarge:
    pass
else:
    raise SystemExit("not rejected")
took = time.perf_counter() - started
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
print(len(bomb), took, grew)
"""


def test_gzip_bomb_costs_about_the_limit_not_a_gibibyte() -> None:
    """A ~1 MB message inflating to 1 GiB: rejected quickly, peak RSS grows by ~the limit."""
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE.format(root=root)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    size, took, grew_kib = int(out[0]), float(out[1]), int(out[2])
    print(f"bomb {size} bytes rejected in {took * 1000:.0f} ms, peak RSS +{grew_kib >> 10} MiB")
    assert size < 2 << 20
    assert took < 5
    # About the 64 MiB limit (one buffer, no copy of it), far less than the 1 GiB it inflates to.
    assert grew_kib < 100 << 10


def test_an_lzma_stream_may_not_ask_for_a_huge_window() -> None:
    """An xz header can ask for a dictionary of up to 1.5 GiB, allocated before any output:
    the decompressor's memory is capped, so such a message is refused, not obeyed."""
    huge_window = lzma.compress(
        b"x", format=lzma.FORMAT_XZ,
        filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1536 * 1024 * 1024}],
    )
    with pytest.raises(SerializationError):
        decompress(huge_window, "application/x-lzma", limit=1024)
