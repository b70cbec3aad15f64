/* The op codegen2::int8_matmul_native: int8_matmul.c's kernels behind PyTorch's dispatcher, in C++.
 *
 * Why: the op codegen2::int8_matmul has a Python implementation (kernels/int8.py), so every call from a compiled
 * decode step goes dispatcher -> Python -> ctypes -> C, about 20 us against 3 us for the C call alone (measured);
 * a small model's step makes 31-37 of them. This op takes the same arguments and gives the same bits with no
 * Python on the way, and a compiled graph in C++ (inductor's cpp_wrapper) reaches it without the interpreter.
 *
 * It calls the kernel library that kernels/int8.py loaded with ctypes, through the function pointers and the path
 * rule (the CPU's ceiling path, the AMX tile threshold) handed over by codegen2_int8_op_configure, so both ops run
 * one copy of the kernels under one rule. Built by kernels/build.py against torch's headers; where that cannot
 * build, the Python op stays in use.
 */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace {

using DynamicFn = int (*)(const float *, int64_t, int64_t, const int8_t *, int64_t, const float *, const int32_t *,
                          const float *, float *, int, int, int);
using WeightOnlyFn = int (*)(const float *, int64_t, int64_t, const int8_t *, int64_t, const float *, const float *,
                             float *, int, int, int);

DynamicFn dynamic_fn = nullptr;
WeightOnlyFn weight_only_fn = nullptr;
int ceiling = 0, tile_rows = 8;

constexpr int PATH_VNNI = 2, PATH_AMX = 3; /* int8_matmul.c's PATH_* */

/* kernels/int8.py's path_for: the ceiling, except that AMX takes only rows of a multiple of 64 values. */
int path_for(int64_t k) { return ceiling == PATH_AMX && k % 64 ? PATH_VNNI : ceiling; }

at::Tensor as_f32(const at::Tensor &t) {
    return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

/* kernels/int8.py's _run, argument for argument: the same conversions, checks and residual rule. */
at::Tensor int8_matmul_native(const at::Tensor &x_in, const at::Tensor &q_in, const at::Tensor &scales_in,
                              const std::optional<at::Tensor> &bias_in, bool dynamic,
                              const std::optional<at::Tensor> &sums) {
    TORCH_CHECK(dynamic_fn && weight_only_fn, "codegen2::int8_matmul_native: the kernel library is not configured");
    TORCH_CHECK(x_in.dim() == 2 && q_in.dim() == 2, "int8 matmul: x and q must be 2-D");
    const at::Tensor x = as_f32(x_in), q = q_in.is_contiguous() ? q_in : q_in.contiguous(), scales = as_f32(scales_in);
    const int64_t m = x.size(0), k = x.size(1), n = q.size(0);
    TORCH_CHECK(q.size(1) == k, "int8 matmul: x has ", k, " columns but the weight rows have ", q.size(1));
    std::optional<at::Tensor> bias, residual; /* a bias that is not one value per channel is added afterwards */
    if (bias_in.has_value() && bias_in->dim() == 1 && bias_in->size(0) == n) bias = as_f32(*bias_in);
    else if (bias_in.has_value()) residual = *bias_in;
    at::Tensor out = at::empty({m, n}, x.options().dtype(at::kFloat));
    if (m == 0 || n == 0) return out;
    const float *bias_ptr = bias ? bias->data_ptr<float>() : nullptr;
    const int threads = at::get_num_threads();
    int status;
    if (dynamic) {
        const int32_t *sums_ptr = nullptr;
        if (sums.has_value()) {
            TORCH_CHECK(sums->scalar_type() == at::kInt && sums->dim() == 1 && sums->size(0) == n &&
                            sums->is_contiguous(),
                        "int8 matmul: row sums must be contiguous int32 [", n, "]");
            sums_ptr = sums->data_ptr<int32_t>();
        }
        status = dynamic_fn(x.data_ptr<float>(), m, k, q.data_ptr<int8_t>(), n, scales.data_ptr<float>(), sums_ptr,
                            bias_ptr, out.data_ptr<float>(), threads, path_for(k), tile_rows);
    } else {
        status = weight_only_fn(x.data_ptr<float>(), m, k, q.data_ptr<int8_t>(), n, scales.data_ptr<float>(),
                                bias_ptr, out.data_ptr<float>(), threads, path_for(k), tile_rows);
    }
    TORCH_CHECK(status == 0, "int8 matmul: out of memory for a [", m, ", ", k, "] input");
    return residual ? out.add_(*residual) : out;
}

} // namespace

/* The kernel library's two entry points and the rule's state (kernels/int8.py calls this whenever it decides). */
extern "C" void codegen2_int8_op_configure(void *dynamic, void *weight_only, int path_ceiling, int tiles_from) {
    dynamic_fn = reinterpret_cast<DynamicFn>(dynamic);
    weight_only_fn = reinterpret_cast<WeightOnlyFn>(weight_only);
    ceiling = path_ceiling;
    tile_rows = tiles_from;
}

TORCH_LIBRARY_FRAGMENT(codegen2, m) {
    m.def("int8_matmul_native(Tensor x, Tensor q, Tensor scales, Tensor? bias, bool dynamic, Tensor? sums) -> Tensor");
}

TORCH_LIBRARY_IMPL(codegen2, CPU, m) { m.impl("int8_matmul_native", &int8_matmul_native); }
