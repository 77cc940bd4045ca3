from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

import aioqueue
from aioqueue import AioQueue, Celery, Queue, ResultUnavailableError, Task, TimeoutError
from aioqueue.brokers.base import Delivery
from aioqueue.exceptions import SerializationError
from aioqueue.protocol import decode_task


async def receive(app: AioQueue, queue: str = "celery") -> Delivery:
    broker = await app.get_broker()
    async with broker.consume([queue], prefetch=1) as consumer:
        with anyio.fail_after(2):
            delivery = await consumer.receive()
        await delivery.ack()
        return delivery


def test_public_api_is_exactly_this() -> None:
    assert aioqueue.__all__ == (
        "AioQueue", "AioQueueError", "AsyncResult", "AsyncTask", "BrokerConnectionError",
        "BrokerError", "Celery", "ConfigurationError", "MaxRetriesExceededError",
        "NotRegistered", "Queue", "Reject", "Request", "ResultUnavailableError", "Retry",
        "Settings", "SoftTimeLimitExceeded", "SyncTask", "Task", "TaskError", "TaskRevokedError",
        "TimeLimitExceeded", "TimeoutError", "__version__", "states",
    )
    assert Celery is AioQueue
    assert issubclass(TimeoutError, builtins_timeout())


def builtins_timeout() -> type[BaseException]:
    import builtins

    return builtins.TimeoutError


def test_task_names_and_local_calls() -> None:
    app = AioQueue("proj", broker="memory://")

    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="custom.name")
    async def add(x: int, y: int) -> int:
        return x + y

    assert mul.name == f"{__name__}.mul"
    assert app.tasks["custom.name"] is add
    assert mul(3, 4) == 12
    assert anyio.run(lambda: add(1, 2)) == 3
    assert mul.__doc__ is None and mul.__name__ == "mul"


def test_main_module_tasks_are_named_after_the_app() -> None:
    app = AioQueue("tasks", broker="memory://")

    def add(x: int, y: int) -> int:
        return x + y

    add.__module__ = "__main__"
    assert app.task(add).name == "tasks.add"


async def test_delay_publishes_protocol_v2(app: AioQueue) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    r = await add.delay(4, 4)
    delivery = await receive(app)
    message = decode_task(delivery.envelope)
    assert message.id == r.id and message.task == add.name
    assert message.args == [4, 4] and message.kwargs == {}
    assert delivery.envelope.headers["root_id"] == r.id
    assert delivery.envelope.headers["argsrepr"] == "(4, 4)"
    assert delivery.envelope.correlation_id == r.id
    assert delivery.envelope.reply_to == app.reply_to
    assert delivery.envelope.delivery_mode == 2


async def test_apply_async_options(app: AioQueue) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    before = datetime.now(UTC)
    r = await add.apply_async(
        (1, 2), countdown=30, expires=60, task_id="fixed-id", headers={"x-custom": "v"},
        time_limit=30, soft_time_limit=20, priority=3, ignore_result=True,
    )
    assert r.id == "fixed-id"
    envelope = (await receive(app)).envelope
    message = decode_task(envelope)
    assert message.eta is not None and timedelta(seconds=29) < message.eta - before
    assert message.expires is not None and message.expires - before < timedelta(seconds=61)
    assert envelope.expiration is not None and 59000 <= int(envelope.expiration) <= 60000
    assert message.timelimit == (30, 20)
    assert envelope.headers["x-custom"] == "v"
    assert envelope.priority == 3
    assert message.ignore_result is True


async def test_queue_routes_and_explicit_queue(app: AioQueue) -> None:
    app.conf.task_routes = {"routing.*": {"queue": "routed"}}

    @app.task(name="routing.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="other.mul", queue="own")
    async def mul(x: int, y: int) -> int:
        return x * y

    await add.delay(1, 1)
    assert decode_task((await receive(app, "routed")).envelope).task == "routing.add"
    await mul.delay(1, 1)
    assert decode_task((await receive(app, "own")).envelope).task == "other.mul"
    await add.apply_async((1, 1), queue="explicit")
    assert decode_task((await receive(app, "explicit")).envelope).task == "routing.add"


async def test_send_task_by_name(app: AioQueue) -> None:
    r = await app.send_task("remote.task", [1, "a"], {"k": None})
    message = decode_task((await receive(app)).envelope)
    assert (message.id, message.task, message.args, message.kwargs) == (
        r.id, "remote.task", [1, "a"], {"k": None}
    )


async def test_unserializable_arguments_raise_and_publish_nothing(app: AioQueue) -> None:
    @app.task
    async def take(x: Any) -> None:
        return None

    with pytest.raises(SerializationError):
        await take.delay(object())
    broker = await app.get_broker()
    await broker.declare(app.queue_spec("celery"))
    async with broker.consume(["celery"], prefetch=1) as consumer:
        with anyio.move_on_after(0.1) as scope:
            await consumer.receive()
        assert scope.cancelled_caught


async def test_wrong_arguments_raise_at_the_call(app: AioQueue) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError):
        await add.apply_async((1, 2, 3))


async def test_bound_task_sees_its_request(app: AioQueue, worker: Any) -> None:
    @app.task(bind=True)
    async def whoami(self: Task[Any, Any], n: int) -> list[Any]:
        return [self.request.id, self.request.task, n, self.request.retries]

    r = await whoami.delay(5)
    assert await r.get(timeout=5) == [r.id, whoami.name, 5, 0]


async def test_get_timeout(app: AioQueue) -> None:
    r = app.AsyncResult("never-sent")
    with pytest.raises(TimeoutError, match="never-sent"):
        await r.get(timeout=0.05)
    with pytest.raises(builtins_timeout()):
        await r.get(timeout=0.01)
    assert await r.state() == "PENDING"
    assert not await r.ready()


async def test_ignore_result_says_so(app: AioQueue) -> None:
    @app.task(ignore_result=True)
    async def fire() -> None:
        return None

    r = await fire.delay()
    with pytest.raises(ResultUnavailableError, match="ignore_result"):
        await r.get(timeout=1)


async def test_no_backend_says_so(unique: str) -> None:
    async with AioQueue("t", broker=f"memory://{unique}") as app:
        r = await app.send_task("x.y")
        with pytest.raises(ResultUnavailableError, match="no result backend"):
            await r.get()


async def test_custom_queue_from_task_queues(app: AioQueue) -> None:
    app.conf.task_queues = [Queue("prio", queue_arguments={"x-max-priority": 10})]
    await app.send_task("a", queue="prio", priority=1)
    await app.send_task("b", queue="prio", priority=9)
    first = decode_task((await receive(app, "prio")).envelope)
    assert first.task == "b"


async def test_forget(app: AioQueue, worker: Any) -> None:
    @app.task
    async def one() -> int:
        return 1

    r = await one.delay()
    assert await r.get(timeout=5) == 1
    await r.forget()
    assert await r.state() == "PENDING"
