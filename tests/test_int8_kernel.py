"""The native int8 matmul (kernels/int8_matmul.c) against naive references, its build cache and its fallbacks."""

from __future__ import annotations

import pytest
import torch

from codegen2.errors import UserError
from codegen2.int8 import int8_dynamic_linear, int8_linear, quantize_rows
from codegen2.kernels import build, int8

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (fixture in conftest.py)

# Shapes that reach every code path: 1-8 input rows per pass (and more than one pass), weight rows that fill
# blocks of 8, 6 and 3 rows or leave a remainder, K below, at and above one 64-byte column, with a partial column.
SHAPES = [(m, k, n) for m in (1, 2, 3, 4, 5, 8, 9, 19) for k, n in ((1, 1), (63, 7), (64, 8), (130, 25), (768, 13))]


def random_operands(seed: int, m: int, k: int, n: int, x_scale: float, scale_low: float, scale_span: float):
    """(x [m, k], q int8 [n, k], scales [n], bias [n]) drawn from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = torch.rand(n, generator=gen) * scale_span + scale_low
    bias = torch.randn(n, generator=gen)
    return torch.randn(m, k, generator=gen) * x_scale, q, scales, bias


def quantized_operands(seed: int, m: int, k: int, n: int):
    """(generator, x [m, k], int8 rows q [n, k], scales [n]): real quantized weights, then the input, from one seed."""
    gen = torch.Generator().manual_seed(seed)
    q, scales = quantize_rows(torch.randn(n, k, generator=gen))
    return gen, torch.randn(m, k, generator=gen), q, scales


def naive_dynamic(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """x rounded to int8 per row (max|row| / 127, half to even), exact integer products in int64, then scaled."""
    amax = x.abs().amax(dim=1, keepdim=True)
    row_scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    xq = torch.clamp(torch.round(x / row_scale), -127, 127).long()  # the kernel's float32 rule, bit for bit
    out = (xq @ q.long().T).double() * row_scale.double() * scales.double()
    return out + bias.double() if bias is not None else out


def assert_matches_dynamic_reference(out, x, q, scales, bias):
    """Exact int32 sums; the float rescale and bias add round once or twice (a few ulps of the magnitudes involved)."""
    reference = naive_dynamic(x, q, scales, bias)
    bound = (reference.abs() + bias.double().abs()) * 2**-21 + 1e-6
    assert ((out.double() - reference).abs() <= bound).all()


def assert_matches_weight_only_reference(out, x, q, scales, bias):
    """fp32 products of the widened weights, summed in fp32: within a few ulps of the absolute sum, against float64."""
    reference = x.double() @ (q.double() * scales.double()[:, None]).T + bias.double()
    bound = (x.double().abs() @ (q.double().abs() * scales.double()[:, None]).T) * 2**-20 + 1e-6
    assert ((out.double() - reference).abs() <= bound).all()


@pytest.fixture
def native(int8_kernel):
    int8_kernel("native")


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_native_dynamic_matmul_sums_exactly_like_integers(m, k, n):
    x, q, scales, bias = random_operands(m * 1000 + k + n, m, k, n, x_scale=4, scale_low=0.5, scale_span=1)
    out = int8.int8_matmul(x, q, scales, bias, dynamic=True)
    assert out.shape == (m, n) and out.dtype == torch.float32
    sums = int8.row_sums(q)
    assert torch.equal(sums, q.long().sum(dim=1).int())
    assert torch.equal(int8.int8_matmul(x, q, scales, bias, dynamic=True, sums=sums), out)  # precomputed sums
    assert_matches_dynamic_reference(out, x, q, scales, bias)


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("dynamic", [True, False])
def test_native_matmul_adds_a_per_row_bias_like_addmm(dynamic):
    """The fused decode steps pass the residual stream [M, N] as the bias (addmm's contract), not only [N]."""
    gen, x, q, scales = quantized_operands(4, 3, 32, 20)
    for bias in (torch.randn(3, 20, generator=gen), torch.randn(1, 20, generator=gen), torch.randn(20, generator=gen)):
        plain = int8.int8_matmul(x, q, scales, None, dynamic)
        assert torch.allclose(int8.int8_matmul(x, q, scales, bias, dynamic), plain + bias, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("native")
def test_native_dynamic_matmul_is_exact_at_full_scale():
    """Every product at +-127 x +-127: a kernel that saturates pairs into int16 lanes would fail here."""
    k = 768
    q = torch.full((9, k), 127, dtype=torch.int8)
    q[1] = -127
    q[2, ::2] = -127
    x = torch.full((3, k), 127.0)
    x[1] = -127.0
    x[2, 1::3] = -127.0
    out = int8.int8_matmul(x, q, torch.ones(9), None, dynamic=True)
    assert torch.equal(int8.int8_matmul(x, q, torch.ones(9), None, dynamic=True, sums=int8.row_sums(q)), out)
    exact = x.long() @ q.long().T  # scale 1 per row: 127 / 127; all values exact in fp32 (< 2**24)
    assert torch.equal(out, exact.float())


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("m,k,n", SHAPES[::3])
def test_native_weight_only_matmul_matches_float64(m, k, n):
    x, q, scales, bias = random_operands(k * 7 + m + n, m, k, n, x_scale=1, scale_low=0, scale_span=0.01)
    assert_matches_weight_only_reference(int8.int8_matmul(x, q, scales, bias, dynamic=False), x, q, scales, bias)


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("threads", [1, 2])
def test_native_decode_rows_read_as_streams_land_in_their_places(threads):
    """Decoding (at most 8 input rows) walks the weight rows as long streams, one row of each per block, and the
    leftover rows in consecutive blocks: every output must still land in its own column, for each thread's range."""
    torch.set_num_threads(threads)  # the fixture restores one thread
    for m in (1, 3, 8):
        x, q, scales, bias = random_operands(m, m, 200, 1003, x_scale=2, scale_low=0.01, scale_span=0.02)
        out = int8.int8_matmul(x, q, scales, bias, dynamic=True, sums=int8.row_sums(q))
        assert_matches_dynamic_reference(out, x, q, scales, bias)
        assert_matches_weight_only_reference(int8.int8_matmul(x, q, scales, bias, dynamic=False), x, q, scales, bias)


@pytest.mark.usefixtures("native")
@pytest.mark.parametrize("dynamic", [True, False])
def test_native_rows_do_not_depend_on_the_batch_or_the_thread_count(dynamic):
    gen, x, q, scales = quantized_operands(5, 11, 200, 50)
    x[3] = 0.0
    batch = int8.int8_matmul(x, q, scales, None, dynamic)
    alone = torch.cat([int8.int8_matmul(x[i:i + 1], q, scales, None, dynamic) for i in range(11)])
    assert torch.equal(batch, alone)
    assert torch.equal(batch[3], torch.zeros(50))
    torch.set_num_threads(2)  # the fixture restores one thread
    assert torch.equal(int8.int8_matmul(x, q, scales, None, dynamic), batch)


@pytest.mark.usefixtures("native")
def test_native_and_torch_dynamic_kernels_agree_bit_for_bit_on_the_sums(int8_kernel):
    gen, x, q, scales = quantized_operands(9, 6, 96, 40)
    native_out = int8_dynamic_linear(x, q, torch.ones(40))
    int8_kernel("torch")
    torch_out = int8_dynamic_linear(x, q, torch.ones(40))
    assert torch.allclose(native_out, torch_out, rtol=1e-6, atol=0)


def naive_dynamic_float32(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """The dynamic scheme's exact bits: int64 products, then float32 (sum x row scale) x channel scale + bias, each
    rounded once, in that order (what every kernel path computes)."""
    amax = x.abs().amax(dim=1, keepdim=True)
    row_scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    xq = torch.clamp(torch.round(x / row_scale), -127, 127).long()
    out = (xq @ q.long().T).float() * row_scale * scales
    return out + bias if bias is not None else out


def force_path(int8_kernel, path: str) -> None:
    """Run the next matmuls on `path` (every native path up to the CPU's level; skipped above it)."""
    int8_kernel("native")
    if int8.PATHS[path] > int8.PATHS[int8.cpu_level()]:
        pytest.skip(f"this CPU runs at most the {int8.cpu_level()} path")
    int8_kernel(path)


# Shapes for the AMX path too: K a multiple of 64 and at least 32 weight rows (plus a leftover N % 32), 1 to 33 rows.
PATH_SHAPES = SHAPES[::2] + [(m, k, n) for m in (1, 2, 8, 16, 17, 33) for k, n in ((64, 32), (256, 70), (768, 96))]


@pytest.mark.parametrize("path", list(int8.PATHS))
def test_every_path_gives_the_dynamic_schemes_exact_bits(int8_kernel, path):
    force_path(int8_kernel, path)
    for m, k, n in PATH_SHAPES:
        x, q, scales, bias = random_operands(m * 31 + k + n, m, k, n, x_scale=3, scale_low=0.5, scale_span=1)
        x[0, : k // 2] = 0.0  # rows with zeros and an all-zero row (scale 1)
        if m > 2:
            x[2] = 0.0
        expected = naive_dynamic_float32(x, q, scales, bias)
        assert torch.equal(int8.int8_matmul(x, q, scales, bias, dynamic=True), expected), (m, k, n)
        assert torch.equal(int8.int8_matmul(x, q, scales, None, dynamic=True, sums=int8.row_sums(q)),
                           naive_dynamic_float32(x, q, scales, None)), (m, k, n)


def test_the_torch_kernels_give_the_dynamic_schemes_exact_bits_too(int8_kernel):
    int8_kernel("torch")
    for m, k, n in PATH_SHAPES[::3]:
        x, q, scales, bias = random_operands(m + k + n, m, k, n, x_scale=3, scale_low=0.5, scale_span=1)
        assert torch.equal(int8_dynamic_linear(x, q, scales, bias), naive_dynamic_float32(x, q, scales, bias))


def test_the_avx2_path_sums_weight_only_in_the_avx512_order(int8_kernel):
    """Weight-only is not exact, but the AVX2 path adds in the AVX-512 path's order: the same bits on both."""
    force_path(int8_kernel, "vnni")
    cases = [random_operands(m + k, m, k, n, x_scale=1, scale_low=0, scale_span=0.01) for m, k, n in PATH_SHAPES]
    wide = [int8.int8_matmul(x, q, scales, bias, dynamic=False) for x, q, scales, bias in cases]
    int8_kernel("avx2")
    for (x, q, scales, bias), expected in zip(cases, wide):
        out = int8.int8_matmul(x, q, scales, bias, dynamic=False)
        assert torch.equal(out, expected)
        assert_matches_weight_only_reference(out, x, q, scales, bias)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_avx2_path_is_exact_at_full_scale_and_batch_independent(int8_kernel, threads):
    """AVX2 widens to int16 pairs (vpmaddwd): +-127 x +-127 everywhere must not saturate; forced, so it runs on
    any CPU with AVX2."""
    force_path(int8_kernel, "avx2")
    assert int8.path_for(768) == int8.PATHS["avx2"]
    torch.set_num_threads(threads)  # the fixture restores one thread
    q = torch.full((9, 770), 127, dtype=torch.int8)
    q[1] = -127
    x = torch.full((3, 770), 127.0)
    x[1] = -127.0
    assert torch.equal(int8.int8_matmul(x, q, torch.ones(9), None, dynamic=True), (x.long() @ q.long().T).float())
    gen, x, q, scales = quantized_operands(5, 11, 200, 50)
    batch = int8.int8_matmul(x, q, scales, None, dynamic=True)
    assert torch.equal(batch, torch.cat([int8.int8_matmul(x[i:i + 1], q, scales, None, True) for i in range(11)]))


def test_the_rule_picks_a_path_by_cpu_and_shape_and_never_by_timing(int8_kernel):
    int8_kernel("native")
    level = int8.cpu_level()
    int8_kernel("auto")
    choices = {k: int8.path_for(k) for k in (256, 200)}
    if level == "amx":
        assert choices == {256: int8.PATHS["amx"], 200: int8.PATHS["vnni"]}  # tiles need K a multiple of 64
        assert int8.tile_rows() == int8.AMX_MIN_ROWS
    else:
        assert set(choices.values()) == {int8.PATHS[level]}
    assert {k: int8.path_for(k) for k in choices} == choices  # the same answer every time


def assert_within_the_pieces_bound(out, x, q, scales, bias):
    """Weight-only from three int8 pieces per row: x is held to about 2^-24 of its row's largest value, so the error
    is at most that times the absolute weights' row sum, plus fp32's rounding of the result (bound with a margin)."""
    w = q.double() * scales.double()[:, None]
    reference = x.double() @ w.T + bias.double()
    amax = x.double().abs().amax(dim=1, keepdim=True)
    bound = amax * w.abs().sum(dim=1) * 2**-21 + reference.abs() * 2**-21 + 1e-6
    assert ((out.double() - reference).abs() <= bound).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_amx_weight_only_pieces_are_bounded_and_the_same_on_tiles_and_vnni(int8_kernel, threads):
    force_path(int8_kernel, "amx")
    torch.set_num_threads(threads)  # the fixture restores one thread
    # PATH_SHAPES, and weights of more rows than one block of the tiles' loop (kernel's piece_block), with a tail
    shapes = [(m, k, n) for m, k, n in PATH_SHAPES if k % 64 == 0] + [(40, 128, 300), (3, 4096, 600)]
    cases = [random_operands(m * 5 + k + n, m, k, n, x_scale=2, scale_low=0.001, scale_span=0.01)
             for m, k, n in shapes]
    tiles = [int8.int8_matmul(x, q, scales, bias, dynamic=False) for x, q, scales, bias in cases]
    int8_kernel("auto")  # fewer than AMX_MIN_ROWS rows on VNNI instructions
    for (x, q, scales, bias), expected in zip(cases, tiles):
        out = int8.int8_matmul(x, q, scales, bias, dynamic=False)
        assert torch.equal(out, expected)
        assert_within_the_pieces_bound(out, x, q, scales, bias)
        alone = torch.cat([int8.int8_matmul(x[i:i + 1], q, scales, bias, dynamic=False) for i in range(len(x))])
        assert torch.equal(alone, out)


@pytest.mark.usefixtures("native")
def test_rows_do_not_depend_on_the_batch_when_the_rule_changes_path():
    """One row alone may go to VNNI and the same row in a batch of 11 to AMX: identical bits either way."""
    gen, x, q, scales = quantized_operands(6, 11, 256, 70)
    for dynamic in (True, False):
        batch = int8.int8_matmul(x, q, scales, None, dynamic)
        alone = torch.cat([int8.int8_matmul(x[i:i + 1], q, scales, None, dynamic) for i in range(11)])
        assert torch.equal(batch, alone)


@pytest.mark.usefixtures("native")
def test_native_kernel_inside_a_compiled_graph():
    """torch.compile keeps the kernel as one custom-op call (no graph break) with the eager results."""
    gen = torch.Generator().manual_seed(2)
    q, scales = quantize_rows(torch.randn(24, 40, generator=gen))
    bias = torch.randn(24, generator=gen)
    ones = torch.ones(24, dtype=torch.bfloat16)

    def both(x):
        return torch.relu(int8_dynamic_linear(x, q, scales, bias)) + int8_linear(x, q, scales, ones, bias)

    x = torch.randn(3, 40, generator=gen)
    compiled = torch.compile(both, fullgraph=True)
    assert torch.allclose(compiled(x), both(x), rtol=1e-6, atol=1e-6)
    graph = torch._dynamo.explain(both)(x)
    assert graph.graph_break_count == 0
    assert "codegen2.int8_matmul" in str(graph.graphs[0].code)


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEGEN2_KERNEL_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "answer.c"
    source.write_text("int answer(void) { return 42; }\n")
    try:
        lib = build.load(source)
    except build.BuildError as exc:
        pytest.skip(f"cannot build C here: {exc}")
    assert lib.answer() == 42
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].name.startswith("answer-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    build.load(source)
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    source.write_text("int answer(void) { return 43; }\n")  # a changed source builds a new file beside the old
    assert build.load(source).answer() == 43
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_source_that_does_not_compile_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEGEN2_KERNEL_CACHE", str(tmp_path))
    source = tmp_path / "broken.c"
    source.write_text("int broken(void) { return }\n")
    try:
        build.compiler()
    except build.BuildError:
        pytest.skip("no C compiler")
    with pytest.raises(build.BuildError, match="compiling broken.c failed") as info:
        build.load(source)
    assert "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["broken.c"]  # no temporary file left behind


def test_without_a_compiler_auto_falls_back_and_native_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("CODEGEN2_KERNEL_CACHE", str(tmp_path / "empty-cache"))
    saved = dict(int8._state)
    int8._state.clear()
    try:
        monkeypatch.setenv("CODEGEN2_INT8_KERNEL", "auto")
        available, why = int8.native_available()
        assert not available and "no-such-cc" in why
        gen = torch.Generator().manual_seed(1)
        q, scales = quantize_rows(torch.randn(8, 16, generator=gen))
        x = torch.randn(2, 16, generator=gen)
        assert int8_dynamic_linear(x, q, scales).shape == (2, 8)  # PyTorch's kernel instead
        int8.reset()
        monkeypatch.setenv("CODEGEN2_INT8_KERNEL", "native")
        with pytest.raises(UserError, match="CODEGEN2_INT8_KERNEL=native: the native int8 kernel cannot run here"):
            int8.native_available()
        int8.reset()
        monkeypatch.setenv("CODEGEN2_INT8_KERNEL", "fastest")
        expected = "CODEGEN2_INT8_KERNEL='fastest': choose one of auto, native, avx2, vnni, amx, torch"
        with pytest.raises(UserError, match=expected):
            int8.native_available()
    finally:
        int8._state.clear()
        int8._state.update(saved)


def cpp_op_or_skip() -> None:
    """Load the C++ op (`int8_op.cpp`) for the next calls, or skip where it cannot be built here (with the reason)."""
    int8.reset()
    kind, why = int8.prepare_compiled_op()
    if kind != "native":
        pytest.skip(f"the C++ int8 op cannot be built here: {why}")


@pytest.mark.parametrize("path", list(int8.PATHS))
def test_the_cpp_op_gives_the_python_ops_bits_on_every_path(int8_kernel, path):
    """The C++ op runs the same kernels under the same rule: identical bits for both schemes, with a per-channel
    bias, a residual [M, N] bias (added after the kernel) or none, and with or without the row sums."""
    force_path(int8_kernel, path)
    cpp_op_or_skip()
    op = torch.ops.codegen2.int8_matmul_native
    for m, k, n in PATH_SHAPES[::2]:
        x, q, scales, bias = random_operands(m * 7 + k + n, m, k, n, x_scale=2, scale_low=0.01, scale_span=0.1)
        residual = torch.randn(m, n)
        for dynamic in (True, False):
            sums = int8.row_sums(q) if dynamic else None
            for extra in (bias, residual, None):
                expected = int8._run(x, q, scales, extra, dynamic, sums)
                assert torch.equal(op(x, q, scales, extra, dynamic, sums), expected), (path, m, k, n, dynamic)
    assert torch.equal(op(x.t().contiguous().t(), q, scales, None, True, None), int8._run(x, q, scales, None, True))
    with pytest.raises(RuntimeError, match=f"x has {x.shape[1]} columns but the weight rows have 7"):
        op(x, q[:, :7], scales, None, True, None)


@pytest.mark.usefixtures("native")
def test_a_compiled_graph_calls_the_cpp_op_and_the_python_op_when_forced(monkeypatch):
    """With the C++ op loaded a compiled graph calls it (no Python on the way); CODEGEN2_INT8_OP=python keeps the
    Python op. Both give the eager results bit for bit (the dynamic scheme's sums are exact)."""
    gen, x, q, scales = quantized_operands(8, 3, 64, 40)
    sums = int8.row_sums(q)
    graphs = {}
    for choice in ("auto", "python"):
        monkeypatch.setenv("CODEGEN2_INT8_OP", choice)
        if choice == "auto":
            cpp_op_or_skip()
        else:
            int8.reset()
            assert int8.prepare_compiled_op() == ("python", "CODEGEN2_INT8_OP=python")
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: int8_dynamic_linear(t, q, scales, None, sums) * 2, fullgraph=True)
        assert torch.equal(compiled(x), int8_dynamic_linear(x, q, scales, None, sums) * 2)
        graphs[choice] = str(torch._dynamo.explain(lambda t: int8_dynamic_linear(t, q, scales, None, sums))(x)
                             .graphs[0].code)
    assert "int8_matmul_native" in graphs["auto"]
    assert "int8_matmul_native" not in graphs["python"] and "codegen2.int8_matmul" in graphs["python"]
    int8.reset()


def test_without_a_cxx_compiler_compiled_graphs_keep_the_python_op(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-cxx"))
    monkeypatch.setenv("CODEGEN2_KERNEL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CODEGEN2_INT8_OP", "auto")
    saved = dict(int8._state)
    for key in ("op", "op_lib", "op_why"):
        int8._state.pop(key, None)
    try:
        if not int8.native_available()[0]:
            pytest.skip(f"the native int8 kernel cannot run here: {int8.native_available()[1]}")
        kind, why = int8.prepare_compiled_op()
        assert kind == "python" and "no-such-cxx" in why and "\n" not in why
        gen, x, q, scales = quantized_operands(3, 2, 64, 16)
        assert torch.equal(int8.int8_matmul(x, q, scales, None, True), int8._run(x, q, scales, None, True))
        monkeypatch.setenv("CODEGEN2_INT8_OP", "fastest")
        int8.reset()
        with pytest.raises(UserError, match="CODEGEN2_INT8_OP='fastest': choose one of auto, python"):
            int8.prepare_compiled_op()
    finally:
        int8._state.clear()
        int8._state.update(saved)
