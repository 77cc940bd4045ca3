"""The attributes of aiormq's ``Channel`` that aiormq does not document, read only here.

The fast paths (publisher batching, ack batching, confirms settled by our frame stream) use
them on the channels aioqueue opens itself, never on anybody else's: the connection's write
queue (to write our own frames, several messages or settles in one write), the confirmation
futures and the delivery tag counter (to number a batch of publishes and settle their
confirms), the channel's lock and its largest body frame. They are public names on aiormq's
class, but not its documented API, so pyproject bounds aiormq to the minor version they were
read on (docs/design.md, "What we rely on in our dependencies"). ``supports`` says whether a
channel has them all; the broker checks it and warns once, and uses aiormq's public calls,
when one is missing. ``tests/integration/test_fast_paths.py`` fails if they stop applying.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiormq.abc import AbstractChannel, ChannelFrame

__all__ = (
    "channel_lock",
    "confirmations",
    "give_back_delivery_tags",
    "max_body_size",
    "supports",
    "take_delivery_tags",
    "write_queue",
)

_ATTRIBUTES = ("confirmations", "delivery_tag", "write_queue", "lock", "max_content_size",
               "number", "create_future", "closing")


def supports(channel: AbstractChannel) -> bool:
    """Whether ``channel`` is in confirm mode and has every attribute read here."""
    return bool(getattr(channel, "publisher_confirms", False)) and all(
        hasattr(channel, name) for name in _ATTRIBUTES
    )


def write_queue(channel: AbstractChannel) -> asyncio.Queue[ChannelFrame]:
    """The connection's write queue: a ``ChannelFrame`` put here goes out as one write."""
    queue: asyncio.Queue[ChannelFrame] = _any(channel).write_queue
    return queue


def confirmations(channel: AbstractChannel) -> dict[int, Any]:
    """Delivery tag -> the future aiormq (or our frame stream) settles with its confirm."""
    futures: dict[int, Any] = _any(channel).confirmations
    return futures


def take_delivery_tags(channel: AbstractChannel, count: int) -> int:
    """The next ``count`` delivery tags of a confirming channel (RabbitMQ numbers its
    publishes the same way); returns the first."""
    seen = _any(channel)
    first: int = seen.delivery_tag + 1
    seen.delivery_tag = first + count - 1
    return first


def give_back_delivery_tags(channel: AbstractChannel, first: int) -> None:
    """Tags from ``first`` on were never sent: the next publish gets them again."""
    _any(channel).delivery_tag = first - 1


def channel_lock(channel: AbstractChannel) -> asyncio.Lock:
    """The lock aiormq holds while it writes on the channel (raises once it is closed)."""
    lock: asyncio.Lock = _any(channel).lock
    return lock


def max_body_size(channel: AbstractChannel) -> int:
    """The largest body frame's payload, from the connection's negotiated frame size."""
    size: int = _any(channel).max_content_size
    return size


def _any(channel: AbstractChannel) -> Any:
    """The channel, for attributes aiormq's abstract class does not declare."""
    return channel
