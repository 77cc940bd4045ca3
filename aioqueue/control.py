"""Remote control, as Celery's ``app.control``: revoke tasks on every worker.

Commands travel as Celery's *pidbox* broadcasts (``reference/celery-protocol.md`` §2.2), so a
stock Celery client's ``app.control.revoke(id)`` reaches aioqueue workers and
``app.control.revoke(id)`` here reaches stock Celery workers. One command is one message on
the non-durable fanout exchange ``celery.pidbox``, routing key ``""``::

    headers  {"clock": 1, "expires": 1795558998.66}      # unix time: send time + 1 s
    body     {"method": "revoke",
              "arguments": {"task_id": "10b4266e-...", "terminate": false,
                            "signal": "SIGTERM"},
              "destination": null, "pattern": null, "matcher": null}

in ``task_serializer`` (JSON by default), ``delivery_mode`` 2, priority 0. Each worker
consumes its own queue ``<hostname>.celery.pidbox`` (non-durable, auto-delete,
``x-message-ttl`` 300000, ``x-expires`` 10000) bound to that exchange.

* :class:`Control` (``app.control``) sends commands; ``AsyncResult.revoke()`` uses it.
* :class:`Revoked` is the worker's bounded memory of revoked ids.
* :class:`ControlListener` is the worker's side: it consumes the pidbox queue and calls
  ``on_revoke(ids, terminate)`` for every revoke addressed to this worker.

Intended use in the worker::

    revoked = Revoked()

    def on_revoke(ids: list[str], terminate: bool) -> None:   # called on the event loop
        revoked.add(ids)
        if terminate:
            ...  # cancel the running task of each id (its cancel scope)

    listener = ControlListener(app, hostname, on_revoke)
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)  # returns once the queue is declared and consumed
        ...  # a task message whose id is in `revoked`: store REVOKED
             # (TaskRevokedError("revoked")) and ack it, as Celery does
        tg.cancel_scope.cancel()  # stops the listener; cancel it before closing the app

Revocations live in the worker's memory only, as in Celery (without ``--statedb``): a
worker started after the broadcast does not know about it.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from .config import Queue
from .exceptions import AioQueueError
from .protocol import Envelope
from .serialization import accepted_types, dumps, loads

if TYPE_CHECKING:
    from .app import AioQueue

__all__ = (
    "BROADCAST_TIMEOUT",
    "EXPIRES_GRACE",
    "PIDBOX_EXCHANGE",
    "PIDBOX_QUEUE_ARGUMENTS",
    "REVOKES_MAX",
    "REVOKE_EXPIRES",
    "Control",
    "ControlListener",
    "Revoked",
)

logger = logging.getLogger(__name__)

#: Celery's broadcast exchange: fanout, not durable (``Mailbox`` of namespace ``celery``).
PIDBOX_EXCHANGE = "celery.pidbox"
#: Arguments of each worker's ``<hostname>.celery.pidbox`` queue, as Celery declares it.
PIDBOX_QUEUE_ARGUMENTS: Mapping[str, int] = {"x-message-ttl": 300_000, "x-expires": 10_000}
#: What Celery's client puts in ``expires``: send time + its reply timeout (1 s by default).
BROADCAST_TIMEOUT = 1.0
#: How long after ``expires`` a command is still obeyed. Celery's client sets ``expires``
#: one second ahead (it is the reply timeout) and stock workers never look at it, so a
#: strict check would drop revokes whenever the worker's clock or event loop runs a second
#: behind. Older commands (say, left in a queue by an earlier run) are ignored.
EXPIRES_GRACE = 60.0
#: Celery's worker defaults: at most 50,000 revoked ids, each kept for 3 hours.
REVOKES_MAX = 50_000
REVOKE_EXPIRES = 3 * 60 * 60.0

_PREFETCH = 100  # no_ack: RabbitMQ ignores it; the other brokers read ahead at most this


def pidbox_queue(hostname: str) -> Queue:
    """The worker's own command queue, declared as Celery declares it (not exclusive)."""
    return Queue(
        f"{hostname}.celery.pidbox",
        exchange=PIDBOX_EXCHANGE,
        exchange_type="fanout",
        routing_key="",
        durable=False,
        auto_delete=True,
        queue_arguments=dict(PIDBOX_QUEUE_ARGUMENTS),
    )


# -- sending ----------------------------------------------------------------------------


class Control:
    """Sends remote-control commands (``app.control``); each returns once the broker has it.

    Nothing waits for replies: aioqueue's workers send none, and a command reaches every
    worker consuming at the time it is sent.
    """

    def __init__(self, app: AioQueue) -> None:
        self.app = app
        self._clock = 0  # Lamport clock of the sender, as in Celery's ``clock`` header

    async def broadcast(
        self,
        method: str,
        arguments: Mapping[str, Any] | None = None,
        destination: Sequence[str] | None = None,
        *,
        timeout: float = BROADCAST_TIMEOUT,
    ) -> None:
        """Publish one command to every worker, or only to the node names in ``destination``.

        ``timeout`` sets the ``expires`` header (send time + timeout), as Celery's does.
        """
        if isinstance(destination, str):
            raise TypeError("destination must be a sequence of node names, not a string")
        command = {
            "method": method,
            "arguments": dict(arguments or {}),
            "destination": None if destination is None else list(destination),
            "pattern": None,
            "matcher": None,
        }
        body, content_type, content_encoding = dumps(command, self.app.conf.task_serializer)
        self._clock += 1
        envelope = Envelope(
            body=body,
            headers={"clock": self._clock, "expires": time.time() + timeout},
            content_type=content_type,
            content_encoding=content_encoding,
            priority=0,
            delivery_mode=2,
        )
        broker = await self.app.get_broker()
        await broker.declare_exchange(PIDBOX_EXCHANGE, "fanout", durable=False)
        await broker.publish(envelope, routing_key="", exchange=PIDBOX_EXCHANGE)

    async def revoke(
        self,
        task_id: str | Sequence[str],
        *,
        terminate: bool = False,
        signal: str = "SIGTERM",
        destination: Sequence[str] | None = None,
    ) -> None:
        """Tell every worker (or those in ``destination``) to skip these tasks.

        A worker that receives the task afterwards stores REVOKED and acknowledges it.
        ``terminate=True`` also cancels it where it is running (aioqueue cancels the task;
        ``signal`` is passed on for stock Celery workers, which send it to the process).
        """
        ids: str | list[str] = task_id if isinstance(task_id, str) else list(task_id)
        arguments = {"task_id": ids, "terminate": terminate, "signal": signal}
        await self.broadcast("revoke", arguments, destination)


# -- the worker's side --------------------------------------------------------------------


class Revoked:
    """Revoked task ids, bounded like Celery's: at most ``maxlen``, each for ``expires`` s.

    Adding beyond ``maxlen`` forgets the oldest ids; an id is forgotten ``expires`` seconds
    after it was (last) added. Membership is O(1); adding is O(1) amortised.
    """

    __slots__ = ("_clock", "_ids", "expires", "maxlen")

    def __init__(
        self,
        maxlen: int = REVOKES_MAX,
        expires: float = REVOKE_EXPIRES,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self.maxlen = maxlen
        self.expires = expires
        self._clock = clock
        self._ids: OrderedDict[str, float] = OrderedDict()  # id -> when added, oldest first

    def add(self, ids: str | Iterable[str]) -> None:
        """Remember one id or several; adding a known id again restarts its time."""
        now = self._clock()
        for task_id in (ids,) if isinstance(ids, str) else ids:
            self._ids[task_id] = now
            self._ids.move_to_end(task_id)
        while len(self._ids) > self.maxlen:
            self._ids.popitem(last=False)
        self.purge()

    def update(self, ids: Iterable[str]) -> None:
        """``add()`` under ``set``'s name, so a ``set`` of ids can be replaced by this."""
        self.add(ids)

    def purge(self) -> None:
        """Forget the ids whose time is up."""
        deadline = self._clock() - self.expires
        ids = self._ids
        while ids:
            oldest, added = next(iter(ids.items()))
            if added > deadline:
                break
            del ids[oldest]

    def __contains__(self, task_id: object) -> bool:
        if not isinstance(task_id, str):
            return False
        added = self._ids.get(task_id)
        if added is None:
            return False
        if added <= self._clock() - self.expires:
            del self._ids[task_id]
            return False
        return True

    def __len__(self) -> int:
        self.purge()
        return len(self._ids)

    def __repr__(self) -> str:
        return f"<Revoked: {len(self)} ids, max {self.maxlen}, for {self.expires}s>"


class _Malformed(Exception):
    """A command that does not follow Celery's format; logged and skipped."""


class ControlListener:
    """Consumes the worker's ``<hostname>.celery.pidbox`` queue and acts on revokes.

    ``on_revoke(ids, terminate)`` is called on the event loop for each revoke addressed to
    this worker (``destination`` empty or naming ``hostname``, or ``pattern``/``matcher``
    matching it). Other commands (``ping``, ``hello``, ``inspect``...) are logged at debug
    level and ignored: aioqueue sends no replies. Malformed or undecodable messages are
    logged and skipped, and so is an exception raised by ``on_revoke``.

    Commands whose ``expires`` header is more than ``expires_grace`` seconds past are
    ignored (see :data:`EXPIRES_GRACE`; ``expires_grace=0`` makes the check strict).

    Node names must be unique: two workers with one hostname share one queue, and each
    command reaches only one of them.
    """

    def __init__(
        self,
        app: AioQueue,
        hostname: str,
        on_revoke: Callable[[list[str], bool], None],
        *,
        expires_grace: float = EXPIRES_GRACE,
    ) -> None:
        self.app = app
        self.hostname = hostname
        self.on_revoke = on_revoke
        self.expires_grace = expires_grace
        self.queue = pidbox_queue(hostname)
        self._accept = accepted_types(app.conf.accept_content)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Declare the exchange and queue, consume, call ``task_status.started()``; until
        cancelled. A broker error while consuming (the consumer could not be restored
        after a reconnect, the broker was closed) is raised, as the worker's own consumer
        raises it."""
        broker = await self.app.get_broker()
        self._accept = accepted_types(self.app.conf.accept_content)
        await broker.declare_exchange(PIDBOX_EXCHANGE, "fanout", durable=False)
        await broker.declare(self.queue)
        consumer = broker.consume([self.queue.name], prefetch=_PREFETCH, no_ack=True)
        await consumer.start()
        try:
            logger.debug("Listening for remote control commands on %s", self.queue.name)
            task_status.started()
            while True:
                delivery = await consumer.receive()
                self.handle(delivery.envelope)
        finally:
            with anyio.CancelScope(shield=True):
                await consumer.stop()

    def handle(self, envelope: Envelope) -> None:
        """Act on one command message; never raises."""
        try:
            command = self._decode(envelope)
        except _Malformed as exc:
            logger.warning("Ignoring a malformed remote control message: %s", exc)
            return
        if command is None:
            return
        method, arguments = command
        if method != "revoke":
            logger.debug("Ignoring remote control command %r (not supported)", method)
            return
        try:
            ids, terminate = _revoke_arguments(arguments)
        except _Malformed as exc:
            logger.warning("Ignoring a malformed revoke command: %s", exc)
            return
        if not ids:
            return
        logger.info("Tasks flagged as revoked: %s%s", ", ".join(ids),
                    " (terminate)" if terminate else "")
        try:
            self.on_revoke(ids, terminate)
        except Exception:
            logger.exception("Handling the revoke of %s failed", ", ".join(ids))

    def _decode(self, envelope: Envelope) -> tuple[str, dict[str, Any]] | None:
        """(method, arguments) of a command for this worker; None if not for us or stale."""
        try:
            body = loads(envelope.body, envelope.content_type, self._accept)
        except AioQueueError as exc:
            raise _Malformed(str(exc)) from None
        if not isinstance(body, dict):
            raise _Malformed(f"body is a {type(body).__name__}, not a mapping")
        method = body.get("method")
        if not isinstance(method, str):
            raise _Malformed(f"no method name: {body!r:.200}")
        arguments = body.get("arguments") or {}
        if not isinstance(arguments, dict):
            raise _Malformed(f"arguments of {method!r} are not a mapping: {arguments!r:.200}")
        if not self._addressed_to_me(body):
            return None
        expires = envelope.headers.get("expires") if isinstance(envelope.headers, dict) else None
        if (
            isinstance(expires, int | float) and not isinstance(expires, bool)
            and expires > 0 and expires + self.expires_grace < time.time()
        ):
            logger.debug("Ignoring remote control command %r: expired at %s", method, expires)
            return None
        return method, arguments

    def _addressed_to_me(self, body: dict[str, Any]) -> bool:
        """As kombu's mailbox: ``destination`` first, then ``pattern`` with ``matcher``."""
        destination = body.get("destination")
        if destination:
            if isinstance(destination, str):
                return destination == self.hostname
            if isinstance(destination, list):
                return self.hostname in destination
            raise _Malformed(f"destination is not a list of names: {destination!r:.200}")
        pattern, matcher = body.get("pattern"), body.get("matcher")
        if not (pattern and matcher):
            return True
        if not isinstance(pattern, str):
            raise _Malformed(f"pattern is not a string: {pattern!r:.200}")
        if matcher == "glob":
            return fnmatch.fnmatch(self.hostname, pattern)
        if matcher == "pcre":
            try:
                return re.match(pattern, self.hostname) is not None
            except re.error as exc:
                raise _Malformed(f"bad pcre pattern {pattern!r}: {exc}") from None
        raise _Malformed(f"unknown matcher {matcher!r}")


def _revoke_arguments(arguments: dict[str, Any]) -> tuple[list[str], bool]:
    task_id = arguments.get("task_id")
    ids = [task_id] if isinstance(task_id, str) else task_id
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _Malformed(f"task_id is not an id or a list of ids: {task_id!r:.200}")
    return ids, bool(arguments.get("terminate", False))
