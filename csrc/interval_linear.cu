// The interval GEMM behind interval_linear (forward, input gradient and weight gradient): two
// products that share one operand, computed from one pass over shared-memory tiles.
//
//   forward:        acc1 = c · W^T          (all N rows of c)
//                   acc2 = r · |W|^T        (the last M rows, whose radii r holds)
//   input gradient: acc1 = g_c · W,  acc2 = g_r · |W|
//   weight grad:    acc1 = g_c^T · c,  acc2 = g_r^T · r,  out = acc1 + sign(W) ⊙ acc2
//
// The operands are the strided matrices of GemmParams (common.h); the main loops live in
// interval_gemm.cuh.
#include "interval_gemm.cuh"

namespace cure_fast {
namespace {

// The epilogue of GemmParams for output (m, n) of a row-major [M, N] result.
template <typename T> struct LinearEpilogue {
  GemmParams<T> p;
  template <typename A>
  CURE_HOST_DEVICE __forceinline__ void operator()(int64_t m, int64_t n, int, A acc1, A acc2) const {
    const int64_t idx = m * p.N + n;
    if (p.sign_of != nullptr) {  // weight-gradient mode
      store(p.out1 + idx, acc1 + sign(A(load(p.sign_of + idx))) * acc2);
      return;
    }
    const bool has_r = p.out2 != nullptr && m >= p.m2_lo;
    const int64_t idx2 = (m - p.m2_lo) * p.N + n;
    if (p.pre1 != nullptr) store(p.pre1 + idx, acc1);
    if (has_r && p.pre2 != nullptr) store(p.pre2 + idx2, acc2);
    A zc = acc1, zr = acc2;
    gemm::Affine<T>{p.bias, p.scale, p.shift, p.relu}(n, has_r, zc, zr);
    store(p.out1 + idx, zc);
    if (has_r) store(p.out2 + idx2, zr);
  }
};

template <typename T, gemm::SecondB B2>
using LinearProblem = gemm::Problem<T, B2, false, gemm::Strided<T>, gemm::Strided<T>, gemm::Strided<T>,
                                    gemm::Strided<T>, LinearEpilogue<T>>;

template <typename T, gemm::SecondB B2>
void run_linear(const GemmParams<T>& p, MathMode mode, cudaStream_t stream) {
  LinearProblem<T, B2> q;
  q.M = p.M, q.N = p.N, q.K = p.K;
  q.m2_lo = p.m2_lo, q.k2_lo = p.k2_lo;
  q.second = p.a2 != nullptr;
  q.a = {p.a, p.sa_m, p.sa_k, 0, 0};
  q.b = {p.b, p.sb_n, p.sb_k, 0, 0};
  q.a2 = {p.a2, p.sa2_m, p.sa2_k, p.m2_lo, p.k2_lo};
  q.b2 = {p.b2, p.sb2_n, p.sb2_k, 0, p.k2_lo};
  q.epi = {p};
  gemm::run(q, mode, stream);
}

}  // namespace

template <typename T>
void interval_gemm_cuda(const GemmParams<T>& p, MathMode mode, cudaStream_t stream) {
  if (p.b2 != nullptr) return run_linear<T, gemm::SecondB::kLoad>(p, mode, stream);
  run_linear<T, gemm::SecondB::kAbs>(p, mode, stream);
}

template void interval_gemm_cuda<float>(const GemmParams<float>&, MathMode, cudaStream_t);
template void interval_gemm_cuda<double>(const GemmParams<double>&, MathMode, cudaStream_t);
template void interval_gemm_cuda<__half>(const GemmParams<__half>&, MathMode, cudaStream_t);
template void interval_gemm_cuda<__nv_bfloat16>(const GemmParams<__nv_bfloat16>&, MathMode, cudaStream_t);

}  // namespace cure_fast
