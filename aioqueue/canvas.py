"""Callbacks, errbacks and chains that arrive in a message, honoured as Celery's worker does.

A stock Celery client puts ``link``/``link_error`` signatures and the rest of a ``chain`` in
the message body's ``embed``. After the task succeeds, the worker sends each callback and
the next chain step with the result put in front of their arguments (unless ``immutable``),
``parent_id`` = the finished task and the same ``root_id``, before the task's own result is
stored, so that result can list them as ``children``. After a failure it sends the errbacks
with the failed task's id as first argument, and marks every later chain step as failed.
Building signatures (``add.s()``, ``chain(...)``) comes with the canvas API, not here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .exceptions import MessageError

if TYPE_CHECKING:
    from .app import AioQueue
    from .protocol import TaskMessage

__all__ = ("Signature", "chain_ids", "send_callbacks", "send_errbacks")

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Signature:
    """A task call frozen in advance, as Celery serialises it inside ``embed``."""

    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    subtask_type: str | None = None
    immutable: bool = False

    @classmethod
    def from_dict(cls, data: Any) -> Signature:
        if not isinstance(data, dict) or not isinstance(data.get("task"), str):
            raise MessageError(f"not a task signature: {data!r}")
        args, kwargs = data.get("args") or [], data.get("kwargs") or {}
        options = data.get("options") or {}
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            raise MessageError(f"signature {data['task']!r} has malformed args or kwargs")
        if not isinstance(options, dict):
            raise MessageError(f"signature {data['task']!r} has malformed options")
        return cls(
            task=data["task"], args=list(args), kwargs=kwargs, options=options,
            subtask_type=data.get("subtask_type"), immutable=bool(data.get("immutable")),
        )


def _signatures(value: Any) -> list[Signature]:
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    return [Signature.from_dict(item) for item in items]


def child(task_id: str) -> list[Any]:
    """A ``children`` entry of a result record: ``[[id, null], null]``."""
    return [[task_id, None], None]


async def _send(
    app: AioQueue,
    signature: Signature,
    prefix: list[Any],
    parent: TaskMessage,
    chain: list[Any] | None = None,
) -> list[str]:
    """Send one signature (a nested chain or group too); returns the ids of what was sent."""
    if signature.subtask_type == "chain":
        steps = _signatures(signature.kwargs.get("tasks"))
        if not steps:
            return []
        rest = [_as_dict(s) for s in reversed(steps[1:])] + (chain or [])
        return await _send(app, steps[0], prefix, parent, rest)
    if signature.subtask_type == "group":
        sent: list[str] = []
        for member in _signatures(signature.kwargs.get("tasks")):
            sent += await _send(app, member, prefix, parent)
        return sent
    if signature.subtask_type is not None:
        logger.warning(
            "Task %s[%s]: %s callbacks are not supported yet; %r not sent",
            parent.task, parent.id, signature.subtask_type, signature.task,
        )
        return []
    options = signature.options
    args = signature.args if signature.immutable else [*prefix, *signature.args]
    embed = {
        "callbacks": options.get("link"),
        "errbacks": options.get("link_error"),
        "chain": chain or None,
        "chord": options.get("chord"),
    }
    result = await app.dispatch(
        signature.task,
        args,
        signature.kwargs,
        {
            "task_id": options.get("task_id"),
            "queue": options.get("queue"),
            "priority": options.get("priority"),
            "parent_id": parent.id,
            "root_id": parent.root_id or parent.id,
        },
        embed=embed,
        group=options.get("group_id"),
        group_index=options.get("group_index"),
        reply_to=options.get("reply_to"),
    )
    return [result.id]


def _as_dict(signature: Signature) -> dict[str, Any]:
    return {
        "task": signature.task, "args": signature.args, "kwargs": signature.kwargs,
        "options": signature.options, "subtask_type": signature.subtask_type,
        "immutable": signature.immutable,
    }


async def send_callbacks(app: AioQueue, message: TaskMessage, value: Any) -> list[Any]:
    """After a success: callbacks, then the next chain step. Returns ``children`` entries."""
    embed = message.embed
    sent: list[str] = []
    for signature in _signatures(embed.get("callbacks")):
        sent += await _send(app, signature, [value], message)
    chain = embed.get("chain")
    if chain:
        if not isinstance(chain, list):
            raise MessageError("embed.chain must be a list of signatures")
        # The rest of a chain travels in reverse: the next step is the last element.
        sent += await _send(app, Signature.from_dict(chain[-1]), [value], message, chain[:-1])
    return [child(task_id) for task_id in sent]


async def send_errbacks(app: AioQueue, message: TaskMessage) -> list[Any]:
    """After a failure: each errback gets the failed task's id as its first argument."""
    sent: list[str] = []
    for signature in _signatures(message.embed.get("errbacks")):
        signature.immutable = False
        sent += await _send(app, signature, [message.id], message)
    return [child(task_id) for task_id in sent]


def chain_ids(message: TaskMessage) -> list[str]:
    """Pre-assigned ids of the chain steps that will now never run."""
    ids = []
    for item in message.embed.get("chain") or ():
        options = item.get("options") if isinstance(item, dict) else None
        task_id = options.get("task_id") if isinstance(options, dict) else None
        if isinstance(task_id, str):
            ids.append(task_id)
    return ids
