"""Where a task message goes: ``task_routes``, ``task_queues`` and the default queue."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any

from .config import Queue, Settings
from .exceptions import ConfigurationError

__all__ = (
    "DEFAULT_DELIVERY_LIMIT",
    "declarations",
    "publish_target",
    "queue_arguments",
    "queue_spec",
    "route",
)

#: ``x-delivery-limit`` of quorum queues when ``task_queue_delivery_limit`` is None and a
#: dead-letter queue is set: RabbitMQ 4's own default. Deliveries that a stopping worker
#: hands back unstarted count too, so a limit far below this would punish restarts.
DEFAULT_DELIVERY_LIMIT = 20


def queue_spec(conf: Settings, name: str) -> Queue:
    """The declared form of a task queue, with every argument the settings add.

    The queue comes from ``task_queues``, else is made as Celery makes it (the default
    queue bound to ``task_default_exchange``, any other to a direct exchange of its own
    name); then ``queue_arguments`` completes its arguments. Clients and workers declare
    through this one function, so they never disagree (RabbitMQ refuses a second
    declaration with other arguments).
    """
    queue = _configured(conf, name)
    arguments = queue_arguments(conf, queue)
    if arguments == dict(queue.queue_arguments):
        return queue
    return dataclasses.replace(queue, queue_arguments=arguments)


def declarations(conf: Settings, name: str) -> list[Queue]:
    """What to declare before using task queue ``name``: the dead-letter queue (if one is
    set) and then the queue itself, so a message dead-lettered at once is not dropped."""
    dead = conf.task_dead_letter_queue
    if dead is None or dead == name:
        return [queue_spec(conf, name)]
    return [queue_spec(conf, dead), queue_spec(conf, name)]


def queue_arguments(conf: Settings, queue: Queue) -> dict[str, Any]:
    """``queue``'s arguments completed from the settings; arguments it sets itself win.

    * quorum queues get ``x-delivery-limit``: ``task_queue_delivery_limit``, or when that is
      None, ``DEFAULT_DELIVERY_LIMIT`` if a dead-letter queue is set (and no limit
      otherwise: a message past the limit would be dropped, and the plain declaration is
      the one stock Celery makes). 0 means no limit;
    * with ``task_dead_letter_queue``, every queue but that one dead-letters into it through
      the default exchange. Quorum queues then dead-letter at least once (the message stays
      in its queue until the dead-letter queue has it), which RabbitMQ allows only with
      ``x-overflow: reject-publish``.

    The dead-letter queue itself gets neither: it keeps what it holds.
    """
    arguments = dict(queue.queue_arguments)
    dead = conf.task_dead_letter_queue
    if queue.name == dead:
        return arguments
    quorum = arguments.get("x-queue-type") == "quorum"
    if quorum and "x-delivery-limit" not in arguments:
        limit = conf.task_queue_delivery_limit
        if limit is None and dead is not None:
            limit = DEFAULT_DELIVERY_LIMIT
        if limit:
            arguments["x-delivery-limit"] = limit
    if dead is not None and "x-dead-letter-exchange" not in arguments:
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = dead
        if quorum:
            arguments.setdefault("x-dead-letter-strategy", "at-least-once")
            arguments.setdefault("x-overflow", "reject-publish")
    return arguments


def _configured(conf: Settings, name: str) -> Queue:
    """A queue as listed in ``task_queues`` or as Celery creates it (without our additions)."""
    for queue in conf.task_queues or ():
        if queue.name == name:
            return queue
    if name == conf.task_default_queue:
        return Queue(
            name, exchange=conf.exchange, routing_key=conf.routing_key,
            queue_arguments=_typed(conf.task_default_queue_type),
        )
    return Queue(name, queue_arguments=_typed(conf.task_create_missing_queue_type))


def _typed(queue_type: str) -> dict[str, Any]:
    # Celery sends no argument for classic queues; the declarations must be identical.
    return {} if queue_type == "classic" else {"x-queue-type": queue_type}


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
