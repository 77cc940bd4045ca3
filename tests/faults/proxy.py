"""A TCP proxy the fault tests control: cut every live connection, refuse new ones, count them.

``async with tcp_proxy(5672) as proxy:`` listens on ``127.0.0.1:<proxy.port>`` (a free port
picked by the kernel) and forwards each connection to ``127.0.0.1:5672``. A worker whose
broker or result-store URL names ``proxy.port`` then talks through it, and the test can

* ``await proxy.cut()``: reset every live connection (TCP RST, as when a network path or a
  load balancer fails) and return once they are all closed;
* ``proxy.pause()`` / ``proxy.resume()``: while paused, every new connection is accepted and
  reset at once (the client sees a connection that dies during its handshake, as when the
  server is restarting); connections already open are left alone;
* ``proxy.freeze()`` / ``proxy.thaw()``: while frozen, nothing is forwarded either way and
  nothing is closed (a connection gone silent: a dead NAT entry, a frozen broker);
* read ``accepted`` (connections forwarded), ``refused`` (reset while paused, or the target
  did not answer), ``cut`` (closed by ``cut()``) and ``live`` (open now).

It runs in-process, on the test's own event loop: the listener and one task per connection
live in a task group opened by ``tcp_proxy()`` in the test body, so the proxy lives exactly
as long as the ``async with`` block, and leaving the block (normally, by an exception or by
the test's timeout) closes the listener and resets every connection. The price of running
on the test's loop: the test must never block that loop while the proxy matters (it waits
for other processes with ``eventually``, never ``time.sleep`` or ``Popen.wait``), or the
proxy would stall, and with it the worker's connection.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import SocketAttribute, SocketStream

__all__ = ("TcpProxy", "tcp_proxy")

# Seconds allowed to reach the target (loopback: anything longer means it is down).
_CONNECT_TIMEOUT = 5.0
# Seconds cut() waits for the connections it reset to be closed.
_CUT_TIMEOUT = 5.0


def _reset_on_close(stream: SocketStream) -> None:
    """Make closing ``stream`` send a TCP RST instead of a FIN (SO_LINGER with timeout 0)."""
    try:
        raw = stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already closed: nothing to reset


class _Connection:
    __slots__ = ("closed", "scope", "was_cut")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.closed = anyio.Event()
        self.was_cut = False


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to a target; see the module docstring. Made by tcp_proxy()."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self.refused = 0
        self.cut_count = 0
        self.paused = False
        self._thawed = anyio.Event()
        self._thawed.set()
        self._live: set[_Connection] = set()

    @property
    def live(self) -> int:
        return len(self._live)

    def pause(self) -> None:
        """Reset every new connection until resume(); open ones are not touched."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def freeze(self) -> None:
        """Forward nothing, close nothing, until thaw()."""
        if self._thawed.is_set():
            self._thawed = anyio.Event()

    def thaw(self) -> None:
        self._thawed.set()

    async def cut(self) -> int:
        """Reset every live connection; returns how many, once all of them are closed."""
        victims = list(self._live)
        for connection in victims:
            connection.was_cut = True
            connection.scope.cancel()
        with anyio.fail_after(_CUT_TIMEOUT):
            for connection in victims:
                await connection.closed.wait()
        self.cut_count += len(victims)
        return len(victims)

    async def _handle(self, client: SocketStream) -> None:
        if self.paused:
            self.refused += 1
            _reset_on_close(client)
            await client.aclose()
            return
        try:
            with anyio.fail_after(_CONNECT_TIMEOUT):
                upstream = await anyio.connect_tcp(self.target_host, self.target_port)
        except (OSError, TimeoutError):
            self.refused += 1
            _reset_on_close(client)
            await client.aclose()
            return
        self.accepted += 1
        connection = _Connection()
        self._live.add(connection)
        try:
            with connection.scope:
                async with anyio.create_task_group() as pumps:
                    pumps.start_soon(self._pump, client, upstream, pumps.cancel_scope)
                    pumps.start_soon(self._pump, upstream, client, pumps.cancel_scope)
        finally:
            if connection.was_cut:
                _reset_on_close(client)
                _reset_on_close(upstream)
            with anyio.CancelScope(shield=True):
                await client.aclose()
                await upstream.aclose()
            self._live.discard(connection)
            connection.closed.set()

    async def _pump(
        self, source: SocketStream, sink: SocketStream, both: anyio.CancelScope
    ) -> None:
        """Copy one direction; an EOF is passed on (half-close), an error ends both."""
        try:
            async for chunk in source:
                await self._thawed.wait()  # frozen: held back, not lost
                await sink.send(chunk)
            await sink.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            both.cancel()


@asynccontextmanager
async def tcp_proxy(target_port: int, target_host: str = "127.0.0.1") -> AsyncIterator[TcpProxy]:
    """Run a TcpProxy to ``target_host:target_port`` for the duration of the block."""
    proxy = TcpProxy(target_host, target_port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        proxy.port = listener.extra(SocketAttribute.local_port)
        tg.start_soon(listener.serve, proxy._handle, tg)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()
