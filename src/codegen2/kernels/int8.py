"""int8 matmuls on the CPU through the native kernel in int8_matmul.c, with PyTorch's kernels as the fallback.

`int8_matmul(x, q, scales, bias, dynamic)` computes x @ (q * scales[:, None]).T + bias for fp32 x [M, K] and int8
rows q [N, K]: `dynamic=True` rounds each row of x to int8 first (the `int8-dynamic` format), False keeps x in fp32
(the `int8` weight-only format). `native_available()` says whether the native kernel runs here and, if not, why.

The kernel has one path per kind of x86 CPU (`PATHS`): `avx2` (AVX2 and FMA: AMD Zen 1-3, older Intel), `vnni`
(AVX-512 VNNI) and `amx` (AMX int8 tiles, dynamic only). `cpu_level()` detects the best one this CPU and OS run;
`path_for` and `tile_rows` pick by a fixed rule on the CPU and the shape (never a timing taken at load: the rule
was measured once, docs/benchmarks.md). Every path gives the same bits for int8-dynamic (exact int32 sums, one
rescale). Weight-only: `avx2` and `vnni` multiply-add fp32 rows in the same order (the same bits); `amx` splits each
fp32 row into three int8 pieces (int8_matmul.c says why; within about 2^-24 of the row's largest value, tested),
on tiles or VNNI instructions with the same bits. One weight always runs one scheme, so a row's result never
depends on its batch.

The kernel is registered as the op `codegen2::int8_matmul` so that torch.compile keeps it as one call in a
compiled graph; eager callers skip the op dispatcher and call the library directly (`_run`, 11 us a call). That
op's implementation is Python (ctypes): about 20 us a call against 3 us for the C call. So before a decoder
compiles, `prepare_compiled_op()` builds `int8_op.cpp`, the same kernels behind the dispatcher in C++
(`codegen2::int8_matmul_native`, same arguments, same bits, 4 us a call), and compiled graphs, and eager calls
from then on, use that one; where it cannot be built (no C++ compiler or torch headers) they keep the Python op.
`CODEGEN2_INT8_OP=python` forces the Python op (tests, or a machine where the C++ build misbehaves).

`CODEGEN2_INT8_KERNEL` chooses: `auto` (default: native where it runs, the rule's path), `native` (the same, an
error where no path runs), `amx` / `vnni` / `avx2` (that path wherever the rule would use a higher one: an error
where the CPU lacks it; tests and benchmarks force paths this way), `torch` (never native; PyTorch's kernels).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch

from ..errors import UserError
from .build import BuildError, load, load_torch_op

SOURCE = Path(__file__).with_name("int8_matmul.c")
OP_SOURCE = Path(__file__).with_name("int8_op.cpp")
OP_CHOICES = ("auto", "python")
PATHS = {"avx2": 1, "vnni": 2, "amx": 3}  # the kernel's PATH_* numbers; a CPU level runs every path up to it
CHOICES = ("auto", "native", *PATHS, "torch")
# The rule (measured on a Xeon with AMX, docs/benchmarks.md): AMX tiles from this many input rows on (batch 8 and
# prefill); fewer rows are memory-bound and stream the weights a little faster through VNNI instructions.
AMX_MIN_ROWS = 8

_state: dict[str, object] = {}
_registered: list[str] = []  # the C++ op's fake (shape) implementation, registered with torch once


def _choice() -> str:
    value = os.environ.get("CODEGEN2_INT8_KERNEL", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise UserError(f"CODEGEN2_INT8_KERNEL={value!r}: choose one of {', '.join(CHOICES)}")
    return value


def _library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (the reason is kept for `native_available`). Built once per process."""
    if "lib" not in _state:
        lib, why, level = None, "", 0
        try:
            candidate = load(SOURCE)
            level = candidate.int8_cpu_level()
            if level > 0:
                lib = candidate
                pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
                lib.int8_matmul_dynamic.argtypes = [pointer, size, size, pointer, size, pointer, pointer, pointer,
                                                    pointer, flag, flag, flag]
                lib.int8_matmul_weight_only.argtypes = [pointer, size, size, pointer, size, pointer, pointer, pointer,
                                                        flag, flag, flag]
                lib.int8_matmul_dynamic.restype = lib.int8_matmul_weight_only.restype = ctypes.c_int
                lib.int8_row_sums.argtypes = [pointer, size, size, pointer]
                lib.int8_row_sums.restype = None
            else:
                why = "this CPU lacks AVX2 and FMA"
        except BuildError as exc:
            why = str(exc)
        _state["lib"], _state["why"], _state["level"] = lib, why, level
    return _state["lib"]  # type: ignore[return-value]


def cpu_level() -> str | None:
    """The best native path this CPU and OS run (`amx`, `vnni`, `avx2`), or None (no AVX2, or no compiler)."""
    _library()
    level = int(_state["level"])  # type: ignore[arg-type]
    return next((name for name, number in PATHS.items() if number == level), None)


def native_available() -> tuple[bool, str]:
    """(True, "") when the native kernel will be used on CPU tensors; else (False, the reason in one line).

    Decided once per process (the first int8 matmul builds or loads the library); `reset()` forgets the decision.
    """
    if "available" not in _state:
        choice = _choice()
        if choice == "torch":
            _state["available"] = (False, "CODEGEN2_INT8_KERNEL=torch")
        elif _library() is None:
            why = str(_state["why"])
            if choice != "auto":
                raise UserError(f"CODEGEN2_INT8_KERNEL={choice}: the native int8 kernel cannot run here: {why}")
            _state["available"] = (False, why)
        else:
            level = int(_state["level"])  # type: ignore[arg-type]
            if choice in PATHS and PATHS[choice] > level:
                raise UserError(f"CODEGEN2_INT8_KERNEL={choice}: this CPU runs at most the {cpu_level()} path")
            _state["ceiling"] = PATHS[choice] if choice in PATHS else level
            _state["available"] = (True, "")
            _configure_op()
    return _state["available"]  # type: ignore[return-value]


def path_for(k: int) -> int:
    """The kernel path (a PATHS number) for a matmul whose weight rows hold k values: the CPU's best path, capped by
    CODEGEN2_INT8_KERNEL, except that AMX takes only k a multiple of 64 (VNNI the rest). A fixed rule of the CPU and
    the weight's shape, so one weight always runs one scheme: a row's result never depends on its batch."""
    if "ceiling" not in _state:
        native_available()
    ceiling = int(_state["ceiling"])  # type: ignore[arg-type]
    return PATHS["vnni"] if ceiling == PATHS["amx"] and k % 64 else ceiling


def tile_rows() -> int:
    """On the AMX path, calls of at least this many input rows (pieces, for weight-only) run on the tiles and the
    rest on VNNI instructions, with the same bits; forced `amx`: every call on the tiles."""
    return 1 if _choice() == "amx" else AMX_MIN_ROWS


def reset() -> None:
    """Forget the per-process decision (tests that change CODEGEN2_INT8_KERNEL or CODEGEN2_INT8_OP); the libraries
    stay loaded."""
    for key in ("available", "ceiling", "op"):
        _state.pop(key, None)


def _configure_op() -> None:
    """Hand the C++ op (if loaded) the kernel library and the rule's current state, so it runs what `_run` runs."""
    op_lib = _state.get("op_lib")
    if op_lib is not None and "ceiling" in _state:
        lib = _state["lib"]
        op_lib.codegen2_int8_op_configure(  # type: ignore[attr-defined]
            ctypes.cast(lib.int8_matmul_dynamic, ctypes.c_void_p), ctypes.cast(lib.int8_matmul_weight_only,
                                                                               ctypes.c_void_p),
            int(_state["ceiling"]), tile_rows())  # type: ignore[arg-type]


def prepare_compiled_op() -> tuple[str, str]:
    """Choose the op compiled graphs call: ("native", "") for the C++ op (built on first use, about 10 s once per
    machine and torch version), else ("python", why). Call before compiling; decided once per process (`reset`)."""
    if "op" not in _state:
        choice = os.environ.get("CODEGEN2_INT8_OP", "auto").strip().lower() or "auto"
        if choice not in OP_CHOICES:
            raise UserError(f"CODEGEN2_INT8_OP={choice!r}: choose one of {', '.join(OP_CHOICES)}")
        available = native_available()[0]  # decided here, never first inside a graph being traced
        if choice == "python":
            _state["op"] = ("python", "CODEGEN2_INT8_OP=python")
        elif not available:
            _state["op"] = ("python", "the native kernel does not run here")
        else:
            _state["op"] = _load_op()
    return _state["op"]  # type: ignore[return-value]


def _load_op() -> tuple[str, str]:
    """Build and load int8_op.cpp once per process: ("native", "") or ("python", the reason in one line)."""
    if "op_lib" not in _state:
        try:
            path = load_torch_op(OP_SOURCE)
            op_lib = ctypes.CDLL(str(path))  # the library torch just loaded: the same handle
            op_lib.codegen2_int8_op_configure.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                          ctypes.c_int]
            op_lib.codegen2_int8_op_configure.restype = None
            if not _registered:  # once per process, however often the state is reset
                torch.library.register_fake("codegen2::int8_matmul_native")(_fake)
                _registered.append("codegen2::int8_matmul_native")
            _state["op_lib"] = op_lib
        except (BuildError, AttributeError) as exc:
            _state["op_lib"], _state["op_why"] = None, str(exc)
    if _state["op_lib"] is None:
        return "python", str(_state["op_why"])
    _configure_op()
    return "native", ""


def note_kernel_choice() -> None:
    """Say once per process, on stderr, when int8 on the CPU falls back to PyTorch's slower kernels and why."""
    available, why = native_available()
    if not available and why != "CODEGEN2_INT8_KERNEL=torch" and not _state.get("noted"):
        _state["noted"] = True
        print(f"int8: using PyTorch's int8 kernels (1.3-2.4x slower here): the native kernel cannot run: {why}",
              file=sys.stderr)


def use_native(x: torch.Tensor) -> bool:
    """True when a matmul on `x` goes to the native kernel (CPU tensors where the kernel runs)."""
    return x.device.type == "cpu" and native_available()[0]


def row_sums(q: torch.Tensor) -> torch.Tensor:
    """int32 [N]: the sum of each int8 row of q, which the dynamic kernel needs (precomputed once per weight)."""
    q = q.contiguous()
    out = torch.empty(q.shape[0], dtype=torch.int32, device=q.device)
    if q.device.type == "cpu" and native_available()[0]:
        _state["lib"].int8_row_sums(q.data_ptr(), q.shape[0], q.shape[1], out.data_ptr())  # type: ignore[attr-defined]
        return out
    for start in range(0, q.shape[0], 4096):  # bounded int32 temporaries
        out[start:start + 4096] = q[start:start + 4096].to(torch.int32).sum(dim=1)
    return out


def _run(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dynamic: bool,
         sums: torch.Tensor | None = None) -> torch.Tensor:
    """The native kernel on CPU tensors (x fp32 [M, K], q int8 [N, K], scales/bias fp32 [N], sums int32 [N] or
    None); a few microseconds of Python around it."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    if not (q.is_contiguous() and scales.is_contiguous() and scales.dtype == torch.float32):
        q, scales = q.contiguous(), scales.to(torch.float32).contiguous()
    residual = None  # a bias that is not one value per output channel (a [M, N] residual): added after the kernel
    if bias is not None and bias.shape != (q.shape[0],):
        residual, bias = bias, None
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    m, k = x.shape
    n = q.shape[0]
    if q.shape[1] != k:
        raise ValueError(f"int8 matmul: x has {k} columns but the weight rows have {q.shape[1]}")
    out = torch.empty(m, n, dtype=torch.float32)
    if m == 0 or n == 0:
        return out
    lib = _library()
    bias_ptr = bias.data_ptr() if bias is not None else None
    sums_ptr = sums.data_ptr() if sums is not None else None
    if dynamic:
        if sums is not None and (sums.dtype != torch.int32 or sums.shape != (n,) or not sums.is_contiguous()):
            raise ValueError(f"int8 matmul: row sums must be contiguous int32 [{n}], got {sums.dtype} "
                             f"{tuple(sums.shape)}")
        status = lib.int8_matmul_dynamic(  # type: ignore[attr-defined]
            x.data_ptr(), m, k, q.data_ptr(), n, scales.data_ptr(), sums_ptr, bias_ptr, out.data_ptr(),
            torch.get_num_threads(), path_for(k), tile_rows())
    else:
        status = lib.int8_matmul_weight_only(  # type: ignore[attr-defined]
            x.data_ptr(), m, k, q.data_ptr(), n, scales.data_ptr(), bias_ptr, out.data_ptr(), torch.get_num_threads(),
            path_for(k), tile_rows())
    if status != 0:
        raise MemoryError(f"int8 matmul: out of memory for a [{m}, {k}] input")
    return out.add_(residual) if residual is not None else out


# The op for compiled graphs. Registered through torch.library.Library rather than the newer custom_op decorator:
# the same op, but the decorator's Python wrappers cost ~12 us per call against ~4 us here (measured), which is a
# few percent of a 125M-parameter decode step with 37 matmuls.
_ops = torch.library.Library("codegen2", "DEF")
_ops.define("int8_matmul(Tensor x, Tensor q, Tensor scales, Tensor? bias, bool dynamic, Tensor? sums) -> Tensor")
_ops.impl("int8_matmul", _run, "CPU")


def _fake(x, q, scales, bias, dynamic, sums):
    return x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)


torch.library.register_fake("codegen2::int8_matmul")(_fake)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                dynamic: bool = False, sums: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [M, N] = x [M, K] @ (q [N, K] int8 * scales [N]).T + bias, on the native kernel (see `use_native`).

    `bias` is one value per output channel [N] (added inside the kernel) or anything that broadcasts to [M, N],
    such as the residual stream a fused decode step adds (added afterwards).
    `sums` (dynamic only): `row_sums(q)`, if the caller keeps it; otherwise the kernel recomputes it every call.
    """
    if torch.compiler.is_compiling():
        if _state.get("op", ("python",))[0] == "native":  # `prepare_compiled_op` chose the C++ op
            return torch.ops.codegen2.int8_matmul_native(x, q, scales, bias, dynamic, sums)
        return torch.ops.codegen2.int8_matmul(x, q, scales, bias, dynamic, sums)
    if _state.get("op", ("python",))[0] == "native":  # loaded: 4 us a call against `_run`'s 11 (measured)
        return torch.ops.codegen2.int8_matmul_native.default(x, q, scales, bias, dynamic, sums)
    return _run(x, q, scales, bias, dynamic, sums)
