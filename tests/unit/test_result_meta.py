"""Result records and exceptions against what a stock Celery 5.7 worker stored (tests/vectors)."""

from __future__ import annotations

import json
import os
import re
import sys
import types
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from aioqueue import exceptions, states
from aioqueue.meta import exception_from_dict, exception_to_dict, make_meta
from aioqueue.serialization import dumps

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?\+00:00")


@cache
def load(name: str) -> dict[str, Any]:
    with (VECTORS / f"{name}.json").open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


# The exception each task raised (from each file's producer.call / description). The custom
# class lives in the capture's module ``protoapp``, which we cannot import: same name here.
CustomError = type("CustomError", (Exception,), {"__module__": "protoapp"})

RAISED: dict[str, BaseException] = {
    "redis_result_failure": ValueError("boom"),
    "redis_result_failure_custom": CustomError(1, "two"),
    "redis_result_failure_with_errback": ValueError("x"),
    "redis_result_retry": KeyError("transient"),
    "redis_result_revoked": exceptions.TaskRevokedError("revoked"),
    "redis_result_expired": exceptions.TaskRevokedError("expired"),
    "redis_result_unregistered": exceptions.NotRegistered("proto.nope"),
    "rpc_result_failure": ValueError("boom"),
}


def stored_records() -> list[Any]:
    """(name, raw JSON text) of every result record a stock worker wrote or published."""
    records: list[Any] = []
    for path in sorted(VECTORS.glob("redis_result_*.json")):
        data = load(path.stem)
        if "stored" not in data or "_extended" in path.stem:
            continue  # nothing stored (ignored); result_extended fields are not make_meta's
        records.append(pytest.param(path.stem, data["stored"]["raw_value"], id=path.stem))
        for i, pub in enumerate(data["pubsub_messages"]):
            records.append(pytest.param(path.stem, pub["raw"], id=f"{path.stem}.pubsub[{i}]"))
    chain = load("redis_result_chain")
    for part in ("first", "second"):
        raw = chain[part]["raw_value"]
        records.append(pytest.param("redis_result_chain", raw, id=f"redis_result_chain.{part}"))
    group = load("redis_group_saved")["member_result"]["raw_value"]
    records.append(pytest.param("redis_group_saved", group, id="redis_group_saved.member"))
    for name in ("rpc_result_success", "rpc_result_failure"):
        for i, reply in enumerate(load(name)["reply_messages"]):
            records.append(pytest.param(name, reply["body_raw"], id=f"{name}[{i}]"))
    return records


@pytest.mark.parametrize(("vector", "raw"), stored_records())
def test_make_meta_matches_stored_record(vector: str, raw: str) -> None:
    captured = json.loads(raw)
    status = captured["status"]
    if status in states.EXCEPTION_STATES:
        result = exception_to_dict(RAISED[vector])  # ours, from the exception itself
    else:
        result = captured["result"]  # a return value, or STARTED's {"pid", "hostname"}
    meta = make_meta(
        captured["task_id"],
        status,
        result,
        traceback=captured["traceback"],
        children=captured["children"],
        group_id=captured.get("group_id"),
        parent_id=captured.get("parent_id"),
    )
    # Same keys in the same order (task_id last), through our serializer as well.
    ours = json.loads(dumps(meta)[0])
    assert list(meta) == list(captured)
    assert list(ours) == list(captured)
    for key, theirs in captured.items():
        if key == "date_done":
            if theirs is None:
                assert ours[key] is None
            else:
                assert ISO_UTC.fullmatch(theirs) and ISO_UTC.fullmatch(ours[key]), ours[key]
                done = datetime.fromisoformat(ours[key])
                assert abs(done - datetime.now(UTC)) < timedelta(seconds=5)
        else:
            assert ours[key] == theirs, key
    if status in (states.FAILURE, states.RETRY) and vector != "redis_result_unregistered":
        assert isinstance(ours["traceback"], str)
        assert ours["traceback"].startswith("Traceback (most recent call last):")


def test_date_done_only_for_ready_states() -> None:
    for status in (states.PENDING, states.STARTED, states.RETRY, "PROGRESS"):
        assert make_meta("i", status, None)["date_done"] is None
    for status in states.READY_STATES:
        assert ISO_UTC.fullmatch(make_meta("i", status, None)["date_done"])


def test_make_meta_optional_fields() -> None:
    meta = make_meta("tid", states.SUCCESS, 1)
    assert list(meta) == ["status", "result", "traceback", "children", "date_done", "task_id"]
    meta = make_meta("tid", states.SUCCESS, 1, group_id="g", parent_id="p")
    assert list(meta) == [
        "status",
        "result",
        "traceback",
        "children",
        "date_done",
        "group_id",
        "parent_id",
        "task_id",
    ]


# --------------------------------------------------------------------------------------------
# exception_to_dict
# --------------------------------------------------------------------------------------------


def captured_exception(vector: str) -> dict[str, Any]:
    result: dict[str, Any] = load(vector)["stored"]["decoded"]["result"]
    return result


@pytest.mark.parametrize("vector", [v for v in RAISED if v.startswith("redis_")])
def test_exception_to_dict_equals_captured(vector: str) -> None:
    ours = exception_to_dict(RAISED[vector])
    theirs = captured_exception(vector)
    assert list(ours) == list(theirs) == ["exc_type", "exc_message", "exc_module"]
    assert ours == theirs


@pytest.mark.parametrize(
    "vector", ["redis_result_failure_extended", "redis_result_failure_custom_extended"]
)
def test_exception_to_dict_equals_captured_extended(vector: str) -> None:
    raised = RAISED[vector.removesuffix("_extended")]
    assert exception_to_dict(raised) == captured_exception(vector)


def test_exception_to_dict_makes_args_json_safe() -> None:
    marker = object()
    data = exception_to_dict(ValueError(marker, "text", 3, [1, "a"]))
    assert data["exc_message"] == [repr(marker), "text", 3, [1, "a"]]
    json.dumps(data)  # plain JSON, no envelopes needed


def test_exception_to_dict_of_nested_class_uses_qualname() -> None:
    class Outer:
        class Inner(Exception):
            pass

    data = exception_to_dict(Outer.Inner("x"))
    assert data["exc_type"].endswith("Outer.Inner")
    assert data["exc_module"] == __name__


# --------------------------------------------------------------------------------------------
# exception_from_dict
# --------------------------------------------------------------------------------------------


def test_rebuilds_builtin_exception() -> None:
    exc = exception_from_dict(captured_exception("redis_result_failure"))
    assert type(exc) is ValueError
    assert exc.args == ("boom",)
    retry = exception_from_dict(captured_exception("redis_result_retry"))
    assert type(retry) is KeyError and retry.args == ("transient",)


def test_celery_not_registered_becomes_ours() -> None:
    exc = exception_from_dict(captured_exception("redis_result_unregistered"))
    assert type(exc) is exceptions.NotRegistered
    assert exc.args == ("proto.nope",)
    assert "proto.nope" in str(exc)
    # And back: it goes on the wire under Celery's name again.
    assert exception_to_dict(exc) == captured_exception("redis_result_unregistered")


@pytest.mark.parametrize("vector", ["redis_result_revoked", "redis_result_expired"])
def test_celery_revoked_becomes_ours(vector: str) -> None:
    exc = exception_from_dict(captured_exception(vector))
    assert type(exc) is exceptions.TaskRevokedError
    assert isinstance(exc, exceptions.TaskError)
    assert exception_to_dict(exc) == captured_exception(vector)


def test_unknown_module_becomes_task_error() -> None:
    data = captured_exception("redis_result_failure_custom")  # protoapp is not importable
    assert "protoapp" not in sys.modules
    exc = exception_from_dict(data)
    assert type(exc) is exceptions.TaskError
    assert exc.args == (1, "two")
    assert exc.exc_type == "CustomError" and exc.exc_module == "protoapp"
    assert str(exc) == "protoapp.CustomError: 1, two"
    # The stand-in goes back on the wire as the remote type it stands for.
    assert exception_to_dict(exc) == data


def test_unknown_type_in_known_module_becomes_task_error() -> None:
    exc = exception_from_dict(
        {"exc_type": "NoSuchError", "exc_message": ["gone"], "exc_module": "builtins"}
    )
    assert type(exc) is exceptions.TaskError
    assert "builtins.NoSuchError" in str(exc) and "gone" in str(exc)


def test_custom_class_rebuilt_when_its_module_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("protoapp")
    custom = type("CustomError", (Exception,), {"__module__": "protoapp"})
    module.CustomError = custom  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "protoapp", module)
    exc = exception_from_dict(captured_exception("redis_result_failure_custom"))
    assert type(exc) is custom and exc.args == (1, "two")


def test_name_of_a_non_exception_is_never_called(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def fake_system(*args: Any) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(os, "system", fake_system)
    exc = exception_from_dict(
        {"exc_module": "os", "exc_type": "system", "exc_message": ["echo pwned"]}
    )
    assert calls == []
    assert type(exc) is exceptions.TaskError
    assert "os.system" in str(exc) and "echo pwned" in str(exc)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("builtins", "eval"),  # a function
        ("builtins", "dict"),  # a class, but not an exception
        ("builtins", "object.__subclasses__"),  # attribute walk to a method
        ("os", "environ"),  # an instance
    ],
)
def test_other_non_exceptions_become_task_error(module: str, name: str) -> None:
    exc = exception_from_dict({"exc_module": module, "exc_type": name, "exc_message": ["1"]})
    assert type(exc) is exceptions.TaskError
    assert f"{module}.{name}" in str(exc)


def test_exception_that_cannot_take_the_args_becomes_task_error() -> None:
    # UnicodeDecodeError needs five arguments; one is not enough to rebuild it.
    exc = exception_from_dict(
        {"exc_module": "builtins", "exc_type": "UnicodeDecodeError", "exc_message": ["bad"]}
    )
    assert type(exc) is exceptions.TaskError
    assert "UnicodeDecodeError" in str(exc) and "bad" in str(exc)


def test_odd_shapes() -> None:
    assert type(exception_from_dict("not a dict")) is exceptions.TaskError
    single = exception_from_dict(
        {"exc_module": "builtins", "exc_type": "ValueError", "exc_message": "plain"}
    )
    assert type(single) is ValueError and single.args == ("plain",)
