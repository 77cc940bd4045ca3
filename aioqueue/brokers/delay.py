"""Broker-side delayed delivery: countdown/ETA tasks wait in the broker, not in a worker.

Why. A worker that receives a task whose ETA is hours away can only hold it, unacknowledged,
until then (Celery does). Such messages pile up in worker memory without bound, fill the
prefetch window, outlive RabbitMQ's consumer timeout (the channel is closed and everything is
delivered again) and, with leases (SQLite), outlive the visibility timeout. So a client
sending a task whose ETA is more than ``broker_delay_threshold`` seconds away hands it to
``Broker.publish_delayed``, and the message reaches its work queue only shortly before its
ETA. It keeps its ``eta`` header: the worker still holds it for the last moments (under a
second on RabbitMQ) and runs it on time. Closer ETAs, and brokers without
``publish_delayed``, keep the old path: straight to the work queue, held by the worker.

RabbitMQ has no delayed delivery of its own (without a plugin), and per-message TTL is no
timer: a message expires only when it reaches the *head* of its queue, so one message with a
long TTL holds back every shorter one behind it. A queue-level TTL (``x-message-ttl``) has
no such problem: every message in the queue waits the same time, so they expire in order.
Hence a binary ladder of queues with fixed TTLs (the scheme of Celery's "native delayed
delivery", with names and a final hop of our own):

* level ``L`` (0 … 27) is a topic exchange and a durable queue, both named ``<prefix>.<L>``
  (``prefix``: ``broker_transport_options["delay_prefix"]``, default ``aioqueue.delay``).
  The queue has ``x-message-ttl`` 2**L seconds, no consumers, and dead-letters into the
  exchange of level ``L-1`` (level 0: into the final exchange ``<prefix>``), keeping the
  message's routing key;
* the routing key is the delay in whole seconds as 28 binary digits, most significant first,
  then the work queue's name: ``0.0.….1.0.1.<queue>`` for 5 s. Exchange ``L`` routes on
  digit ``L``: a 1 goes into queue ``L`` (which waits 2**L s), a 0 goes on at once to the
  next exchange down (an exchange-to-exchange binding). So a message waits in exactly the
  levels of its 1 digits, in total its delay, and is published to the exchange of its
  highest 1 digit (lower levels are declared lazily, only as high as needed);
* the final exchange (topic) binds each work queue with 28 ``*`` words and the queue's name,
  so a key reaches exactly that queue (a ``#.<queue>`` pattern would also deliver
  ``….a.b`` to a queue named ``b``). A queue whose name has a ``*`` or ``#`` word, or is too
  long for a 255-byte key, is not delayed in the broker.

The delay is rounded down to whole seconds, so a message arrives up to a second early and the
worker holds it that long; beyond 2**28 - 1 s (8.5 years) it arrives early and is held (or
delayed again by the worker). The per-message ``expiration`` (from ``expires``) is dropped on
this path, since RabbitMQ would count it in every level: the worker still reads the
``expires`` header and stores ``REVOKED`` for a task that expired while it waited.
Dead-lettering adds RabbitMQ's ``x-death`` header (one entry per level passed); readers
ignore it. The levels are quorum queues, dead-lettering at least once, when
``task_default_queue_type`` is ``"quorum"``, else classic; every app sharing a vhost and a
prefix must agree on that (RabbitMQ refuses a queue redeclared with other arguments).

This module only decides (what to delay, which key, what to declare); the brokers act on it.
SQLite and memory need no ladder: a row with ``not_before``, an in-process timer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..config import Queue

if TYPE_CHECKING:
    from ..config import Settings

__all__ = (
    "DEFAULT_PREFIX",
    "LEVELS",
    "MAX_DELAY",
    "Level",
    "broker_delay",
    "delayable",
    "final_binding_key",
    "level",
    "routing_key",
    "top_level",
)

#: Binary digits of a delay in seconds: levels 0 … 27.
LEVELS = 28
#: The longest delay one trip through the levels gives, in seconds (about 8.5 years).
MAX_DELAY = 2**LEVELS - 1
#: Names of the levels (``<prefix>.<level>``) and of the final exchange (``<prefix>``).
DEFAULT_PREFIX = "aioqueue.delay"

_MAX_KEY = 255  # bytes in an AMQP routing key


def broker_delay(conf: Settings, eta: datetime | None, now: datetime) -> float | None:
    """Seconds the broker should keep a message with ``eta`` before its work queue sees it.

    None when the message goes straight to its queue: no ETA, delays disabled
    (``broker_delay_threshold`` 0 or None), or the ETA at most the threshold away, which the
    worker holds cheaply. A naive ``eta`` is UTC, as in the protocol.
    """
    threshold = conf.broker_delay_threshold
    if eta is None or not threshold:
        return None
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=UTC)
    remaining = (eta - now).total_seconds()
    return remaining if remaining > threshold else None


def delayable(queue: str) -> bool:
    """Whether a message for ``queue`` can travel the levels (its name ends the topic key)."""
    words = queue.split(".")
    return (
        bool(queue)
        and "*" not in words
        and "#" not in words
        and 2 * LEVELS + len(queue.encode()) <= _MAX_KEY
    )


def top_level(seconds: int) -> int:
    """The level a delay of ``seconds`` (1 … MAX_DELAY) enters first: its highest 1 digit."""
    return seconds.bit_length() - 1


def routing_key(seconds: int, queue: str) -> str:
    """``seconds`` as LEVELS binary digits (most significant first), then the queue name."""
    return ".".join(format(seconds, f"0{LEVELS}b")) + "." + queue


def final_binding_key(queue: str) -> str:
    """How the final exchange binds ``queue``: any digits, then exactly this name."""
    return "*." * LEVELS + queue


@dataclass(frozen=True, slots=True)
class Level:
    """One level's declarations.

    ``queue`` is the level's queue, bound to the level's topic exchange (of the same name)
    for the keys whose digit is 1; ``skip_key`` binds ``next_exchange`` to that exchange for
    the keys whose digit is 0. ``next_exchange`` is also where the queue dead-letters.
    """

    queue: Queue
    next_exchange: str
    skip_key: str


def level(prefix: str, number: int, queue_type: str) -> Level:
    """The declarations of level ``number`` (0 … LEVELS - 1) for names under ``prefix``."""
    name = f"{prefix}.{number}"
    next_exchange = prefix if number == 0 else f"{prefix}.{number - 1}"
    arguments: dict[str, Any] = {
        "x-message-ttl": 2**number * 1000,
        "x-dead-letter-exchange": next_exchange,  # no x-dead-letter-routing-key: key kept
    }
    if queue_type == "quorum":
        # At least once: a message leaves a level only once the next one has it.
        arguments.update({
            "x-queue-type": "quorum",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        })
    queue = Queue(
        name, exchange=name, exchange_type="topic", routing_key=_digit_key(number, "1"),
        queue_arguments=arguments,
    )
    return Level(queue, next_exchange, _digit_key(number, "0"))


def _digit_key(number: int, digit: str) -> str:
    """A topic pattern matching keys whose digit for level ``number`` is ``digit``."""
    return "*." * (LEVELS - 1 - number) + digit + ".#"
