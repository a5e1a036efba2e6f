// The interval GEMM behind interval_linear (forward, input gradient and weight gradient): two
// products that share one operand, computed from one pass over shared-memory tiles.
//
//   forward:        acc1 = c · W^T          (all N rows of c)
//                   acc2 = r · |W|^T        (the last M rows, whose radii r holds)
//   input gradient: acc1 = g_c · W,  acc2 = g_r · |W|
//   weight grad:    acc1 = g_c^T · c,  acc2 = g_r^T · r,  out = acc1 + sign(W) ⊙ acc2
//
// A long reduction over few output tiles (a Linear layer on flattened features: a few hundred
// rows, 512 outputs, 32768 inputs; or a weight gradient over many rows) is split over the grid
// (split-K, gemm::split_k): the pieces go to a workspace and a second kernel sums them and runs
// the epilogue.
//
// The operands are the strided matrices of GemmParams (common.h); the main loops live in
// interval_gemm.cuh.
#include "interval_gemm.cuh"

namespace cure_fast {
namespace {

// The epilogue of GemmParams for output (m, n) of a row-major [M, N] result. Split-K: block z
// stores its pieces of both accumulators into the workspace instead ([2z][M*N] and [2z + 1][M*N]),
// and finish_splits_kernel runs the epilogue on their sums.
template <typename T> struct LinearEpilogue {
  using A = typename Acc<T>::type;
  GemmParams<T> p;
  A* workspace = nullptr;

  CURE_HOST_DEVICE __forceinline__ void operator()(int64_t m, int64_t n, int z, A acc1, A acc2) const {
    if (workspace != nullptr) {
      const int64_t size = p.M * p.N, idx = m * p.N + n;
      store(workspace + 2 * z * size + idx, acc1);
      store(workspace + (2 * z + 1) * size + idx, acc2);
      return;
    }
    finish(m, n, acc1, acc2);
  }

  CURE_HOST_DEVICE __forceinline__ void finish(int64_t m, int64_t n, A acc1, A acc2) const {
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

  // Output i of the [M, N] result: the workspace pieces summed, then the epilogue.
  CURE_HOST_DEVICE __forceinline__ void finish_split(int64_t i, int64_t splits) const {
    const int64_t size = p.M * p.N;
    A acc1 = 0, acc2 = 0;
    for (int64_t z = 0; z < splits; ++z) {
      acc1 += load(workspace + 2 * z * size + i);
      acc2 += load(workspace + (2 * z + 1) * size + i);
    }
    finish(i / p.N, i % p.N, acc1, acc2);
  }
};

template <typename T>
__global__ void finish_splits_kernel(const LinearEpilogue<T> epi, int64_t splits) {
  const int64_t size = epi.p.M * epi.p.N, stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size; i += stride)
    epi.finish_split(i, splits);
}

template <typename T, gemm::SecondB B2>
using LinearProblem = gemm::Problem<T, B2, false, gemm::Strided<T>, gemm::Strided<T>, gemm::Strided<T>,
                                    gemm::Strided<T>, LinearEpilogue<T>>;

template <typename T, gemm::SecondB B2>
void run_linear(const GemmParams<T>& p, typename Acc<T>::type* workspace, int sm_count, MathMode mode,
                cudaStream_t stream) {
  const gemm::SplitK split = gemm::split_k(p.M, p.N, p.K, sm_count);
  LinearProblem<T, B2> q;
  q.M = p.M, q.N = p.N, q.K = p.K;
  q.m2_lo = p.m2_lo, q.k2_lo = p.k2_lo;
  q.second = p.a2 != nullptr;
  q.k_chunk = split.chunk;
  q.a = {p.a, p.sa_m, p.sa_k, 0, 0};
  q.b = {p.b, p.sb_n, p.sb_k, 0, 0};
  q.a2 = {p.a2, p.sa2_m, p.sa2_k, p.m2_lo, p.k2_lo};
  q.b2 = {p.b2, p.sb2_n, p.sb2_k, 0, p.k2_lo};
  q.epi = {p, split.splits > 1 ? workspace : nullptr};
  gemm::run(q, mode, stream);
  if (split.splits == 1 || p.M * p.N == 0) return;
  LinearEpilogue<T> finish{p, workspace};
#ifdef CURE_FAST_HOST_EMULATION
  for (int64_t i = 0; i < p.M * p.N; ++i) finish.finish_split(i, split.splits);
#else
  finish_splits_kernel<T><<<grid_size(p.M * p.N), kThreads, 0, stream>>>(finish, split.splits);
  CURE_CUDA_CHECK(cudaGetLastError());
#endif
}

}  // namespace

int64_t interval_gemm_splits(int64_t M, int64_t N, int64_t K, int sm_count) {
  return gemm::split_k(M, N, K, sm_count).splits;
}

template <typename T>
void interval_gemm_cuda(const GemmParams<T>& p, typename Acc<T>::type* workspace, int sm_count, MathMode mode,
                        cudaStream_t stream) {
  if (p.b2 != nullptr) return run_linear<T, gemm::SecondB::kLoad>(p, workspace, sm_count, mode, stream);
  run_linear<T, gemm::SecondB::kAbs>(p, workspace, sm_count, mode, stream);
}

#define CURE_INSTANTIATE(T)                                                                                   \
  template void interval_gemm_cuda<T>(const GemmParams<T>&, typename Acc<T>::type*, int, MathMode, cudaStream_t);
CURE_INSTANTIATE(float)
CURE_INSTANTIATE(double)
CURE_INSTANTIATE(__half)
CURE_INSTANTIATE(__nv_bfloat16)
#undef CURE_INSTANTIATE

}  // namespace cure_fast
