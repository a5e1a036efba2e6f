// The interval GEMM (csrc/interval_linear.cu) as CUDA kernels of the cure_fast_C operators:
// interval linear forward, input gradient, weight gradient.
#include "glue.h"

namespace {

using namespace cure_fast::glue;

// The interval GEMM p on the current stream, with the workspace of its split-K pieces (if it splits).
template <typename T>
void run_interval_gemm(const char* op, const at::Tensor& like, std::string_view precision,
                       const cure_fast::GemmParams<T>& p) {
  using A = typename cure_fast::Acc<T>::type;
  const int sms = sm_count();
  const int64_t splits = cure_fast::interval_gemm_splits(p.M, p.N, p.K, sms);
  const auto acc = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  auto workspace = at::empty({splits > 1 ? 2 * splits * p.M * p.N : 0}, like.options().dtype(acc));
  run_gemm(op, like.scalar_type(), precision, [&](cure_fast::MathMode mode, cudaStream_t s) {
    cure_fast::interval_gemm_cuda<T>(p, static_cast<A*>(workspace.mutable_data_ptr()), sms, mode, s);
  });
}

void check_linear(const char* op, const at::Tensor& c, const at::Tensor& r, const at::Tensor& weight) {
  check_interval(op, c, r);
  TORCH_CHECK(c.dim() == 2, op, ": c must be 2-d (rows, in_features), got ", c.sizes());
  check_like(op, "weight", weight, c);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == c.size(1), op, ": weight must have shape (out, ", c.size(1),
              "), got ", weight.sizes());
}

// (c W^T + bias) * scale + shift and r |W|^T * |scale|, then the interval ReLU when relu. With
// save_pre, also the accumulators c W^T and r |W|^T (for the backward of the epilogue); else
// empty tensors in their place. c (N, K), r (M, K), weight (O, K) -> (N, O), (M, O), pre...
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> interval_linear_forward(
    const at::Tensor& c, const at::Tensor& r, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool relu,
    std::string_view precision, bool save_pre) {
  const char* op = "interval_linear_forward";
  check_linear(op, c, r, weight);
  const int64_t n = c.size(0), m = r.size(0), k = c.size(1), o = weight.size(0);
  check_vector(op, "bias", bias, c, o);
  check_vector(op, "scale", scale, c, o);
  check_vector(op, "shift", shift, c, o);
  const c10::cuda::CUDAGuard guard(c.device());
  auto c_out = new_output({n, o}, c.options());
  auto r_out = new_output({m, o}, c.options());
  auto pre_c = save_pre ? new_output({n, o}, c.options()) : at::empty({0}, c.options());
  auto pre_r = save_pre ? new_output({m, o}, c.options()) : at::empty({0}, c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "interval_linear_forward", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::GemmParams<T> p;
    p.M = n, p.N = o, p.K = k;
    p.a = in<T>(c), p.sa_m = k, p.sa_k = 1;
    p.b = in<T>(weight), p.sb_k = 1, p.sb_n = k;  // B[k][n] = W[n][k]
    if (m > 0) p.a2 = in<T>(r), p.sa2_m = k, p.sa2_k = 1, p.out2 = out<T>(r_out);
    p.m2_lo = n - m;
    p.bias = in_opt<T>(bias), p.scale = in_opt<T>(scale), p.shift = in_opt<T>(shift), p.relu = relu;
    p.out1 = out<T>(c_out);
    if (save_pre) {
      p.pre1 = out<T>(pre_c);
      if (m > 0) p.pre2 = out<T>(pre_r);
    }
    run_interval_gemm<T>(op, c, precision, p);
  });
  return {c_out, r_out, pre_c, pre_r};
}

// Gradients of the inputs of the GEMM: (grad_c W, grad_r |W|). grad_c (N, O), grad_r (M, O),
// weight (O, K) -> (N, K), (M, K).
std::tuple<at::Tensor, at::Tensor> interval_linear_grad_input(const at::Tensor& grad_c, const at::Tensor& grad_r,
                                                              const at::Tensor& weight, std::string_view precision) {
  const char* op = "interval_linear_grad_input";
  check_interval(op, grad_c, grad_r);
  TORCH_CHECK(grad_c.dim() == 2, op, ": grad_c must be 2-d (rows, out_features), got ", grad_c.sizes());
  check_like(op, "weight", weight, grad_c);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == grad_c.size(1), op, ": weight must have shape (",
              grad_c.size(1), ", in), got ", weight.sizes());
  const int64_t n = grad_c.size(0), m = grad_r.size(0), o = weight.size(0), k = weight.size(1);
  const c10::cuda::CUDAGuard guard(grad_c.device());
  auto dc = new_output({n, k}, grad_c.options());
  auto dr = new_output({m, k}, grad_c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_c.scalar_type(), "interval_linear_grad_input", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::GemmParams<T> p;
    p.M = n, p.N = k, p.K = o;
    p.a = in<T>(grad_c), p.sa_m = o, p.sa_k = 1;
    p.b = in<T>(weight), p.sb_k = k, p.sb_n = 1;  // B[o][k] = W[o][k]
    if (m > 0) p.a2 = in<T>(grad_r), p.sa2_m = o, p.sa2_k = 1, p.out2 = out<T>(dr);
    p.m2_lo = n - m;
    p.out1 = out<T>(dc);
    run_interval_gemm<T>(op, grad_c, precision, p);
  });
  return {dc, dr};
}

// The weight gradient grad_c^T c + sign(W) ⊙ (grad_r^T r) in one kernel. grad_c (N, O),
// grad_r (M, O), c (N, K), r (M, K), weight (O, K) -> (O, K).
at::Tensor interval_linear_grad_weight(const at::Tensor& grad_c, const at::Tensor& grad_r, const at::Tensor& c,
                                       const at::Tensor& r, const at::Tensor& weight, std::string_view precision) {
  const char* op = "interval_linear_grad_weight";
  check_linear(op, c, r, weight);
  check_like(op, "grad_c", grad_c, c);
  check_like(op, "grad_r", grad_r, c);
  const int64_t n = c.size(0), m = r.size(0), k = c.size(1), o = weight.size(0);
  check_shape(op, "grad_c", grad_c, {n, o});
  check_shape(op, "grad_r", grad_r, {m, o});
  const c10::cuda::CUDAGuard guard(c.device());
  auto dw = new_output({o, k}, c.options());
  if (n == 0) return dw.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "interval_linear_grad_weight", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::GemmParams<T> p;
    p.M = o, p.N = k, p.K = n;                         // reduction over the rows
    p.a = in<T>(grad_c), p.sa_m = 1, p.sa_k = o;       // A[o][i] = grad_c[i][o]
    p.b = in<T>(c), p.sb_k = k, p.sb_n = 1;            // B[i][k] = c[i][k]
    if (m > 0) {
      p.a2 = in<T>(grad_r), p.sa2_m = 1, p.sa2_k = o;  // A2[o][i] = grad_r[i - (n - m)][o]
      p.b2 = in<T>(r), p.sb2_k = k, p.sb2_n = 1;       // B2[i][k] = r[i - (n - m)][k]
    }
    p.k2_lo = n - m;
    p.sign_of = in<T>(weight);
    p.out1 = out<T>(dw);
    run_interval_gemm<T>(op, c, precision, p);
  });
  return dw;
}

}  // namespace

TORCH_LIBRARY_IMPL(cure_fast_C, CUDA, m) {
  m.impl("interval_linear_forward", &interval_linear_forward);
  m.impl("interval_linear_grad_input", &interval_linear_grad_input);
  m.impl("interval_linear_grad_weight", &interval_linear_grad_weight);
}
