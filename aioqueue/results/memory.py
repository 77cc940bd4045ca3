"""``memory://``: a result store inside one process, shared by apps with the same URL.

Records are serialized on store and decoded on read, exactly like a real store, so a value
that could not travel through Redis fails here too. ``wait`` wakes on the write, no polling.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from .. import states
from .base import ResultStore, raise_timeout

if TYPE_CHECKING:
    from ..brokers.base import Broker
    from ..config import Settings

__all__ = ("MemoryResultStore", "reset")


class _Records:
    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, float | None]] = {}
        self.waiters: dict[str, set[asyncio.Event]] = {}


_STORES: dict[str, _Records] = {}


def reset(url: str | None = None) -> None:
    """Forget the records of one store URL (or all of them); for tests."""
    if url is None:
        _STORES.clear()
    else:
        _STORES.pop(url, None)


class MemoryResultStore(ResultStore):
    """In-process result store; see the module docstring."""

    def __init__(self, url: str, settings: Settings, broker: Broker | None = None) -> None:
        super().__init__(url, settings, broker)
        self._records = _STORES.setdefault(url, _Records())

    async def connect(self) -> None:
        self._records = _STORES.setdefault(self.url, _Records())

    async def close(self) -> None:
        pass

    async def store(
        self, task_id: str, meta: dict[str, Any], *, reply_to: str | None = None
    ) -> None:
        data = self.encode(meta)
        current = await self.get(task_id)
        if current is not None and current.get("status") == states.SUCCESS:
            return  # a SUCCESS is never overwritten
        deadline = time.monotonic() + self.expires if self.expires else None
        self._records.data[task_id] = (data, deadline)
        for event in self._records.waiters.get(task_id, ()):
            event.set()

    async def get(self, task_id: str) -> dict[str, Any] | None:
        record = self._records.data.get(task_id)
        if record is None:
            return None
        data, deadline = record
        if deadline is not None and deadline <= time.monotonic():
            del self._records.data[task_id]
            return None
        return self.decode(data)

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        event = asyncio.Event()
        waiters = self._records.waiters.setdefault(task_id, set())
        waiters.add(event)
        try:
            with raise_timeout(task_id, timeout):
                while True:
                    event.clear()
                    meta = await self.get(task_id)
                    if meta is not None and meta.get("status") in states.READY_STATES:
                        return meta
                    await event.wait()
        finally:
            waiters.discard(event)
            if not waiters:
                self._records.waiters.pop(task_id, None)

    async def forget(self, task_id: str) -> None:
        self._records.data.pop(task_id, None)
