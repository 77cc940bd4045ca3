"""URL scheme -> broker or result store class, imported only when its scheme is used.

Third parties add schemes through the ``aioqueue.brokers`` and ``aioqueue.results``
entry-point groups (``name = "package.module:Class"``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .brokers.base import Broker
    from .results.base import ResultStore

__all__ = ("BROKERS", "RESULT_STORES", "broker_class", "mask_password", "result_store_class")

BROKERS: dict[str, str] = {
    "amqp": "aioqueue.brokers.amqp:AmqpBroker",
    "amqps": "aioqueue.brokers.amqp:AmqpBroker",
    "pyamqp": "aioqueue.brokers.amqp:AmqpBroker",
    "memory": "aioqueue.brokers.memory:MemoryBroker",
    "sqlite": "aioqueue.brokers.sqlite:SqliteBroker",
}

RESULT_STORES: dict[str, str] = {
    "redis": "aioqueue.results.redis:RedisResultStore",
    "rediss": "aioqueue.results.redis:RedisResultStore",
    "rpc": "aioqueue.results.rpc:RpcResultStore",
    "memory": "aioqueue.results.memory:MemoryResultStore",
    "sqlite": "aioqueue.results.sqlite:SqliteResultStore",
}


def scheme_of(url: str) -> str:
    return urlsplit(url).scheme


def _resolve(url: str, table: dict[str, str], group: str, kind: str) -> Any:
    scheme = scheme_of(url)
    target = table.get(scheme)
    if target is None:
        for ep in entry_points(group=group):
            if ep.name == scheme:
                return ep.load()
        known = sorted(set(table) | {ep.name for ep in entry_points(group=group)})
        raise ConfigurationError(
            f"unknown {kind} URL scheme {scheme!r} in {mask_password(url)!r}; "
            f"known schemes: {', '.join(known)}"
        )
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def broker_class(url: str) -> type[Broker]:
    cls: type[Broker] = _resolve(url, BROKERS, "aioqueue.brokers", "broker")
    return cls


def result_store_class(url: str) -> type[ResultStore]:
    cls: type[ResultStore] = _resolve(url, RESULT_STORES, "aioqueue.results", "result backend")
    return cls


def mask_password(url: str) -> str:
    """The URL with its password replaced by ``**``, for banners and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:**@{netloc[-1]}"))
