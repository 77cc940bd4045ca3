"""Send tasks and print their results (start a worker first, or use ``python -m docs.examples.demo``)."""

import anyio

from aioqueue import TimeoutError
from tasks import add, app, fail, fetch, resize


async def main() -> None:
    async with app:
        r = await add.delay(4, 4)
        print("add(4, 4) =", await r.get(timeout=10), "| state:", await r.state())
        results = [await fetch.delay(0.5) for _ in range(100)]
        with anyio.fail_after(10):
            values = [await x for x in results]
        print(f"100 x fetch(0.5): {len(values)} results, e.g. {values[0]!r}")
        print("resize('cat.png') =", await (await resize.delay("cat.png")).get(timeout=10))
        bad = await fail.delay("boom")
        print("fail('boom') ->", repr(await bad.get(timeout=10, propagate=False)))
        try:
            await app.AsyncResult("never-sent").get(timeout=0.2)
        except TimeoutError as exc:
            print("get(timeout=0.2) on an unknown id ->", type(exc).__name__)


if __name__ == "__main__":
    anyio.run(main)
