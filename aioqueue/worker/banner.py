"""The start-up banner: what this worker is, where it connects, what it serves."""

from __future__ import annotations

import platform
from datetime import datetime
from typing import TYPE_CHECKING

from ..registry import mask_password

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ("render_banner",)


def render_banner(worker: Worker, version: str, processes: int = 1) -> str:
    app = worker.app
    conf = app.conf
    backend = app.result_backend_url or "disabled"
    embedded = ""
    if app.uses_embedded_default:
        embedded = "  (embedded default: set broker_url for production)"
    acks = "late (after the result is stored)" if conf.task_acks_late else "early"
    pool = ""
    if processes > 1:
        share = -(-worker.concurrency // processes)
        pool = f", {processes} processes of {share}"
    lines = [
        f"aioqueue {version} :: {worker.hostname}",
        f"  {platform.platform()} · Python {platform.python_version()} · "
        f"{datetime.now().astimezone():%Y-%m-%d %H:%M:%S %Z}",
        "",
        "[config]",
        f"  app:          {app.main or '__main__'}:{id(app):#x}",
        f"  transport:    {mask_password(app.broker_url)}{embedded}",
        f"  results:      {mask_password(backend)}",
        f"  concurrency:  {worker.concurrency} (asyncio{pool})",
        f"  prefetch:     {worker.prefetch} ({worker.prefetch_multiplier} x concurrency)",
        f"  acks:         {acks}",
        "",
        "[queues]",
    ]
    for name in worker.queues:
        spec = app.queue_spec(name)
        exchange = spec.exchange_name or "(default)"
        lines.append(
            f"  {name:<20} exchange={exchange}({spec.exchange_type}) key={spec.binding_key}"
        )
    lines += ["", "[tasks]"]
    lines += [f"  . {name}" for name in sorted(app.tasks)] or ["  (none registered)"]
    return "\n".join(lines) + "\n"
