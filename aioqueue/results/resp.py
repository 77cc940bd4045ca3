"""RESP2/RESP3 for the Redis result store's own connections: the one reply parser, and
the encoding of commands.

redis-py parses one reply per ``read_response()`` call: a timeout context, several
``readline``/``readexactly`` awaits, and on RESP3 a debug line built for every pushed
message whatever the log level. With thousands of results arriving at once that was most of
a client's cost of waiting. Our own connection (:mod:`aioqueue.results.redis_wire`) instead
hands whatever the socket delivered to ``parse``, which returns every complete reply in it
(and what is left over, and how much the next reply needs at least).

Arrays and sets become lists, RESP3 pushes ``Push`` lists (so they can be told from command
replies), maps dicts, bulk and simple strings bytes, null None, integers int; an error reply
becomes a ``ReplyError`` value. RESP3 attributes are skipped. ``command`` writes a command
(an array of bulk strings).
"""

from __future__ import annotations

from typing import Any

__all__ = ("Push", "ReplyError", "command", "parse")


class ReplyError(Exception):
    """An error reply (``-ERR ...``), returned as a value, not raised."""


class Push(list[Any]):
    """A RESP3 push (pub/sub messages and confirmations), as opposed to a command's reply."""


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes (at least up to ``needed``)."""

    def __init__(self, needed: int) -> None:
        self.needed = needed


_AGGREGATES = frozenset(b"*>~")  # array, push, set
_PUSH = ord(">")


def command(*args: bytes) -> bytes:
    """One command as RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def parse(data: bytes) -> tuple[list[Any], bytes, int]:
    """Every complete reply at the start of ``data``, the bytes after the last one, and how
    many bytes the next reply needs at least (so a large one is joined once, not per read).
    """
    replies: list[Any] = []
    pos = 0
    size = len(data)
    while pos < size:
        try:
            head = data[pos:pos + 4]
            if head == b">3\r\n" or head == b"*3\r\n":  # pub/sub: messages, confirmations
                value, pos_after = _three(data, pos + 4, head == b">3\r\n")
            else:
                value, pos_after = _reply(data, pos)
        except _Incomplete as incomplete:
            return replies, data[pos:], incomplete.needed - pos
        replies.append(value)
        pos = pos_after
    return replies, data[pos:], 1


def _three(data: bytes, pos: int, push: bool) -> tuple[list[Any], int]:
    """The items of a three-item array or push, bulk strings and integers read in line
    (``_reply`` does the rest): the shape of every pub/sub message and confirmation."""
    items: list[Any] = Push() if push else []
    for _ in range(3):
        kind = data[pos:pos + 1]
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete(len(data) + 1)
        if kind == b"$":
            length = int(data[pos + 1:end])
            if length >= 0:
                start = end + 2
                pos = start + length + 2
                if len(data) < pos:
                    raise _Incomplete(pos)
                items.append(data[start:pos - 2])
                continue
        elif kind == b":":
            items.append(int(data[pos + 1:end]))
            pos = end + 2
            continue
        item, pos = _reply(data, pos)
        items.append(item)
    return items, pos


def _reply(data: bytes, pos: int) -> tuple[Any, int]:
    end = data.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete(len(data) + 1)
    start = pos
    kind = data[pos]
    line = data[pos + 1:end]
    pos = end + 2
    if kind == 36:  # $ bulk string
        length = int(line)
        if length < 0:
            return None, pos
        stop = pos + length
        if len(data) < stop + 2:
            raise _Incomplete(stop + 2)
        return data[pos:stop], stop + 2
    if kind in _AGGREGATES:
        count = int(line)
        if count < 0:
            return None, pos
        items: list[Any] = Push() if kind == _PUSH else []
        for _ in range(count):
            item, pos = _reply(data, pos)
            items.append(item)
        return items, pos
    if kind == 43:  # + simple string
        return line, pos
    if kind == 58 or kind == 40:  # : integer, ( big number
        return int(line), pos
    if kind == 95:  # _ null
        return None, pos
    if kind == 45:  # - error
        return ReplyError(line.decode("utf-8", "replace")), pos
    if kind == 37 or kind == 124:  # % map, | attribute (then the reply it describes)
        entries = {}
        for _ in range(int(line)):
            key, pos = _reply(data, pos)
            value, pos = _reply(data, pos)
            entries[tuple(key) if isinstance(key, list) else key] = value
        return (entries, pos) if kind == 37 else _reply(data, pos)
    if kind == 44:  # , double
        return float(line), pos
    if kind == 35:  # # boolean
        return line == b"t", pos
    if kind == 61 or kind == 33:  # = verbatim string, ! bulk error
        length = int(line)
        stop = pos + length
        if len(data) < stop + 2:
            raise _Incomplete(stop + 2)
        text = data[pos:stop]
        if kind == 33:
            return ReplyError(text.decode("utf-8", "replace")), stop + 2
        return text[4:], stop + 2  # after "txt:"
    raise ValueError(f"not a RESP reply: {data[start:end + 2]!r}")
