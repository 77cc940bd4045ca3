"""The fault proxy itself, against an in-process echo server: forward, cut, pause, count."""

from __future__ import annotations

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream

from .proxy import tcp_proxy

pytestmark = pytest.mark.faults

BROKEN = (anyio.EndOfStream, anyio.BrokenResourceError, OSError)


async def echo(stream: SocketStream) -> None:
    async with stream:
        try:
            async for chunk in stream:
                await stream.send(chunk)
        except anyio.BrokenResourceError:
            pass


async def test_forwards_cuts_and_refuses() -> None:
    with anyio.fail_after(20):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo, tg)
            target = listener.extra(SocketAttribute.local_port)
            async with tcp_proxy(target) as proxy:
                first = await anyio.connect_tcp("127.0.0.1", proxy.port)
                second = await anyio.connect_tcp("127.0.0.1", proxy.port)
                async with first, second:
                    for stream, text in ((first, b"one"), (second, b"two")):
                        await stream.send(text)
                        assert await stream.receive() == text
                    assert (proxy.accepted, proxy.live) == (2, 2)

                    assert await proxy.cut() == 2
                    assert proxy.live == 0
                    for stream in (first, second):
                        with pytest.raises(BROKEN):  # reset: an error or at best an EOF
                            await stream.send(b"x")
                            await stream.receive()

                proxy.pause()
                refused = await anyio.connect_tcp("127.0.0.1", proxy.port)
                async with refused:
                    with pytest.raises(BROKEN):
                        await refused.send(b"x")
                        await refused.receive()
                assert proxy.refused == 1

                proxy.resume()
                third = await anyio.connect_tcp("127.0.0.1", proxy.port)
                async with third:
                    await third.send(b"three")
                    assert await third.receive() == b"three"
                assert (proxy.accepted, proxy.cut_count) == (3, 2)
            tg.cancel_scope.cancel()
