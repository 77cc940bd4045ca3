"""Where a task message goes: ``task_routes``, ``task_queues`` and the default queue."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from .config import Queue, Settings
from .exceptions import ConfigurationError

__all__ = ("publish_target", "queue_spec", "route")


def queue_spec(conf: Settings, name: str) -> Queue:
    """The declared form of a queue: from ``task_queues``, or as Celery creates one."""
    for queue in conf.task_queues or ():
        if queue.name == name:
            return queue
    if name == conf.task_default_queue:
        return Queue(name, exchange=conf.exchange, routing_key=conf.routing_key)
    return Queue(name)


def route(conf: Settings, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Routing options for a task from ``task_routes`` (a dict, a callable, or a list of them)."""
    routes = conf.task_routes
    if not routes:
        return {}
    for router in routes if isinstance(routes, list | tuple) else [routes]:
        found = _apply_router(router, name, args, kwargs)
        if found:
            return found
    return {}


def publish_target(
    spec: Queue, exchange: str | None, routing_key: str | None
) -> tuple[str, str]:
    """``(exchange, routing_key)`` to publish to, as the stock client picks them.

    A queue on a direct exchange is reached through the default exchange with the queue name
    as key (Celery 5 does this unless an exchange is given); other exchanges get the key.
    """
    if exchange is None and spec.exchange_type == "direct":
        return "", spec.name
    return (spec.exchange_name if exchange is None else exchange), (
        routing_key or spec.binding_key
    )


def _apply_router(
    router: Any, name: str, args: Sequence[Any], kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    if callable(router):
        found = router(name, args, kwargs, {})
    elif isinstance(router, dict):
        found = router.get(name)
        if found is None:
            found = next(
                (v for pattern, v in router.items() if fnmatch.fnmatchcase(name, pattern)), None
            )
    else:
        raise ConfigurationError(f"task_routes entries must be dicts or callables, not {router!r}")
    if found is None:
        return None
    if isinstance(found, str):
        return {"queue": found}
    return dict(found)
