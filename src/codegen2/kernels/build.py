"""Compile a source of this package into a shared library once per user and machine, then load it.

Why not torch.utils.cpp_extension: it needs ninja and builds a Python module; the kernels are plain C on raw
pointers, so one `cc` call takes about three seconds. The one C++ source (`int8_op.cpp`, an op for PyTorch's
dispatcher) includes only torch's op-registration headers and links libtorch directly (`load_torch_op`): about
10 s on one busy core, once per machine and torch version.

The library lands in `$CODEGEN2_KERNEL_CACHE`, else `$XDG_CACHE_HOME/codegen2/kernels`, else
`~/.cache/codegen2/kernels`, named by a hash of the source, the flags and the compiler's version: a changed source
or compiler builds a new file and never overwrites one another process may have loaded. Each build writes a
temporary file and renames it into place, so processes building at once never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

from ..fsutil import atomic_file

# -ffp-contract=off: a multiply and an add stay two roundings (GCC would fuse some into one FMA), so every kernel
# path, and a naive float32 reference, give the same bits.
FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off")
_lock = threading.Lock()


class BuildError(RuntimeError):
    """The library could not be built or loaded; the message says why in one line."""


def cache_dir() -> Path:
    explicit = os.environ.get("CODEGEN2_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "codegen2" / "kernels"


def compiler() -> str:
    """The C compiler: `$CC`, else `cc`, else `gcc` on PATH."""
    name = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not name:
        raise BuildError("no C compiler found (set CC or install gcc)")
    return name


def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"cannot run the C compiler {cc!r}: {exc}") from None
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else cc


def cxx_compiler() -> str:
    """The C++ compiler: `$CXX`, else `c++`, else `g++` on PATH."""
    name = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not name:
        raise BuildError("no C++ compiler found (set CXX or install g++)")
    return name


def library_path(source: Path, command: tuple[str, ...] = FLAGS, cc: str | None = None) -> Path:
    """Where the library of `source` built by `cc` with `command` is cached (a changed input: a new name)."""
    cc = cc or compiler()
    key = hashlib.sha256(source.read_bytes() + repr((command, _compiler_version(cc))).encode()).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}.so"


def _build(source: Path, target: Path, cc: str, flags: tuple[str, ...] = FLAGS,
           libraries: tuple[str, ...] = ()) -> None:
    """Compile into a staging file renamed into place, so another process never loads half a library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:
        done = subprocess.run([cc, *flags, "-o", str(tmp), str(source), *libraries], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
            raise BuildError(f"compiling {source.name} failed: {first}")


def load(source: Path) -> ctypes.CDLL:
    """The compiled library of `source` (built on first use); BuildError with the reason if that fails."""
    with _lock:
        try:
            target = library_path(source)
            if not target.exists():
                _build(source, target, compiler())
            return ctypes.CDLL(str(target))
        except OSError as exc:  # an unwritable cache, a library the loader refuses
            raise BuildError(f"cannot build or load {source.name} in {cache_dir()}: {exc}") from None


def _torch_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compile flags, link arguments) for a C++ source against this process's torch: its headers, its C++ ABI,
    its libraries (found again at run time through the rpath)."""
    import torch

    root = Path(torch.__file__).parent
    lib = root / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ("-O2", "-std=c++20", "-fPIC", "-shared", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}")
    return flags, (f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu")


def load_torch_op(source: Path) -> Path:
    """The library of a C++ op `source` (built on first use), loaded into torch's dispatcher: its path (for
    ctypes); BuildError with the reason if it cannot be built or loaded."""
    import torch

    with _lock:
        try:
            cxx = cxx_compiler()
            flags, libraries = _torch_flags()
            target = library_path(source, (*flags, *libraries, torch.__version__), cxx)
            if not target.exists():
                _build(source, target, cxx, flags, libraries)
            torch.ops.load_library(str(target))
            return target
        except BuildError:
            raise
        except (OSError, RuntimeError) as exc:  # an unwritable cache, a library the loader or torch refuses
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BuildError(f"cannot build or load {source.name} in {cache_dir()}: {first}") from None
