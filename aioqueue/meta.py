"""Result records (``celery-task-meta``) and the exceptions they carry, as Celery stores them."""

from __future__ import annotations

import builtins
import importlib
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from . import exceptions, states

__all__ = ("exception_from_dict", "exception_to_dict", "make_meta")

_JSON_SAFE = (str, int, float, bool, type(None))


def _safe_arg(value: Any) -> Any:
    """Keep an exception argument that JSON can carry as it is; others become their repr."""
    if isinstance(value, _JSON_SAFE):
        return value
    try:
        orjson.dumps(value)
    except TypeError:
        return repr(value)
    return list(value) if isinstance(value, tuple) else value


def exception_to_dict(exc: BaseException) -> dict[str, Any]:
    """``{"exc_type", "exc_message", "exc_module"}`` with the exception's args made JSON-safe."""
    cls = type(exc)
    module = cls.__module__
    exc_type = cls.__qualname__
    # Our own TaskError stand-ins keep the remote type they stand for.
    if isinstance(exc, exceptions.TaskError) and exc.exc_type and cls is exceptions.TaskError:
        exc_type, module = exc.exc_type, exc.exc_module or module
    # Our equivalents of Celery's exceptions travel under Celery's names, as a stock worker
    # stores them (vectors redis_result_unregistered, _revoked, _expired).
    elif cls in _AS_CELERY:
        module, exc_type = _AS_CELERY[cls]
    return {
        "exc_type": exc_type,
        "exc_message": [_safe_arg(a) for a in exc.args],
        "exc_module": module,
    }


# Celery's own exception names mapped to ours, so their failures re-raise as our types.
_CELERY_EQUIVALENTS: dict[tuple[str, str], type[BaseException]] = {
    ("celery.exceptions", "NotRegistered"): exceptions.NotRegistered,
    ("celery.exceptions", "TaskRevokedError"): exceptions.TaskRevokedError,
    ("celery.exceptions", "TimeoutError"): exceptions.TimeoutError,
    ("celery.exceptions", "TimeLimitExceeded"): exceptions.TimeLimitExceeded,
    ("celery.exceptions", "SoftTimeLimitExceeded"): exceptions.SoftTimeLimitExceeded,
    ("celery.exceptions", "MaxRetriesExceededError"): exceptions.MaxRetriesExceededError,
    ("celery.exceptions", "Retry"): exceptions.Retry,
}
_AS_CELERY = {cls: name for name, cls in _CELERY_EQUIVALENTS.items()}


def _lookup(module: str, qualname: str) -> Any:
    mod = sys.modules.get(module)
    if mod is None:
        if module == "builtins":
            mod = builtins
        else:
            try:
                mod = importlib.import_module(module)
            except Exception:
                return None
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def exception_from_dict(data: Any) -> BaseException:
    """Rebuild a stored exception with its original type when it can be imported.

    Only exception classes are ever instantiated; anything else under that name, or a type
    that cannot be imported or rebuilt, becomes a ``TaskError`` naming the remote type.
    """
    if not isinstance(data, dict):
        return exceptions.TaskError(repr(data))
    exc_type = str(data.get("exc_type") or "Exception")
    module = str(data.get("exc_module") or "builtins")
    message = data.get("exc_message", [])
    args = tuple(message) if isinstance(message, list | tuple) else (message,)
    cls = _CELERY_EQUIVALENTS.get((module, exc_type)) or _lookup(module, exc_type)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            if issubclass(cls, exceptions.TaskError):
                return cls(*args, exc_type=exc_type, exc_module=module)
            return cls(*args)
        except Exception:
            pass
    return exceptions.TaskError(*args, exc_type=exc_type, exc_module=module)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def make_meta(
    task_id: str,
    status: str,
    result: Any,
    *,
    traceback: str | None = None,
    children: list[Any] | None = None,
    group_id: str | None = None,
    parent_id: str | None = None,
) -> dict[str, Any]:
    """A result record with Celery's fields in Celery's order (``task_id`` last)."""
    meta: dict[str, Any] = {
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": children or [],
        "date_done": now_iso() if status in states.READY_STATES else None,
    }
    if group_id is not None:
        meta["group_id"] = group_id
    if parent_id is not None:
        meta["parent_id"] = parent_id
    meta["task_id"] = task_id
    return meta
