// The interval GEMM behind interval_linear (forward, input gradient and weight gradient): two
// products that share one operand, computed from one pass over shared-memory tiles.
//
//   forward:        acc1 = c · W^T          (all N rows of c)
//                   acc2 = r · |W|^T        (the last M rows, whose radii r holds)
//   input gradient: acc1 = g_c · W,  acc2 = g_r · |W|
//   weight grad:    acc1 = g_c^T · c,  acc2 = g_r^T · r,  out = acc1 + sign(W) ⊙ acc2
//
// Two kernels: a CUDA-core FMA kernel (IEEE fp32, or fp64) and a tensor-core WMMA kernel (TF32,
// bfloat16 or fp16 inputs, fp32 accumulation; sm_80+). Both stage a tile of every operand in
// shared memory once per k-step; the |W| operand is derived from the W tile (never loaded twice).
#include <mma.h>

#include <type_traits>

#include "common.h"

namespace cure_fast {
namespace {

// ---------------------------------------------------------------------------------------------
// Shared-memory value conversion: the compute type for the FMA kernel, the MMA input type for
// the WMMA kernel (TF32 values are kept in float storage, rounded).
template <typename S, MathMode MODE> struct ToSmem;
template <> struct ToSmem<float, MathMode::kFma> {
  __device__ static float cvt(float v) { return v; }
};
template <> struct ToSmem<double, MathMode::kFma> {
  __device__ static double cvt(double v) { return v; }
};
template <> struct ToSmem<float, MathMode::kTf32> {
  __device__ static float cvt(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return nvcuda::wmma::__float_to_tf32(v);
#else
    return v;
#endif
  }
};
template <> struct ToSmem<__nv_bfloat16, MathMode::kBf16> {
  __device__ static __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};
template <> struct ToSmem<__half, MathMode::kHalf> {
  __device__ static __half cvt(float v) { return __float2half_rn(v); }
};

// Loads one tile of a strided operand into shared memory. The tile spans TX positions along its
// "x" dimension (the M or N dimension of the GEMM) and TK along the reduction dimension. Global
// element (x, k) lives at src[(x - x_lo) * sx + (k - k_lo) * sk] and exists for x in [x_lo, x_hi)
// and k in [k_lo, k_hi); missing elements are stored as 0. Shared element (x, k) goes to
// dst[x * dx + k * dk]. Consecutive threads walk the operand's contiguous dimension (coalesced).
template <int TX, int TK, int NT, MathMode MODE, typename T, typename S>
__device__ __forceinline__ void load_tile(S* dst, int dx, int dk, const T* __restrict__ src, int64_t sx,
                                          int64_t sk, int64_t x0, int64_t k0, int64_t x_lo, int64_t x_hi,
                                          int64_t k_lo, int64_t k_hi) {
  const bool k_fast = sk == 1;
#pragma unroll 4
  for (int e = threadIdx.x; e < TX * TK; e += NT) {
    const int x = k_fast ? e / TK : e % TX;
    const int k = k_fast ? e % TK : e / TX;
    const int64_t gx = x0 + x, gk = k0 + k;
    typename Acc<T>::type v = 0;
    if (gx >= x_lo && gx < x_hi && gk >= k_lo && gk < k_hi) v = load(src + (gx - x_lo) * sx + (gk - k_lo) * sk);
    dst[x * dx + k * dk] = ToSmem<S, MODE>::cvt(v);
  }
}

// The shared epilogue of both kernels for output element (m, n); see GemmParams in common.h.
template <typename T, typename A>
__device__ __forceinline__ void epilogue(const GemmParams<T>& p, int64_t m, int64_t n, A acc1, A acc2) {
  if (m >= p.M || n >= p.N) return;
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
  if (p.bias != nullptr) zc += A(load(p.bias + n));
  if (p.scale != nullptr) {
    const A s = load(p.scale + n);
    zc *= s;
    zr *= absval(s);
  }
  if (p.shift != nullptr) zc += A(load(p.shift + n));
  if (p.relu) {
    if (has_r) {
      const A l = relu(zc - zr), u = relu(zc + zr);
      zc = (u + l) / A(2);
      zr = (u - l) / A(2);
    } else {
      zc = relu(zc);
    }
  }
  store(p.out1 + idx, zc);
  if (has_r) store(p.out2 + idx2, zr);
}

// ---------------------------------------------------------------------------------------------
// FMA kernel. Block tile [FBM, FBN] of the output, k-step FBK, 256 threads as a 16 x 16 grid;
// thread (tx, ty) owns the 4 x 4 outputs (ty + 16 i, tx + 16 j) of both accumulators.
// Shared memory holds the tiles k-major: As[k][m] [FBK, FBM], Bs[k][n] [FBK, FBN], and the same
// for A2 / B2 (B2 only when it is not |B|).
constexpr int FBM = 64, FBN = 64, FBK = 16, FNT = 256;

template <typename T>
__global__ void __launch_bounds__(FNT) gemm_fma_kernel(const GemmParams<T> p) {
  using A = typename Acc<T>::type;
  constexpr int LDM = FBM + 4, LDN = FBN + 4;  // padded rows against bank conflicts
  __shared__ A As[FBK * LDM], Bs[FBK * LDN], As2[FBK * LDM], Bs2[FBK * LDN];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * FBM, n0 = static_cast<int64_t>(blockIdx.y) * FBN;
  // Whether any row of this tile carries a radius (uniform over the block).
  const bool rows2 = p.a2 != nullptr && m0 + FBM > p.m2_lo;
  const bool has_b2 = p.b2 != nullptr;

  A acc1[4][4], acc2[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc1[i][j] = acc2[i][j] = A(0);

  for (int64_t k0 = 0; k0 < p.K; k0 += FBK) {
    const bool tile2 = rows2 && k0 + FBK > p.k2_lo;  // the second product has terms in this k-step
    load_tile<FBM, FBK, FNT, MathMode::kFma>(As, 1, LDM, p.a, p.sa_m, p.sa_k, m0, k0, 0, p.M, 0, p.K);
    load_tile<FBN, FBK, FNT, MathMode::kFma>(Bs, 1, LDN, p.b, p.sb_n, p.sb_k, n0, k0, 0, p.N, 0, p.K);
    if (tile2) {
      load_tile<FBM, FBK, FNT, MathMode::kFma>(As2, 1, LDM, p.a2, p.sa2_m, p.sa2_k, m0, k0, p.m2_lo, p.M,
                                                p.k2_lo, p.K);
      if (has_b2)
        load_tile<FBN, FBK, FNT, MathMode::kFma>(Bs2, 1, LDN, p.b2, p.sb2_n, p.sb2_k, n0, k0, 0, p.N, p.k2_lo,
                                                  p.K);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < FBK; ++kk) {
      A a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk * LDM + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk * LDN + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc1[i][j] = fma(a[i], b[j], acc1[i][j]);
      if (tile2) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As2[kk * LDM + ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = has_b2 ? Bs2[kk * LDN + tx + 16 * j] : absval(b[j]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc2[i][j] = fma(a[i], b[j], acc2[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) epilogue(p, m0 + ty + 16 * i, n0 + tx + 16 * j, acc1[i][j], acc2[i][j]);
}

// ---------------------------------------------------------------------------------------------
// WMMA kernel. Block tile [WBM, WBN], k-step WBK, 4 warps as 2 x 2; warp (wm, wn) owns the
// [32, 32] sub-tile = 2 x 2 fragments of 16 x 16 in each accumulator. Shared tiles: As [WBM, WBK]
// row-major (matrix_a), Bs [WBN, WBK] = B^T row-major, i.e. B col-major (matrix_b), rows padded to
// WLD elements. |B| is taken element-wise on the B fragments. The epilogue stages both
// accumulators through shared memory ([WBM, WBN + 4] floats each, reusing the tile buffers) so that
// every thread sees acc1 and acc2 of the same element.
constexpr int WBM = 64, WBN = 64, WBK = 32, WNT = 128, WLD = WBK + 8, CLD = WBN + 4;

template <MathMode MODE> struct Wmma;
template <> struct Wmma<MathMode::kTf32> {
  using S = float;
  using Frag = nvcuda::wmma::precision::tf32;
  static constexpr int K = 8;
};
template <> struct Wmma<MathMode::kBf16> {
  using S = __nv_bfloat16;
  using Frag = __nv_bfloat16;
  static constexpr int K = 16;
};
template <> struct Wmma<MathMode::kHalf> {
  using S = __half;
  using Frag = __half;
  static constexpr int K = 16;
};

__device__ __forceinline__ float abs_bits(float x) { return fabsf(x); }
__device__ __forceinline__ __half abs_bits(__half x) { return __ushort_as_half(__half_as_ushort(x) & 0x7fffu); }
__device__ __forceinline__ __nv_bfloat16 abs_bits(__nv_bfloat16 x) {
  return __ushort_as_bfloat16(__bfloat16_as_ushort(x) & 0x7fffu);
}

template <typename T, MathMode MODE>
__host__ __device__ constexpr size_t wmma_smem_bytes() {
  using S = typename Wmma<MODE>::S;
  const size_t tiles = (2 * WBM + 2 * WBN) * WLD * sizeof(S);
  const size_t staging = 2 * WBM * CLD * sizeof(float);
  return tiles > staging ? tiles : staging;
}

template <typename T, MathMode MODE>
__global__ void __launch_bounds__(WNT) gemm_wmma_kernel(const GemmParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using S = typename Wmma<MODE>::S;
  using F = typename Wmma<MODE>::Frag;
  constexpr int WK = Wmma<MODE>::K;
  __shared__ __align__(128) unsigned char smem[wmma_smem_bytes<T, MODE>()];
  S* As = reinterpret_cast<S*>(smem);  // [WBM, WLD]
  S* As2 = As + WBM * WLD;             // [WBM, WLD]
  S* Bs = As2 + WBM * WLD;             // [WBN, WLD]
  S* Bs2 = Bs + WBN * WLD;             // [WBN, WLD]

  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * WBM, n0 = static_cast<int64_t>(blockIdx.y) * WBN;
  const bool rows2 = p.a2 != nullptr && m0 + WBM > p.m2_lo;
  const bool has_b2 = p.b2 != nullptr;

  wmma::fragment<wmma::accumulator, 16, 16, WK, float> acc1[2][2], acc2[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(acc1[i][j], 0.0f);
      wmma::fill_fragment(acc2[i][j], 0.0f);
    }

  for (int64_t k0 = 0; k0 < p.K; k0 += WBK) {
    const bool tile2 = rows2 && k0 + WBK > p.k2_lo;
    load_tile<WBM, WBK, WNT, MODE>(As, WLD, 1, p.a, p.sa_m, p.sa_k, m0, k0, 0, p.M, 0, p.K);
    load_tile<WBN, WBK, WNT, MODE>(Bs, WLD, 1, p.b, p.sb_n, p.sb_k, n0, k0, 0, p.N, 0, p.K);
    if (tile2) {
      load_tile<WBM, WBK, WNT, MODE>(As2, WLD, 1, p.a2, p.sa2_m, p.sa2_k, m0, k0, p.m2_lo, p.M, p.k2_lo, p.K);
      if (has_b2) load_tile<WBN, WBK, WNT, MODE>(Bs2, WLD, 1, p.b2, p.sb2_n, p.sb2_k, n0, k0, 0, p.N, p.k2_lo, p.K);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < WBK; kk += WK) {
      wmma::fragment<wmma::matrix_a, 16, 16, WK, F, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, WK, F, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * WLD + kk, WLD);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + (wn * 32 + j * 16) * WLD + kk, WLD);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc1[i][j], a[i], b[j], acc1[i][j]);
      if (tile2) {
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As2 + (wm * 32 + i * 16) * WLD + kk, WLD);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (has_b2) {
            wmma::load_matrix_sync(b[j], Bs2 + (wn * 32 + j * 16) * WLD + kk, WLD);
          } else {
#pragma unroll
            for (int t = 0; t < b[j].num_elements; ++t) b[j].x[t] = abs_bits(b[j].x[t]);
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc2[i][j], a[i], b[j], acc2[i][j]);
      }
    }
    __syncthreads();
  }

  // Stage both accumulators ([WBM, CLD] floats each) and run the epilogue element-wise.
  float* C1 = reinterpret_cast<float*>(smem);
  float* C2 = C1 + WBM * CLD;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int off = (wm * 32 + i * 16) * CLD + wn * 32 + j * 16;
      wmma::store_matrix_sync(C1 + off, acc1[i][j], CLD, wmma::mem_row_major);
      wmma::store_matrix_sync(C2 + off, acc2[i][j], CLD, wmma::mem_row_major);
    }
  __syncthreads();
  for (int e = threadIdx.x; e < WBM * WBN; e += WNT) {
    const int m = e / WBN, n = e % WBN;
    epilogue(p, m0 + m, n0 + n, C1[m * CLD + n], C2[m * CLD + n]);
  }
#else
  __trap();  // tensor-core modes need sm_80+; the launcher never selects them below that
#endif
}

template <typename T, MathMode MODE>
void launch_wmma(const GemmParams<T>& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>((p.M + WBM - 1) / WBM), static_cast<unsigned int>((p.N + WBN - 1) / WBN));
  gemm_wmma_kernel<T, MODE><<<grid, WNT, 0, stream>>>(p);
  CURE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

template <typename T>
void interval_gemm_cuda(const GemmParams<T>& p, MathMode mode, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return;
  if ((p.M + 63) / 64 > 0x7fffffffLL) throw std::invalid_argument("interval GEMM: too many rows");
  if ((p.N + 63) / 64 > 65535) throw std::invalid_argument("interval GEMM: more than 65535 * 64 output columns");
  if (mode == MathMode::kFma) {
    const dim3 grid(static_cast<unsigned int>((p.M + FBM - 1) / FBM), static_cast<unsigned int>((p.N + FBN - 1) / FBN));
    gemm_fma_kernel<T><<<grid, FNT, 0, stream>>>(p);
    CURE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (mode == MathMode::kTf32) return launch_wmma<T, MathMode::kTf32>(p, stream);
    if (mode == MathMode::kBf16) return launch_wmma<T, MathMode::kBf16>(p, stream);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (mode == MathMode::kBf16) return launch_wmma<T, MathMode::kBf16>(p, stream);
  } else if constexpr (std::is_same_v<T, __half>) {
    if (mode == MathMode::kHalf) return launch_wmma<T, MathMode::kHalf>(p, stream);
  }
  throw std::invalid_argument("interval GEMM: math mode " + std::to_string(static_cast<int>(mode)) +
                              " is not available for this dtype");
}

template void interval_gemm_cuda<float>(const GemmParams<float>&, MathMode, cudaStream_t);
template void interval_gemm_cuda<double>(const GemmParams<double>&, MathMode, cudaStream_t);
template void interval_gemm_cuda<__half>(const GemmParams<__half>&, MathMode, cudaStream_t);
template void interval_gemm_cuda<__nv_bfloat16>(const GemmParams<__nv_bfloat16>&, MathMode, cudaStream_t);

}  // namespace cure_fast
