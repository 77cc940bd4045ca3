"""Eager mode and the pytest plugin users run their own tests with."""

from __future__ import annotations

import textwrap

import pytest

from aioqueue import AioQueue
from aioqueue.result import EagerResult


async def test_always_eager_runs_inline() -> None:
    app = AioQueue("t", broker="memory://never-used", task_always_eager=True)

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    r = await add.delay(2, 3)
    assert isinstance(r, EagerResult)
    assert await r.get() == 5 and await r == 5
    assert await r.state() == "SUCCESS" and await r.ready() and await r.successful()
    assert await (await mul.apply_async((2, 3))).get() == 6


async def test_eager_failure_is_kept_until_get() -> None:
    app = AioQueue("t", broker="memory://never-used", task_always_eager=True)

    @app.task
    async def boom() -> None:
        raise KeyError("x")

    r = await boom.delay()
    assert await r.failed()
    with pytest.raises(KeyError):
        await r.get()
    assert isinstance(await r.get(propagate=False), KeyError)
    tb = await r.traceback()
    assert tb is not None and "KeyError" in tb


async def test_eager_propagates() -> None:
    app = AioQueue(
        "t", broker="memory://never-used", task_always_eager=True, task_eager_propagates=True
    )

    @app.task
    async def boom() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await boom.delay()


async def test_apply_runs_locally_with_a_request() -> None:
    app = AioQueue("t", broker="memory://never-used")

    @app.task(bind=True)
    def who(self: object) -> bool:
        return bool(self.request.is_eager)  # type: ignore[attr-defined]

    assert await (await who.apply()).get() is True


def test_plugin_fixtures_in_a_users_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        tasks=textwrap.dedent(
            """
            from aioqueue import AioQueue

            app = AioQueue("tasks", broker="amqp://nowhere:1//", backend="redis://nowhere:1/0")

            @app.task
            async def add(x: int, y: int) -> int:
                return x + y

            @app.task
            def slow_sync(x: int) -> int:
                return x * 2
            """
        ),
        conftest=textwrap.dedent(
            """
            import pytest
            from tasks import app

            @pytest.fixture
            def aioqueue_app():
                return app
            """
        ),
        test_user=textwrap.dedent(
            """
            import pytest
            from tasks import add, app, slow_sync

            pytestmark = pytest.mark.asyncio

            async def test_with_worker(aioqueue_worker):
                r = await add.delay(1, 2)
                assert await r.get(timeout=5) == 3
                assert await (await slow_sync.delay(4)).get(timeout=5) == 8

            async def test_eager(aioqueue_eager):
                assert await (await add.delay(2, 2)).get() == 4

            def test_app_is_restored():
                assert app.conf.broker_url == "amqp://nowhere:1//"
                assert app.conf.task_always_eager is False
            """
        ),
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=3)
