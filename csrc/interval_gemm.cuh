// The interval GEMM main loops, shared by the linear and the convolution problems.
//
// A *problem* is two products that share the operand B,
//   acc1[m, n] = sum_k A [m, k] * B [k, n]
//   acc2[m, n] = sum_k A2[m, k] * B2[k, n]     (terms only for m >= m2_lo and k >= k2_lo)
// where B2 is |B| or B² taken from the B tile in shared memory (never loaded twice), or an operand
// of its own. Operands are fetched element by element through *operand* objects, so that the same
// loops compute a strided matrix product or a convolution read as an implicit GEMM (im2col on the
// fly, zero padding included). The epilogue gets both accumulators of each output (m, n).
//
// Problem interface (the Problem template below):
//   using T                                    storage type of operands and outputs
//   static constexpr SecondB kB2               where B2 comes from
//   static constexpr bool kRowsFast            epilogue order: consecutive threads walk m (true, for
//                                              NCHW outputs) or n (row-major outputs)
//   int64_t M, N, K, m2_lo, k2_lo, k_chunk; bool second
//   operands a, b, a2, b2; epilogue epi(m, n, z, acc1, acc2), called for m < M, n < N only
// The reduction may be split over blockIdx.z (split-K): block z covers
// k in [z * k_chunk, min(K, (z + 1) * k_chunk)) and passes z to the epilogue.
//
// Operand interface (element (x, k): x is the row m for A / A2, the column n for B / B2):
//   using T; bool k_fast() const               whether consecutive k are adjacent in memory
//   xpart(x), kpart(k)                         the coordinates decomposed once (x, k in range)
//   get(xpart, kpart) -> compute type          the element, 0 where it is absent
//
// Two kernels: a CUDA-core FMA kernel (IEEE fp32, or fp64) and a tensor-core WMMA kernel (TF32,
// bfloat16 or fp16 inputs, fp32 accumulation; sm_80+). Both stage one tile of every operand in
// shared memory per k-step.
#pragma once

#include <mma.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.h"

namespace cure_fast {

#ifdef CURE_FAST_HOST_EMULATION
namespace host_emulation {
// Host emulation build: the kernel launches of run() below run the kernel's block schedule on the
// host instead (defined by the test, tests/cuda_host/emulate.h).
template <class P> void launch(const P& p, dim3 grid, MathMode mode);
}  // namespace host_emulation
#endif

namespace gemm {

// Where the second product's B operand comes from.
enum class SecondB {
  kAbs,     // |B|, from the B tile (interval bounds)
  kSquare,  // B², from the B values as they are staged (the l2 first layer)
  kLoad,    // an operand of its own (weight gradients)
};

template <typename T_, SecondB B2, bool ROWS_FAST, class OpA, class OpB, class OpA2, class OpB2, class Epi>
struct Problem {
  using T = T_;
  static constexpr SecondB kB2 = B2;
  static constexpr bool kRowsFast = ROWS_FAST;
  int64_t M = 0, N = 0, K = 0;
  int64_t m2_lo = 0, k2_lo = 0;  // the second product has terms only for m >= m2_lo, k >= k2_lo
  int64_t k_chunk = 0;           // reduction length per blockIdx.z; 0: no split
  bool second = false;           // whether there is a second product at all
  OpA a;
  OpB b;
  OpA2 a2;
  OpB2 b2;
  Epi epi;
};

// The operand of a problem whose B2 is derived from B: never read.
template <typename T_> struct NoOperand {
  using T = T_;
  struct Part {};
  CURE_HOST_DEVICE bool k_fast() const { return true; }
  CURE_HOST_DEVICE Part xpart(int64_t) const { return {}; }
  CURE_HOST_DEVICE Part kpart(int64_t) const { return {}; }
  CURE_HOST_DEVICE typename Acc<T>::type get(Part, Part) const { return 0; }
};

// A strided matrix: element (x, k) at p[(x - x_lo) * sx + (k - k_lo) * sk] for x >= x_lo and
// k >= k_lo, else 0 (the radius operands of the linear problems start at m2_lo / k2_lo).
template <typename T_> struct Strided {
  using T = T_;
  const T* p = nullptr;
  int64_t sx = 0, sk = 0, x_lo = 0, k_lo = 0;
  struct Part {
    int64_t off;
    bool ok;
  };
  CURE_HOST_DEVICE bool k_fast() const { return sk == 1; }
  CURE_HOST_DEVICE Part xpart(int64_t x) const { return {(x - x_lo) * sx, x >= x_lo}; }
  CURE_HOST_DEVICE Part kpart(int64_t k) const { return {(k - k_lo) * sk, k >= k_lo}; }
  CURE_HOST_DEVICE typename Acc<T>::type get(const Part& x, const Part& k) const {
    using A = typename Acc<T>::type;
    return x.ok && k.ok ? A(load(p + x.off + k.off)) : A(0);
  }
};

// Bias, per-channel scale / shift (a folded BatchNorm) and the interval ReLU on one output:
//   z_c = (acc1 + bias) * scale + shift, z_r = acc2 * |scale|, then the interval ReLU (points: relu).
template <typename T> struct Affine {
  const T* bias = nullptr;
  const T* scale = nullptr;
  const T* shift = nullptr;
  bool relu = false;
  template <typename A> CURE_HOST_DEVICE __forceinline__ void operator()(int64_t ch, bool has_r, A& zc, A& zr) const {
    if (bias != nullptr) zc += A(load(bias + ch));
    if (scale != nullptr) {
      const A s = load(scale + ch);
      zc *= s;
      zr *= absval(s);
    }
    if (shift != nullptr) zc += A(load(shift + ch));
    if (relu) {
      if (has_r) {
        const A l = cure_fast::relu(zc - zr), u = cure_fast::relu(zc + zr);
        zc = (u + l) / A(2);
        zr = (u - l) / A(2);
      } else {
        zc = cure_fast::relu(zc);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Shared-memory value conversion: the compute type for the FMA kernel, the MMA input type for
// the WMMA kernel (TF32 values are kept in float storage, rounded).
template <typename S, MathMode MODE> struct ToSmem;
template <> struct ToSmem<float, MathMode::kFma> {
  CURE_HOST_DEVICE static float cvt(float v) { return v; }
};
template <> struct ToSmem<double, MathMode::kFma> {
  CURE_HOST_DEVICE static double cvt(double v) { return v; }
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

// Stores v at dst[i], and v² at sq[i] when sq is given.
template <MathMode MODE, typename S, typename A>
CURE_HOST_DEVICE __forceinline__ void put(S* dst, S* sq, int i, A v) {
  dst[i] = ToSmem<S, MODE>::cvt(v);
  if (sq != nullptr) sq[i] = ToSmem<S, MODE>::cvt(v * v);
}

// Loads the [TX, TK] tile of `op` at (x0, k0) into shared memory: tile element (x, k) goes to
// dst[x * dx + k * dk] (and its square to sq[...] when sq is given); elements with x0 + x >= x_end
// or k0 + k >= k_end are 0. Consecutive threads walk the operand's contiguous dimension (coalesced
// loads); each thread keeps one coordinate of it, decomposed once, and walks the other dimension.
template <int TX, int TK, int NT, MathMode MODE, typename S, class Op>
CURE_HOST_DEVICE __forceinline__ void load_tile(S* dst, S* sq, int dx, int dk, const Op& op, int64_t x0,
                                                int64_t k0, int64_t x_end, int64_t k_end) {
  static_assert(NT % TX == 0 && NT % TK == 0 && (TX * TK) % NT == 0, "tile and thread counts do not match");
  using A = typename Acc<typename Op::T>::type;
  constexpr int kIters = TX * TK / NT;
  if (op.k_fast()) {
    const int k = CURE_THREAD_INDEX % TK;
    const bool k_in = k0 + k < k_end;
    const auto kp = op.kpart(k_in ? k0 + k : k0);
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int x = CURE_THREAD_INDEX / TK + i * (NT / TK);
      A v = 0;
      if (k_in && x0 + x < x_end) v = op.get(op.xpart(x0 + x), kp);
      put<MODE>(dst, sq, x * dx + k * dk, v);
    }
  } else {
    const int x = CURE_THREAD_INDEX % TX;
    const bool x_in = x0 + x < x_end;
    const auto xp = op.xpart(x_in ? x0 + x : x0);
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int k = CURE_THREAD_INDEX / TX + i * (NT / TX);
      A v = 0;
      if (x_in && k0 + k < k_end) v = op.get(xp, op.kpart(k0 + k));
      put<MODE>(dst, sq, x * dx + k * dk, v);
    }
  }
}

// The reduction range [k_begin, k_end) of block z.
struct KRange {
  int64_t begin, end;
};
template <class P> __device__ __forceinline__ KRange k_range(const P& p) {
  const int64_t begin = static_cast<int64_t>(blockIdx.z) * p.k_chunk;
  return {begin, begin + p.k_chunk < p.K ? begin + p.k_chunk : p.K};
}

// ---------------------------------------------------------------------------------------------
// FMA kernel. Block tile [FBM, FBN] of the output, k-step FBK, 256 threads as a 16 x 16 grid;
// thread (tx, ty) owns the 4 x 4 outputs (ri + 16 i, ci + 16 j) of both accumulators, with
// (ri, ci) = (tx, ty) when the epilogue walks m, else (ty, tx). Shared memory holds the tiles
// k-major: As[k][m] [FBK, FBM], Bs[k][n] [FBK, FBN], and the same for A2 / B2.
constexpr int FBM = 64, FBN = 64, FBK = 16, FNT = 256;

// Blocks per SM the FMA kernel is compiled for: three (at most 85 registers a thread) in fp32,
// one in fp64 (its tiles and accumulators take twice the registers).
template <class P> constexpr int fma_min_blocks() { return sizeof(typename Acc<typename P::T>::type) == 8 ? 1 : 3; }

template <class P>
__global__ void __launch_bounds__(FNT, fma_min_blocks<P>()) fma_kernel(const P p) {
  using A = typename Acc<typename P::T>::type;
  constexpr int LDM = FBM + 4, LDN = FBN + 4;  // padded rows against bank conflicts
  constexpr MathMode kMode = MathMode::kFma;
  __shared__ A As[FBK * LDM], Bs[FBK * LDN], As2[FBK * LDM], Bs2[FBK * LDN];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int ri = P::kRowsFast ? tx : ty, ci = P::kRowsFast ? ty : tx;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * FBM, n0 = static_cast<int64_t>(blockIdx.y) * FBN;
  const KRange kr = k_range(p);
  // Whether any row of this tile carries a second product (uniform over the block).
  const bool rows2 = p.second && m0 + FBM > p.m2_lo;

  A acc1[4][4], acc2[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc1[i][j] = acc2[i][j] = A(0);

  for (int64_t k0 = kr.begin; k0 < kr.end; k0 += FBK) {
    const bool tile2 = rows2 && k0 + FBK > p.k2_lo;  // the second product has terms in this k-step
    A* const sq = P::kB2 == SecondB::kSquare && tile2 ? Bs2 : nullptr;
    load_tile<FBM, FBK, FNT, kMode>(As, static_cast<A*>(nullptr), 1, LDM, p.a, m0, k0, p.M, kr.end);
    load_tile<FBN, FBK, FNT, kMode>(Bs, sq, 1, LDN, p.b, n0, k0, p.N, kr.end);
    if (tile2) {
      load_tile<FBM, FBK, FNT, kMode>(As2, static_cast<A*>(nullptr), 1, LDM, p.a2, m0, k0, p.M, kr.end);
      if constexpr (P::kB2 == SecondB::kLoad)
        load_tile<FBN, FBK, FNT, kMode>(Bs2, static_cast<A*>(nullptr), 1, LDN, p.b2, n0, k0, p.N, kr.end);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < FBK; ++kk) {
      A a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk * LDM + ri + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk * LDN + ci + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc1[i][j] = fma(a[i], b[j], acc1[i][j]);
      if (tile2) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As2[kk * LDM + ri + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          b[j] = P::kB2 == SecondB::kAbs ? absval(b[j]) : Bs2[kk * LDN + ci + 16 * j];
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
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ri + 16 * i, n = n0 + ci + 16 * j;
      if (m < p.M && n < p.N) p.epi(m, n, static_cast<int>(blockIdx.z), acc1[i][j], acc2[i][j]);
    }
}

// ---------------------------------------------------------------------------------------------
// WMMA kernel. Block tile [WBM, WBN], k-step WBK, 4 warps as 2 x 2; warp (wm, wn) owns the
// [32, 32] sub-tile = 2 x 2 fragments of 16 x 16 in each accumulator. Shared tiles: As [WBM, WBK]
// row-major (matrix_a), Bs [WBN, WBK] = B^T row-major, i.e. B col-major (matrix_b), rows padded to
// WLD elements. |B| is taken element-wise on the B fragments. The epilogue stages both
// accumulators through shared memory (CLD-padded, reusing the tile buffers; column-major when the
// epilogue walks m, so that consecutive threads read consecutive words) so that every thread sees
// acc1 and acc2 of the same element.
constexpr int WBM = 64, WBN = 64, WBK = 32, WNT = 128, WLD = WBK + 8, CLD = WBN + 4;
static_assert(WBM == WBN, "the staging buffers are square");

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

template <MathMode MODE>
__host__ __device__ constexpr size_t wmma_smem_bytes() {
  using S = typename Wmma<MODE>::S;
  const size_t tiles = (2 * WBM + 2 * WBN) * WLD * sizeof(S);
  const size_t staging = 2 * WBM * CLD * sizeof(float);
  return tiles > staging ? tiles : staging;
}

template <class P, MathMode MODE>
__global__ void __launch_bounds__(WNT) wmma_kernel(const P p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using S = typename Wmma<MODE>::S;
  using F = typename Wmma<MODE>::Frag;
  constexpr int WK = Wmma<MODE>::K;
  __shared__ __align__(128) unsigned char smem[wmma_smem_bytes<MODE>()];
  S* As = reinterpret_cast<S*>(smem);  // [WBM, WLD]
  S* As2 = As + WBM * WLD;             // [WBM, WLD]
  S* Bs = As2 + WBM * WLD;             // [WBN, WLD]
  S* Bs2 = Bs + WBN * WLD;             // [WBN, WLD]

  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * WBM, n0 = static_cast<int64_t>(blockIdx.y) * WBN;
  const KRange kr = k_range(p);
  const bool rows2 = p.second && m0 + WBM > p.m2_lo;

  wmma::fragment<wmma::accumulator, 16, 16, WK, float> acc1[2][2], acc2[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(acc1[i][j], 0.0f);
      wmma::fill_fragment(acc2[i][j], 0.0f);
    }

  for (int64_t k0 = kr.begin; k0 < kr.end; k0 += WBK) {
    const bool tile2 = rows2 && k0 + WBK > p.k2_lo;
    S* const sq = P::kB2 == SecondB::kSquare && tile2 ? Bs2 : nullptr;
    load_tile<WBM, WBK, WNT, MODE>(As, static_cast<S*>(nullptr), WLD, 1, p.a, m0, k0, p.M, kr.end);
    load_tile<WBN, WBK, WNT, MODE>(Bs, sq, WLD, 1, p.b, n0, k0, p.N, kr.end);
    if (tile2) {
      load_tile<WBM, WBK, WNT, MODE>(As2, static_cast<S*>(nullptr), WLD, 1, p.a2, m0, k0, p.M, kr.end);
      if constexpr (P::kB2 == SecondB::kLoad)
        load_tile<WBN, WBK, WNT, MODE>(Bs2, static_cast<S*>(nullptr), WLD, 1, p.b2, n0, k0, p.N, kr.end);
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
          if constexpr (P::kB2 == SecondB::kAbs) {
#pragma unroll
            for (int t = 0; t < b[j].num_elements; ++t) b[j].x[t] = abs_bits(b[j].x[t]);
          } else {
            wmma::load_matrix_sync(b[j], Bs2 + (wn * 32 + j * 16) * WLD + kk, WLD);
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

  // Stage both accumulators and run the epilogue element-wise: C[m * CLD + n] (row-major) or
  // C[n * CLD + m] (column-major, when the epilogue walks m).
  float* C1 = reinterpret_cast<float*>(smem);
  float* C2 = C1 + WBM * CLD;
  constexpr auto kLayout = P::kRowsFast ? wmma::mem_col_major : wmma::mem_row_major;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int fm = wm * 32 + i * 16, fn = wn * 32 + j * 16;
      const int off = P::kRowsFast ? fn * CLD + fm : fm * CLD + fn;
      wmma::store_matrix_sync(C1 + off, acc1[i][j], CLD, kLayout);
      wmma::store_matrix_sync(C2 + off, acc2[i][j], CLD, kLayout);
    }
  __syncthreads();
  for (int e = threadIdx.x; e < WBM * WBN; e += WNT) {
    const int m = P::kRowsFast ? e % WBM : e / WBN, n = P::kRowsFast ? e / WBM : e % WBN;
    const int off = P::kRowsFast ? n * CLD + m : m * CLD + n;
    if (m0 + m < p.M && n0 + n < p.N) p.epi(m0 + m, n0 + n, static_cast<int>(blockIdx.z), C1[off], C2[off]);
  }
#else
  __trap();  // tensor-core modes need sm_80+; the launcher never selects them below that
#endif
}

// ---------------------------------------------------------------------------------------------
// Split-K: how to cut the reduction of an M x N problem over K so that the grid holds about four
// blocks per SM, with at least kMinSplitK reduction steps per split and chunks a multiple of the
// k-steps of both kernels. splits == 1 (chunk K): no split.
constexpr int64_t kMinSplitK = 512;

struct SplitK {
  int64_t splits, chunk;
};

inline SplitK split_k(int64_t M, int64_t N, int64_t K, int sm_count) {
  if (K == 0) return {1, 1};
  if (M == 0 || N == 0) return {1, K};  // an empty output: nothing to split
  const int64_t tiles = ((M + FBM - 1) / FBM) * ((N + FBN - 1) / FBN);
  const int64_t want = (4 * static_cast<int64_t>(sm_count) + tiles - 1) / tiles;
  int64_t most = K / kMinSplitK;
  if (most > 65535) most = 65535;
  const int64_t splits = want < most ? want : most;
  if (splits <= 1) return {1, K};
  const int64_t step = WBK;  // a multiple of both k-steps
  const int64_t chunk = ((K + splits - 1) / splits + step - 1) / step * step;
  return {(K + chunk - 1) / chunk, chunk};
}

// ---------------------------------------------------------------------------------------------
// Launch: grid (M / 64, N / 64, splits of the reduction) on `stream`, with the kernel of `mode`:
// kFma for every T; kTf32 / kBf16 for float; kBf16 for bfloat16; kHalf for half. Throws
// std::invalid_argument for a mode the dtype does not have or a grid that does not fit.
template <class P, MathMode MODE>
void launch_wmma(const P& p, dim3 grid, cudaStream_t stream) {
#ifdef CURE_FAST_HOST_EMULATION
  host_emulation::launch(p, grid, MODE);
  (void)stream;
#else
  wmma_kernel<P, MODE><<<grid, WNT, 0, stream>>>(p);
  CURE_CUDA_CHECK(cudaGetLastError());
#endif
}

template <class P>
void run(P p, MathMode mode, cudaStream_t stream) {
  static_assert(FBM == WBM && FBN == WBN, "both kernels use the same grid");
  using T = typename P::T;
  if (p.M == 0 || p.N == 0) return;
  if (p.k_chunk <= 0) p.k_chunk = p.K > 0 ? p.K : 1;
  const int64_t splits = p.K > 0 ? (p.K + p.k_chunk - 1) / p.k_chunk : 1;
  if ((p.M + FBM - 1) / FBM > 0x7fffffffLL) throw std::invalid_argument("interval GEMM: too many rows");
  if ((p.N + FBN - 1) / FBN > 65535) throw std::invalid_argument("interval GEMM: more than 65535 * 64 output columns");
  if (splits > 65535) throw std::invalid_argument("interval GEMM: more than 65535 reduction splits");
  const dim3 grid(static_cast<unsigned int>((p.M + FBM - 1) / FBM), static_cast<unsigned int>((p.N + FBN - 1) / FBN),
                  static_cast<unsigned int>(splits));
  if (mode == MathMode::kFma) {
#ifdef CURE_FAST_HOST_EMULATION
    host_emulation::launch(p, grid, mode);
#else
    fma_kernel<P><<<grid, FNT, 0, stream>>>(p);
    CURE_CUDA_CHECK(cudaGetLastError());
#endif
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (mode == MathMode::kTf32) return launch_wmma<P, MathMode::kTf32>(p, grid, stream);
    if (mode == MathMode::kBf16) return launch_wmma<P, MathMode::kBf16>(p, grid, stream);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if (mode == MathMode::kBf16) return launch_wmma<P, MathMode::kBf16>(p, grid, stream);
  } else if constexpr (std::is_same_v<T, __half>) {
    if (mode == MathMode::kHalf) return launch_wmma<P, MathMode::kHalf>(p, grid, stream);
  }
  throw std::invalid_argument("interval GEMM: math mode " + std::to_string(static_cast<int>(mode)) +
                              " is not available for this dtype");
}

}  // namespace gemm
}  // namespace cure_fast
