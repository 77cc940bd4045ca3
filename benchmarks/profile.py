"""Profile aioqueue's worker and client under a workload with py-spy (sampling, no rebuild).

``python -m benchmarks.profile [--workload noop] [--n 20000] [--out DIR]`` starts an aioqueue
worker as the suite does, attaches ``py-spy record`` to it, runs the suite's client for the
workload under ``py-spy record`` too, then prints the top costs of each process: by function
(self time, where the CPU actually is) and by package (inclusive, what a layer costs). The
raw collapsed stacks stay in ``DIR`` for flame graphs (``inferno``, speedscope). Sampling is
``--nonblocking``: the processes are never paused, so timings stay close to a normal run.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.admin import Admin
from benchmarks.common import AMQP_URL, REDIS_URL, Context
from benchmarks.procs import WorkerProcess
from benchmarks.systems import SYSTEMS
from benchmarks.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:]*):?\d*\)$")
PACKAGES = ("aioqueue", "aio_pika", "aiormq", "pamqp", "redis", "anyio", "orjson", "asyncio",
            "benchmarks", "logging", "uuid", "datetime")


def _package(path: str) -> str:
    for name in PACKAGES:
        if f"/{name}/" in path or path.startswith(f"{name}/"):
            return name
    return "other"


def summarize(path: Path, title: str, top: int = 15) -> str:
    own: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        match = FRAME.match(frames[-1])
        own[frames[-1] if match is None else f"{match['func']} ({match['file']})"] += count
        seen = set()
        for frame in frames:
            found = FRAME.match(frame)
            seen.add(_package(found["file"]) if found else "other")
        for name in seen:
            layers[name] += count
    if not total:
        return f"{title}: no samples"
    lines = [f"{title}: {total} samples", "  self time (top functions):"]
    lines += [f"    {100 * c / total:5.1f}%  {name}" for name, c in own.most_common(top)]
    lines.append("  inclusive time by package (a sample counts once per package on its stack):")
    lines += [f"    {100 * c / total:5.1f}%  {name}" for name, c in layers.most_common()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("--workload", default="noop", choices=sorted(WORKLOADS))
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "aq-profile")
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise SystemExit("py-spy is not installed: pip install --group bench")
    args.out.mkdir(parents=True, exist_ok=True)
    system, workload = SYSTEMS["aioqueue"], WORKLOADS[args.workload]
    run = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix=f"aqprof-{run}-"))
    ctx = Context(system="aioqueue", workload=workload.name,
                  queue=f"bench-{run}-profile-{workload.name}", prefix=f"bench-{run}:",
                  signal_path=str(tmp / "signals"), results=workload.results)
    admin = Admin(AMQP_URL, REDIS_URL)
    worker = WorkerProcess(system.worker_argv(ctx), ctx.env(), ROOT, args.out / "worker.log")
    recorder: subprocess.Popen[bytes] | None = None
    common = ["--format", "raw", "--nonblocking", "--rate", str(args.rate)]
    try:
        worker.start()
        admin.wait_consuming(worker, ctx.queue)
        recorder = subprocess.Popen(
            [pyspy, "record", *common, "-o", str(args.out / "worker.txt"), "--pid",
             str(worker.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        env = ctx.env()
        env["BENCH_CONTEXT"] = ctx.to_json()
        client = [sys.executable, "-m", "benchmarks.client", workload.name, str(args.n)]
        done = subprocess.run(
            [pyspy, "record", *common, "-o", str(args.out / "client.txt"), "--", *client],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        print(next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT")), done.stderr))
    finally:
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            recorder.wait(30)
        worker.stop()
        admin.delete(system.queues(ctx), system.exchanges(ctx))
        admin.delete_keys(system.redis_patterns(ctx))
        admin.close()
        shutil.rmtree(tmp, ignore_errors=True)
    for name in ("worker", "client"):
        path = args.out / f"{name}.txt"
        if path.exists():
            print(summarize(path, f"aioqueue {name}, {workload.name} x {args.n:,}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
