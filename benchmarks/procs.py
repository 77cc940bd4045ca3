"""Worker processes and their memory: start, wait, sample, stop (only our own, by PID).

Each worker starts in a session of its own, so its process group holds exactly the worker
and the children it forks (Celery's prefork pool, Dramatiq's and taskiq's worker processes);
stopping signals that group and nothing else: SIGTERM, then SIGKILL after a grace period.
On Linux a worker also gets SIGTERM when the runner itself dies (killed by a test timeout,
say), so no worker outlives the run that started it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

try:  # optional: the bench dependency group; without it memory is not measured
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

MIB = 1024 * 1024
_PR_SET_PDEATHSIG = 1


def _parent_death_signal() -> object:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl

    def arm() -> None:  # runs in the child between fork and exec: nothing but the call
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return arm


class WorkerProcess:
    """One worker started from an argv, its output going to ``log_path``."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.argv, self.env, self.cwd, self.log_path = argv, env, cwd, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_parent_death_signal(),  # type: ignore[arg-type]
            )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - the id was reused by someone else
            return False
        return True

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the worker's process group, SIGKILL whatever is left after ``grace``."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not self._group_alive():
                break
            time.sleep(0.02)
        else:
            self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        for _ in range(250):  # forked children exit just after the leader
            if not self._group_alive():
                break
            time.sleep(0.02)
        self.proc = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def tree_memory(pid: int, full: bool = False) -> tuple[float, float] | None:
    """(RSS, PSS) in MiB summed over ``pid`` and its descendants; PSS only if ``full``."""
    if psutil is None:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    rss = pss = 0
    for proc in procs:
        try:
            if full:
                info = proc.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
            else:
                rss += proc.memory_info().rss
        except psutil.Error:
            continue
    return rss / MIB, pss / MIB


class MemorySampler:
    """Samples a process tree's RSS and PSS every ``interval`` s in a thread; keeps peaks."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            found = tree_memory(self.pid, full=True)
            if found is not None:
                self.peak_rss = max(self.peak_rss, found[0])
                self.peak_pss = max(self.peak_pss, found[1])
                self.samples += 1
            self._stop.wait(self.interval)
