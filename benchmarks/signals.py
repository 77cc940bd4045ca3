"""Completion signals for the workloads that do not read results.

Without a result backend a client cannot see when the last task finished, so the ``*_sig``
tasks of every system call :func:`signal_done` as their last statement: it writes one byte to
a Unix stream socket connected to the client (one connection per worker process, made on
first use). That is the same one small system call in every system, no broker, no Redis, no
framework, so it adds the same tiny cost to all of them. The client reads the bytes in bulk
from a thread (one ``recv`` collects thousands of signals, so it hardly competes for the GIL
with the client's own work) and counts them. A stream socket, unlike a datagram one, buffers
hundreds of kilobytes, so a sender never waits for the client in practice.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time

_lock = threading.Lock()  # a gevent lock under Celery's gevent pool: greenlets take turns
_sock: socket.socket | None = None
_pid = 0


def _connect() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ["BENCH_SIGNAL"])
    return sock


def signal_done() -> None:
    """Tell the client one task finished (called inside tasks, in any worker process)."""
    global _sock, _pid
    with _lock:
        for _ in range(2):  # the second try reconnects to a new client after the last one left
            try:
                if _sock is None or _pid != os.getpid():
                    _sock, _pid = _connect(), os.getpid()
                _sock.sendall(b"1")
                return
            except OSError:
                if _sock is not None:
                    _sock.close()
                _sock = None
        # No client listening (a message left over from an earlier run): nothing to tell.


class SignalCounter:
    """Client side: accepts the workers' connections and counts bytes in a thread."""

    def __init__(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._path = path
        self._count = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._drain, name="signals", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stopped:
            for key, _ in self._selector.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    conn, _ = self._listener.accept()
                    conn.setblocking(False)
                    self._selector.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._selector.unregister(sock)
                    sock.close()
                    continue
                with self._cond:
                    self._count += len(data)
                    self._cond.notify_all()

    @property
    def count(self) -> int:
        return self._count

    def wait_for(self, target: int, timeout: float) -> int:
        """Block until ``count >= target`` or ``timeout`` seconds; returns the count."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._count < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            return self._count

    def close(self) -> None:
        self._stopped = True
        self._thread.join(1.0)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        if os.path.exists(self._path):
            os.unlink(self._path)
