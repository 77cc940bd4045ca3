"""Our own RESP connection to Redis, for the result store's listener and writer.

redis-py's connection reads one reply per ``read_response()`` call, each a few awaits and a
timeout context, so a reply costs a loop iteration (the bytes wake the reading task, which
then parses them) and thousands of them most of a client's time. ``RedisWire`` is a small,
complete connection of aioqueue's own instead: an ``asyncio.Protocol`` that opens its own
socket (``loop.create_connection``, ``create_unix_connection``; TLS for ``rediss://``),
does the handshake, and parses replies in ``data_received`` with the one RESP parser
(:func:`aioqueue.results.resp.parse`), handing each to its owner in the loop iteration its
bytes arrive in. Nothing of redis-py's is touched: the parameters come from the public side,
a pool's ``connection_class`` and ``connection_kwargs`` (``wire_params``), and anything there
this module does not speak (a connection class of the user's, a credential provider, ...)
makes ``wire_params`` return None, and the store then uses redis-py's own API instead.

The handshake is pipelined in one write: on RESP3 ``HELLO 3`` with ``AUTH`` and ``SETNAME``,
on RESP2 ``AUTH`` and ``CLIENT SETNAME``; then ``SELECT`` unless the database is 0. Any
error reply fails ``open_wire`` with ``WireError``. With no protocol asked for, RESP3 is
spoken, or RESP2 on a new connection when the server does not know ``HELLO`` (before 6.0).

Replies are routed in order: ``expect(count, on_reply)`` claims the next ``count`` replies
that are not RESP3 pushes (a command's replies come in the order the commands were
written); pushes, and replies nobody claimed (a subscribed RESP2 connection answers with
plain arrays), go to ``on_push``. ``closed`` holds the connection's end: the first error
(lost, closed by Redis, bytes that are not RESP, an exception from a callback), or the
owner's ``close()``; every claim not answered yet fails with it.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

from .resp import Push, ReplyError, command, parse

__all__ = (
    "OWN_WIRE", "REDIS_PY", "RedisWire", "WireError", "WireParams", "open_wire", "wire_params",
)

#: What the listener and the writer report as their ``path``: our own connection, or
#: redis-py's public API.
OWN_WIRE = "own-wire"
REDIS_PY = "redis-py"

OnReply = Callable[[Any], None]

# Pool options (redis-py's ``connection_kwargs``) that change nothing on the wire, or that the
# wire's owner does itself (its timeouts, retries, health checks, the client name).
_NOT_ON_THE_WIRE = frozenset({
    "socket_timeout", "socket_connect_timeout", "retry", "retry_on_timeout", "retry_on_error",
    "encoding", "encoding_errors", "decode_responses", "socket_read_size", "parser_class",
    "encoder_class", "health_check_interval", "client_name", "lib_name", "lib_version",
    "driver_info", "event_dispatcher", "legacy_responses", "himport_registry",
    "maint_notifications_config", "maint_notifications_pool_handler", "orig_host_address",
    "orig_socket_timeout", "orig_socket_connect_timeout",
})
_SPOKEN = frozenset({
    "host", "port", "path", "db", "username", "password", "protocol", "socket_keepalive",
    "socket_keepalive_options",
})
_TLS = frozenset({
    "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_include_verify_flags",
    "ssl_exclude_verify_flags", "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path",
    "ssl_check_hostname", "ssl_min_version", "ssl_ciphers", "ssl_password",
})
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class WireError(ConnectionError):
    """The connection failed or ended, Redis refused the handshake, or sent what is not RESP."""


@dataclass(frozen=True, slots=True)
class WireParams:
    """Where and how to connect: what a redis-py pool of the same URL would use."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a Unix socket instead of host and port
    db: int = 0
    username: str | None = None
    password: str | None = None
    protocol: int | None = None  # None: RESP3 if the server speaks it (HELLO), else RESP2
    tls: ssl.SSLContext | None = None
    keepalive: bool = False
    keepalive_options: tuple[tuple[int, int], ...] = ()

    @property
    def where(self) -> str:
        return self.path or f"{self.host}:{self.port}"


def wire_params(connection_class: type[Any], kwargs: Mapping[str, Any]) -> WireParams | None:
    """The parameters of a redis-py pool (its public ``connection_class`` and
    ``connection_kwargs``), or None when it asks for something ``RedisWire`` does not do."""
    tls = connection_class is SSLConnection
    if connection_class not in (Connection, SSLConnection, UnixDomainSocketConnection):
        return None
    spoken = _SPOKEN | _TLS if tls else _SPOKEN
    for name, value in kwargs.items():
        if name not in spoken and name not in _NOT_ON_THE_WIRE and value is not None:
            return None  # e.g. a credential provider or a connect callback of the user's
    protocol = None if kwargs.get("protocol") is None else int(kwargs["protocol"])
    if protocol not in (None, 2, 3):
        return None
    options = kwargs.get("socket_keepalive_options") or {}
    return WireParams(
        host=str(kwargs.get("host") or "localhost"),
        port=int(kwargs.get("port") or 6379),
        path=kwargs.get("path") if connection_class is UnixDomainSocketConnection else None,
        db=int(kwargs.get("db") or 0),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        protocol=protocol,
        tls=_tls_context(kwargs) if tls else None,
        keepalive=bool(kwargs.get("socket_keepalive")),
        keepalive_options=tuple((int(k), int(v)) for k, v in dict(options).items()),
    )


def _tls_context(kwargs: Mapping[str, Any]) -> ssl.SSLContext:
    """A TLS context from redis-py's documented ``ssl_*`` options, with redis-py's defaults
    (certificates required, host name checked unless certificates are not)."""
    reqs = kwargs.get("ssl_cert_reqs", "required")
    mode = ssl.CERT_NONE if reqs is None else _CERT_REQS[reqs] if isinstance(reqs, str) else reqs
    context = ssl.create_default_context()
    context.check_hostname = bool(kwargs.get("ssl_check_hostname", True)) and (
        mode != ssl.CERT_NONE)
    context.verify_mode = mode
    for flag in kwargs.get("ssl_include_verify_flags") or ():
        context.verify_flags |= flag
    for flag in kwargs.get("ssl_exclude_verify_flags") or ():
        context.verify_flags &= ~flag
    if kwargs.get("ssl_certfile") or kwargs.get("ssl_keyfile"):
        context.load_cert_chain(kwargs.get("ssl_certfile") or kwargs["ssl_keyfile"],
                                kwargs.get("ssl_keyfile"), kwargs.get("ssl_password"))
    if kwargs.get("ssl_ca_certs") or kwargs.get("ssl_ca_data") or kwargs.get("ssl_ca_path"):
        context.load_verify_locations(kwargs.get("ssl_ca_certs"), kwargs.get("ssl_ca_path"),
                                      kwargs.get("ssl_ca_data"))
    if kwargs.get("ssl_min_version") is not None:
        context.minimum_version = kwargs["ssl_min_version"]
    if kwargs.get("ssl_ciphers") is not None:
        context.set_ciphers(kwargs["ssl_ciphers"])
    return context


class _Claim:
    """The next ``left`` replies, for ``on_reply``; ``done`` when the last one came."""

    __slots__ = ("done", "left", "on_reply")

    def __init__(self, left: int, on_reply: OnReply | None, done: asyncio.Future[None]) -> None:
        self.left = left
        self.on_reply = on_reply
        self.done = done


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _set_error(future: asyncio.Future[None], error: BaseException) -> None:
    """Fail a claim's future, marked as seen: its owner may not wait on it (the end of the
    connection is reported by ``closed``), and an unseen error would be logged."""
    if not future.done():
        future.set_exception(error)
        future.exception()


class RedisWire(asyncio.Protocol):
    """One Redis connection of our own (module docstring). Made by ``open_wire``."""

    def __init__(self, on_push: OnReply | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.on_push = on_push
        #: RESP version spoken, once the handshake is done.
        self.protocol = 2
        #: Fails with the first error or ``close()``; never succeeds.
        self.closed: asyncio.Future[None] = loop.create_future()
        self.closed.add_done_callback(_retrieved)
        #: When bytes last came (loop time): the owner's health check.
        self.last_data = loop.time()
        self._time = loop.time
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._lost: asyncio.Future[None] = loop.create_future()
        self._claims: collections.deque[_Claim] = collections.deque()
        self._rest = b""
        self._parts: list[bytes] = []
        self._have = self._needed = 0
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused

    # -- what the owner calls --------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        transport = self._transport
        return transport is not None and not self.closed.done() and not transport.is_closing()

    def write(self, data: Iterable[bytes]) -> None:
        """Write commands (RESP bytes) now; raises ``WireError`` if the connection is over."""
        transport = self._transport
        if transport is None or not self.is_open:
            raise self._ended()
        transport.writelines(data)

    def expect(
        self, count: int, on_reply: OnReply | None = None,
        done: asyncio.Future[None] | None = None,
    ) -> asyncio.Future[None]:
        """Claim the next ``count`` replies (pushes aside): each goes to ``on_reply`` as it
        arrives. The future (``done``, if given; ``on_reply`` may complete it first)
        completes after the last one, or fails with the connection."""
        if done is None:
            done = self._loop.create_future()
        if self.closed.done():
            _set_error(done, self._ended())
        elif count <= 0:
            if not done.done():
                done.set_result(None)
        else:
            self._claims.append(_Claim(count, on_reply, done))
        return done

    async def call(self, commands: Sequence[Sequence[bytes]]) -> list[Any]:
        """Write ``commands`` and return their replies (error replies as ``ReplyError``)."""
        replies: list[Any] = []
        done = self.expect(len(commands), replies.append)
        self.write([command(*args) for args in commands])
        await done
        return replies

    async def drain(self) -> None:
        """Wait until the transport takes more (it asked to pause), or the connection ends."""
        writable = self._writable
        if writable is not None:
            await asyncio.wait((writable, self.closed), return_when=asyncio.FIRST_COMPLETED)
        if self.closed.done():
            raise self._ended()

    def keep_alive(self, options: Iterable[tuple[int, int]] = ()) -> None:
        """TCP keepalive on the socket (SO_KEEPALIVE, then ``options`` at IPPROTO_TCP)."""
        sock = None if self._transport is None else self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in options:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)

    def close(self) -> None:
        """End the connection (every claim fails). Idempotent."""
        self._fail(WireError("the connection was closed"))

    async def aclose(self) -> None:
        """``close()`` and wait (briefly) until the transport let go of the socket."""
        self.close()
        transport = self._transport
        if transport is None:
            return
        try:
            async with asyncio.timeout(1.0):
                await asyncio.shield(self._lost)
        except TimeoutError:
            transport.abort()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always a subclass of asyncio's (uvloop's is not).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.closed.done():
            return  # being closed: nothing more is read
        self.last_data = self._time()
        if self._rest or self._parts:  # the end of a reply that began in an earlier read
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._needed:
                return
            data = self._rest + b"".join(self._parts)
            self._parts.clear()
        try:
            replies, self._rest, self._needed = parse(data)
        except ValueError as exc:
            self._fail(WireError(f"unreadable reply from Redis: {exc}"))
            return
        self._have = len(self._rest)
        try:
            for reply in replies:
                self._route(reply)
        except Exception as exc:  # from a callback: the connection is out of step now
            self._fail(exc)

    def eof_received(self) -> bool:
        self._fail(WireError("Redis closed the connection"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(WireError(f"the connection to Redis was lost: {exc}" if exc
                             else "the connection to Redis was closed"))
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # -- inside ----------------------------------------------------------------------------

    def _route(self, reply: Any) -> None:
        if self._claims and not isinstance(reply, Push):
            claim = self._claims[0]
            claim.left -= 1
            if claim.on_reply is not None:
                claim.on_reply(reply)  # if it raises, _fail fails the claim with the rest
            if claim.left == 0:
                self._claims.popleft()
                if not claim.done.done():
                    claim.done.set_result(None)
        elif self.on_push is not None:
            self.on_push(reply)
        elif not isinstance(reply, Push):  # pushes nobody asked for (none expected) aside
            raise WireError(f"a reply from Redis nobody asked for: {reply!r:.100}")

    def _ended(self) -> BaseException:
        if self.closed.done() and not self.closed.cancelled():
            error = self.closed.exception()
            if error is not None:
                return error
        return WireError("the connection to Redis is closed")

    def _fail(self, error: Exception) -> None:
        if self.closed.done():
            return
        self.closed.set_exception(error)
        claims, self._claims = self._claims, collections.deque()
        for claim in claims:
            _set_error(claim.done, error)
        self.resume_writing()
        if self._transport is not None:
            self._transport.close()
        elif not self._lost.done():
            self._lost.set_result(None)


async def open_wire(
    params: WireParams, name: str | None = None, on_push: OnReply | None = None
) -> RedisWire:
    """Connect and do the handshake (module docstring); ``name`` for CLIENT SETNAME.

    Raises ``WireError`` (an ``OSError``). The caller bounds the time it may take."""
    loop = asyncio.get_running_loop()
    wire = RedisWire()
    try:
        if params.path is not None:
            await loop.create_unix_connection(lambda: wire, params.path, ssl=params.tls)
        else:
            await loop.create_connection(lambda: wire, params.host, params.port, ssl=params.tls)
    except OSError as exc:
        raise WireError(f"cannot connect to Redis at {params.where}: {exc}") from exc
    try:
        if params.keepalive:
            wire.keep_alive(params.keepalive_options)
        commands = _handshake(params, name)
        if commands:
            replies = await wire.call(commands)
            for args, reply in zip(commands, replies, strict=True):
                if isinstance(reply, ReplyError):
                    if params.protocol is None and str(reply).startswith("ERR unknown command"):
                        await wire.aclose()  # a server before HELLO: RESP2 it is
                        return await open_wire(replace(params, protocol=2), name, on_push)
                    raise WireError(f"Redis refused {args[0].decode()}: {reply}")
    except BaseException:
        await wire.aclose()
        raise
    wire.protocol = params.protocol or 3
    wire.on_push = on_push
    return wire


def _handshake(params: WireParams, name: str | None) -> list[list[bytes]]:
    secret = params.password or ""
    auth = bool(params.password or params.username)
    commands: list[list[bytes]] = []
    if params.protocol != 2:
        hello = [b"HELLO", b"3"]
        if auth:
            hello += [b"AUTH", (params.username or "default").encode(), secret.encode()]
        if name:
            hello += [b"SETNAME", name.encode()]
        commands.append(hello)
    else:
        if auth:
            user = [params.username.encode()] if params.username else []
            commands.append([b"AUTH", *user, secret.encode()])
        if name:
            commands.append([b"CLIENT", b"SETNAME", name.encode()])
    if params.db:
        commands.append([b"SELECT", str(params.db).encode()])
    return commands
