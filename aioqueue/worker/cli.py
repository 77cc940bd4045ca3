"""Command line: ``aioqueue worker -A tasks`` and ``python -m aioqueue.worker -A tasks``.

The only place that configures logging and reads the process environment.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

import anyio
import anyio.abc

from .. import config
from ..app import AioQueue
from ..exceptions import AioQueueError
from .banner import render_banner
from .supervisor import child_commands, supervise
from .worker import Worker

__all__ = ("find_app", "main", "worker_main")

logger = logging.getLogger("aioqueue.worker")

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(name)s] %(message)s"
_OFF = {"0", "false", "no", "off"}


def find_app(spec: str) -> AioQueue:
    """Resolve ``-A``: ``module``, ``module:attr`` or ``module.attr``.

    A bare module is searched for ``app``, then ``celery``, then any ``AioQueue`` in it.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as Celery does: -A names modules of the cwd
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if attr or "." not in module_name or exc.name != module_name:
            raise
        module_name, _, attr = module_name.rpartition(".")
        module = importlib.import_module(module_name)
    if attr:
        found = getattr(module, attr, None)
        if not isinstance(found, AioQueue):
            raise AioQueueError(f"{module_name}:{attr} is not an AioQueue app")
        return found
    for name in ("app", "celery"):
        found = getattr(module, name, None)
        if isinstance(found, AioQueue):
            return found
    apps = [v for v in vars(module).values() if isinstance(v, AioQueue)]
    if len(apps) == 1:
        return apps[0]
    raise AioQueueError(
        f"no app found in module {module_name!r}: name it 'app' or pass -A {module_name}:name"
    )


def _hostname(value: str | None) -> str | None:
    if value is None:
        return None
    host = socket.gethostname()
    return value.replace("%h", host).replace("%n", host.split(".")[0])


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Start an aioqueue worker.")
    parser.add_argument("-A", "--app", required=True, help="module, module:app or module.app")
    parser.add_argument(
        "-l", "--loglevel", default="WARNING",
        type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="logging level (default WARNING)",
    )
    parser.add_argument(
        "-c", "--concurrency", type=_positive, help="tasks run at once (default 100)"
    )
    parser.add_argument("-Q", "--queues", help="comma-separated queues to consume")
    parser.add_argument("-n", "--hostname", help="node name; %%h is the host name")
    parser.add_argument(
        "--prefetch-multiplier", type=_positive, help="prefetch = concurrency x this"
    )
    parser.add_argument("--shutdown-timeout", type=float, help="seconds to drain on SIGTERM")
    parser.add_argument(
        "--processes", type=_processes, default=1,
        help="worker processes, each with its own event loop (default 1; auto = CPU count)",
    )
    parser.add_argument(
        "--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
        help="event loop: uvloop when installed (aioqueue[uvloop]) with auto (the default)",
    )
    parser.add_argument("--no-banner", action="store_true", help=argparse.SUPPRESS)
    return parser


def _processes(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    return _positive(text)


def _use_uvloop(choice: str) -> bool:
    if choice == "asyncio":
        return False
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        raise AioQueueError("--loop uvloop needs uvloop: pip install 'aioqueue[uvloop]'")
    return installed


def _worker(app: AioQueue, options: argparse.Namespace) -> Worker:
    return Worker(
        app,
        queues=[q for q in options.queues.split(",") if q] if options.queues else None,
        concurrency=options.concurrency,
        prefetch_multiplier=options.prefetch_multiplier,
        hostname=_hostname(options.hostname),
        shutdown_timeout=options.shutdown_timeout,
    )


def _child_options(options: argparse.Namespace) -> list[str]:
    """The options every child of ``--processes N`` repeats (the rest is per child)."""
    argv = ["-A", options.app, "--loglevel", options.loglevel, "--loop", options.loop]
    for flag, value in (("-Q", options.queues), ("--prefetch-multiplier",
                        options.prefetch_multiplier), ("--shutdown-timeout",
                        options.shutdown_timeout)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


async def _watch_signals(
    worker: Worker, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                logger.warning(
                    "%s received: stopping (running tasks get %ss; signal again to stop now)",
                    signal.Signals(signum).name, worker.shutdown_timeout,
                )
                worker.stop()
            else:
                logger.warning("Second signal: cancelling running tasks now")
                worker.stop(immediate=True)


async def _serve(app: AioQueue, options: argparse.Namespace, version: str) -> None:
    worker = _worker(app, options)
    async with anyio.create_task_group() as tg:
        # Signals are watched before anything else, so a SIGTERM at any point is graceful.
        await tg.start(_watch_signals, worker)
        if not options.no_banner:
            print(render_banner(worker, version), flush=True)
        async with app:
            await worker.run()
        tg.cancel_scope.cancel()
    logger.info("Worker %s stopped", worker.hostname)


def worker_main(argv: Sequence[str] | None = None, prog: str = "python -m aioqueue.worker") -> int:
    options = _parser(prog).parse_args(argv)
    logging.basicConfig(level=options.loglevel, format=LOG_FORMAT, stream=sys.stderr)
    from .. import __version__

    if os.environ.get("AIOQUEUE_FAST_PATHS", "").strip().lower() in _OFF:
        config.fast_paths_default = False  # before the app module makes its settings

    try:
        app = find_app(options.app)
        for module in app.include:
            importlib.import_module(module)
        uvloop = _use_uvloop(options.loop)
        if options.processes > 1:
            worker = _worker(app, options)
            print(render_banner(worker, __version__, processes=options.processes), flush=True)
            commands = child_commands(
                _child_options(options), options.processes, worker.concurrency, worker.hostname
            )
            return anyio.run(supervise, commands, backend_options={"use_uvloop": uvloop})
        anyio.run(_serve, app, options, __version__, backend_options={"use_uvloop": uvloop})
    except (AioQueueError, BaseExceptionGroup) as exc:
        error = _our_error(exc)
        if error is None:
            raise
        print(f"aioqueue: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - a signal that arrived before the handler
        return 130
    return 0


def _our_error(exc: BaseException) -> AioQueueError | None:
    """Our error, also when task groups wrapped it; None for anything else."""
    if isinstance(exc, AioQueueError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _our_error(inner)) is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``aioqueue <command>``; the only command today is ``worker``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print("usage: aioqueue worker -A MODULE [options]\n\ncommands:\n  worker  start a worker")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "worker":
        return worker_main(rest, prog="aioqueue worker")
    print(f"aioqueue: unknown command {command!r}; try 'aioqueue worker -A tasks'",
          file=sys.stderr)
    return 2
