"""The parent process: for each workload and system, start the worker, drive it, clean up.

For every (workload, system) pair the runner starts the system's worker as a real process in
its own session (for ``rss``, once per repetition), waits until RabbitMQ reports it consuming
its own uuid-named queue, then runs each repetition in a fresh client process and reads that
client's ``RESULT`` line. The parent samples the worker's memory but otherwise stays idle
while a client runs. Afterwards it stops the worker (its process group, by PID) and deletes the
run's queues, exchanges and Redis keys. Progress goes to stdout as it happens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.admin import Admin, WorkerDied
from benchmarks.client import RESULT_MARK
from benchmarks.common import AMQP_URL, REDIS_URL, Context
from benchmarks.procs import MemorySampler, WorkerProcess, psutil, tree_memory
from benchmarks.systems import SYSTEMS, System
from benchmarks.workloads import WORKLOADS, Workload

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT = 20.0  # seconds between "still running" lines during a long client run


@dataclass
class Sample:
    workload: str
    system: str
    row: str  # the table row: the system, or one of Celery's two enqueue variants
    family: str
    rep: int
    ok: bool
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class RunConfig:
    systems: list[str]
    workloads: list[str]
    counts: dict[str, int]
    repeat: int
    quick: bool
    out: Path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


class Runner:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.run_id = uuid.uuid4().hex[:8]
        self.prefix = f"bench-{self.run_id}:"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"aqbench-{self.run_id}-"))
        self.signal_path = str(self.tmp / "signals")
        self.samples: list[Sample] = []
        self.cold_starts: dict[str, list[float]] = {}
        self.plan = self._plan()
        self.total_steps = len(self.plan) * config.repeat
        self.step = 0
        self.started = time.monotonic()
        self.admin = Admin(AMQP_URL, REDIS_URL)

    def _plan(self) -> list[tuple[Workload, System, str, dict[str, str]]]:
        """Workload-major order, so drift between systems of one table stays small."""
        plan, seen = [], set()
        for wname in self.config.workloads:
            workload = WORKLOADS[wname]
            for sname in self.config.systems:
                system = SYSTEMS[sname]
                if wname in system.skip:
                    continue
                rows = system.enqueue_variants() if wname == "enqueue" else [(sname, {})]
                for row, options in rows:
                    if (wname, row) not in seen:  # Celery's enqueue rows: once, not per pool
                        seen.add((wname, row))
                        plan.append((workload, system, row, options))
        return plan

    # -- output --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[{_clock(time.monotonic() - self.started):>6}] {text}", flush=True)

    def _progress(self, sample: Sample, seconds: float) -> None:
        self.step += 1
        head = f"{self.step:>3}/{self.total_steps} {sample.workload:<14} {sample.row:<22} " \
               f"rep {sample.rep}/{self.config.repeat}"
        if not sample.ok:
            self.say(f"{head}  FAILED: {sample.error}")
            return
        metric = WORKLOADS[sample.workload].metrics[0]
        value = sample.metrics.get(metric.key, float("nan"))
        self.say(f"{head}  {value:,.{metric.digits}f} {metric.unit} ({seconds:.1f} s)")

    # -- one pair ------------------------------------------------------------------------

    def run(self) -> list[Sample]:
        self.say(f"run {self.run_id}: {len(self.plan)} worker/client pairs, "
                 f"{self.total_steps} client runs; logs in {self.config.out / 'logs'}")
        try:
            for workload, system, row, options in self.plan:
                self._run_pair(workload, system, row, options)
        finally:
            self.admin.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.samples

    def _context(self, workload: Workload, system: System, row: str,
                 options: dict[str, str]) -> Context:
        return Context(
            system=system.name, workload=workload.name,
            queue=f"bench-{self.run_id}-{_slug(row)}-{workload.name}",
            prefix=self.prefix, signal_path=self.signal_path, results=workload.results,
            options={**dict(system.options), **options}, extra_env=dict(system.env),
        )

    def _start_worker(self, system: System, ctx: Context, row: str) -> tuple[WorkerProcess, float]:
        log = self.config.out / "logs" / f"{_slug(row)}-{ctx.workload}-worker.log"
        worker = WorkerProcess(system.worker_argv(ctx), ctx.env(), ROOT, log)
        worker.start()
        try:
            cold = self.admin.wait_consuming(worker, ctx.queue)
        except BaseException:
            worker.stop(grace=1.0)
            raise
        self.cold_starts.setdefault(row, []).append(cold)
        return worker, cold

    def _cleanup(self, system: System, ctx: Context) -> None:
        try:
            self.admin.delete(system.queues(ctx), system.exchanges(ctx))
            self.admin.delete_keys(system.redis_patterns(ctx))
        except Exception as exc:  # reported, and the run goes on
            self.say(f"    cleanup of {ctx.queue} failed: {exc!r}")

    def _run_pair(self, workload: Workload, system: System, row: str,
                  options: dict[str, str]) -> None:
        ctx = self._context(workload, system, row, options)
        worker: WorkerProcess | None = None
        rep = 0
        try:
            if workload.worker == "shared":
                worker, cold = self._start_worker(system, ctx, row)
                self.say(f"    {row} worker consuming after {cold:.2f} s")
            for rep in range(1, self.config.repeat + 1):
                cold = 0.0
                if workload.worker == "fresh":
                    worker, cold = self._start_worker(system, ctx, row)
                started = time.monotonic()
                sample = self._client(workload, system, row, ctx, rep, worker, cold)
                self.samples.append(sample)
                self._progress(sample, time.monotonic() - started)
                if workload.worker == "fresh" and worker is not None:
                    worker.stop()
                    worker = None
                    self._cleanup(system, ctx)
        except WorkerDied as exc:
            for missed in range(max(rep, 1), self.config.repeat + 1):
                sample = Sample(workload.name, system.name, row, system.family, missed, False,
                                error=f"worker: {str(exc).splitlines()[0]}")
                self.samples.append(sample)
                self._progress(sample, 0.0)
        finally:
            if worker is not None:
                worker.stop()
            self._cleanup(system, ctx)

    def _client(self, workload: Workload, system: System, row: str, ctx: Context, rep: int,
                worker: WorkerProcess | None, cold: float) -> Sample:
        n = self.config.counts[workload.name]
        argv = [sys.executable, "-m", "benchmarks.client", workload.name, str(n)]
        if self.config.quick:
            argv.append("--quick")
        env = ctx.env()
        env["BENCH_CONTEXT"] = ctx.to_json()
        log_path = self.config.out / "logs" / f"{_slug(row)}-{workload.name}-client.log"
        sample = Sample(workload.name, system.name, row, system.family, rep, False)
        measure_memory = bool(workload.parent_metrics) and worker is not None
        if measure_memory and psutil is None:
            sample.error = "psutil is not installed (pip install --group bench)"
            return sample
        with open(log_path, "a") as log:
            proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=log, text=True)
            sampler = MemorySampler(worker.pid) if measure_memory and worker else None
            if sampler:
                sampler.__enter__()
            try:
                stdout = self._wait(proc, workload, row)
            except BaseException:  # interrupted: our client goes too, by its PID
                proc.kill()
                proc.wait()
                raise
            finally:
                if sampler:
                    sampler.__exit__()
        result = self._parse(stdout)
        if result is None:
            sample.error = f"client exited with {proc.returncode} and no result (see {log_path})"
            return sample
        sample.ok, sample.error = bool(result["ok"]), result.get("error")
        sample.metrics = {k: float(v) for k, v in result.get("metrics", {}).items()}
        if sampler:
            sample.metrics.update(peak_rss_mib=sampler.peak_rss, peak_pss_mib=sampler.peak_pss,
                                  cold_start_s=cold)
        elif worker is not None and (memory := tree_memory(worker.pid)) is not None:
            sample.metrics["worker_rss_after_mib"] = memory[0]
        return sample

    def _wait(self, proc: subprocess.Popen[str], workload: Workload, row: str) -> str:
        deadline = time.monotonic() + workload.timeout
        chunks: list[str] = []
        while True:
            try:
                out, _ = proc.communicate(timeout=HEARTBEAT)
                chunks.append(out or "")
                return "".join(chunks)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    proc.kill()  # our own client, by its PID
                    out, _ = proc.communicate()
                    return "".join(chunks) + (out or "")
                self.say(f"    ... {row} {workload.name} still running")

    @staticmethod
    def _parse(stdout: str) -> dict[str, Any] | None:
        for line in reversed(stdout.splitlines()):
            if line.startswith(RESULT_MARK):
                parsed: dict[str, Any] = json.loads(line[len(RESULT_MARK):])
                return parsed
        return None

    def meta(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "config": {**asdict(self.config), "out": str(self.config.out)},
            "duration_s": time.monotonic() - self.started,
            "cold_starts_s": self.cold_starts,
        }
