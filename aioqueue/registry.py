"""URL scheme -> broker or result store class, imported only when its scheme is used.

Third parties add schemes through the ``aioqueue.brokers`` and ``aioqueue.results``
entry-point groups (``name = "package.module:Class"``).
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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


# scheme://user:password@  or  scheme://token@ : the user-info of every URL in a text. The
# password may hold '@' and ';' (the last '@' before the path wins); ';' or whitespace ends
# a user name, so Celery's failover lists ("amqp://u:p@h1//;amqp://u:p@h2//") mask each URL.
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/?#\s;]*)(?::(?P<password>[^/?#\s]*))?@"
)
# ?password=... / &api_key=... : query parameters whose name says they hold a secret.
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&][^=&#\s]*(?:pass|secret|token|key|api|signature)[^=&#\s]*=)[^&#\s;]*",
    re.IGNORECASE,
)


def _mask_userinfo(match: re.Match[str]) -> str:
    scheme, user, password = match.group("scheme", "user", "password")
    if password is None:  # scheme://token@host: the user-info alone may be the secret
        return f"{scheme}**@" if user else match.group(0)
    return f"{scheme}{user}:**@"


def mask_password(url: object) -> str:
    """The text with every URL's password, token or secret query parameter as ``**``.

    For banners, logs and exception texts. Takes one URL, a ``;``-separated failover list or
    any text holding URLs, and never raises: anything else is masked as its ``str()``.
    """
    try:
        text = url if isinstance(url, str) else str(url)
    except Exception:
        return f"<unprintable {type(url).__name__}>"
    text = _USERINFO.sub(_mask_userinfo, text)
    return _SECRET_QUERY.sub(lambda m: m.group("name") + "**", text)
