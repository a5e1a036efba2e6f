// Host emulation of the interval GEMM kernels (csrc/interval_gemm.cuh), for
// tests/test_cuda_host_emulation.py. Built with CURE_FAST_HOST_EMULATION defined, the sources
// hand every kernel launch of gemm::run to launch() below, and the split-K sum of the conv weight
// gradient to sum_splits(); launch() runs the block schedule of the FMA or the WMMA kernel on the
// host, one block after the other: the real load_tile fills the shared-memory tiles thread by
// thread (host_emulation::thread_x is the thread index), from the real operands, and the real
// epilogue stores each output. Only the arithmetic differs: products are accumulated in the
// compute type (double for double) instead of FMA or tensor-core instructions, so that the index
// maps can be compared with a float64 reference to rounding error.
//
// Checks, reported as std::runtime_error: every load and store of the operands and epilogues
// falls in a buffer registered with add_buffer (stores only in writable ones), and every element
// of a shared-memory tile that the main loop reads was written by load_tile (the tiles are
// NaN-filled before each k-step).
//
// Included by one translation unit (harness.cu), before the problem sources.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "interval_gemm.cuh"

namespace cure_fast {
namespace host_emulation {

// The block schedule that launch() runs: the one of the kernel that run() launches (the FMA
// kernel for MathMode::kFma, the WMMA kernel otherwise), or one of them whatever the mode (the
// WMMA tile layout is checked in double that way, a type the tensor-core kernel never sees).
enum class Schedule { kKernel = 0, kFma = 1, kWmma = 2 };
inline Schedule schedule = Schedule::kKernel;

struct Buffer {
  const char* begin;
  const char* end;
  bool writable;
};
inline std::vector<Buffer> buffers;

// What the launches did, for the tests: kernel launches, blocks, k-steps of the main loop and the
// k-steps that loaded the second product's tiles; the grid of the last launch.
struct Counters {
  long long launches = 0, blocks = 0, ksteps = 0, ksteps2 = 0;
  long long grid_x = 0, grid_y = 0, grid_z = 0;
};
inline Counters counters;

void check_access(const void* p, size_t bytes, bool write) {
  const char* c = static_cast<const char*>(p);
  for (const Buffer& b : buffers) {
    if (c >= b.begin && c + bytes <= b.end) {
      if (write && !b.writable) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "store into a read-only buffer at %p (offset %lld)", p,
                      static_cast<long long>(c - b.begin));
        throw std::runtime_error(msg);
      }
      return;
    }
  }
  char msg[120];
  std::snprintf(msg, sizeof msg, "%s of %zu bytes at %p outside every buffer", write ? "store" : "load", bytes, p);
  throw std::runtime_error(msg);
}

template <typename A> void require_written(const std::vector<A>& tile, int at, const char* what, long long k0, int x,
                                           int k) {
  if (std::isnan(tile[at])) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "%s tile element (x %d, k %d) not written by load_tile (k-step at %lld)", what, x,
                  k, k0);
    throw std::runtime_error(msg);
  }
}

// The reduction range of block z: k_range() of interval_gemm.cuh.
struct Range {
  int64_t begin, end;
};
template <class P> Range k_range(const P& p, unsigned int z) {
  const int64_t begin = static_cast<int64_t>(z) * p.k_chunk;
  return {begin, begin + p.k_chunk < p.K ? begin + p.k_chunk : p.K};
}

// gemm::fma_kernel for block (bx, by, bz).
template <class P> void fma_block(const P& p, unsigned int bx, unsigned int by, unsigned int bz) {
  using namespace gemm;
  using A = typename Acc<typename P::T>::type;
  constexpr int LDM = FBM + 4, LDN = FBN + 4;
  constexpr MathMode kMode = MathMode::kFma;
  const A nan = std::numeric_limits<A>::quiet_NaN();
  std::vector<A> As(FBK * LDM), Bs(FBK * LDN), As2(FBK * LDM), Bs2(FBK * LDN);
  std::vector<A> acc1(FNT * 16, A(0)), acc2(FNT * 16, A(0));  // [thread][i][j]
  const int64_t m0 = static_cast<int64_t>(bx) * FBM, n0 = static_cast<int64_t>(by) * FBN;
  const Range kr = k_range(p, bz);
  const bool rows2 = p.second && m0 + FBM > p.m2_lo;

  for (int64_t k0 = kr.begin; k0 < kr.end; k0 += FBK) {
    const bool tile2 = rows2 && k0 + FBK > p.k2_lo;
    ++counters.ksteps;
    counters.ksteps2 += tile2;
    for (auto* t : {&As, &Bs, &As2, &Bs2}) t->assign(t->size(), nan);
    A* const sq = P::kB2 == SecondB::kSquare && tile2 ? Bs2.data() : nullptr;
    for (thread_x = 0; thread_x < FNT; ++thread_x) {
      load_tile<FBM, FBK, FNT, kMode>(As.data(), static_cast<A*>(nullptr), 1, LDM, p.a, m0, k0, p.M, kr.end);
      load_tile<FBN, FBK, FNT, kMode>(Bs.data(), sq, 1, LDN, p.b, n0, k0, p.N, kr.end);
      if (tile2) {
        load_tile<FBM, FBK, FNT, kMode>(As2.data(), static_cast<A*>(nullptr), 1, LDM, p.a2, m0, k0, p.M, kr.end);
        if constexpr (P::kB2 == SecondB::kLoad)
          load_tile<FBN, FBK, FNT, kMode>(Bs2.data(), static_cast<A*>(nullptr), 1, LDN, p.b2, n0, k0, p.N, kr.end);
      }
    }
    // The main loop reads columns [0, FBM) / [0, FBN) of every k row (not the padding).
    for (int kk = 0; kk < FBK; ++kk) {
      for (int x = 0; x < FBM; ++x) {
        require_written(As, kk * LDM + x, "A", k0, x, kk);
        if (tile2) require_written(As2, kk * LDM + x, "A2", k0, x, kk);
      }
      for (int x = 0; x < FBN; ++x) {
        require_written(Bs, kk * LDN + x, "B", k0, x, kk);
        if (tile2 && P::kB2 != SecondB::kAbs) require_written(Bs2, kk * LDN + x, "B2", k0, x, kk);
      }
    }
    for (int tid = 0; tid < FNT; ++tid) {
      const int tx = tid % 16, ty = tid / 16;
      const int ri = P::kRowsFast ? tx : ty, ci = P::kRowsFast ? ty : tx;
      A* const c1 = &acc1[tid * 16];
      A* const c2 = &acc2[tid * 16];
      for (int kk = 0; kk < FBK; ++kk) {
        A a[4], b[4];
        for (int i = 0; i < 4; ++i) a[i] = As[kk * LDM + ri + 16 * i];
        for (int j = 0; j < 4; ++j) b[j] = Bs[kk * LDN + ci + 16 * j];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) c1[i * 4 + j] += a[i] * b[j];
        if (tile2) {
          for (int i = 0; i < 4; ++i) a[i] = As2[kk * LDM + ri + 16 * i];
          for (int j = 0; j < 4; ++j)
            b[j] = P::kB2 == SecondB::kAbs ? absval(b[j]) : Bs2[kk * LDN + ci + 16 * j];
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) c2[i * 4 + j] += a[i] * b[j];
        }
      }
    }
  }
  for (int tid = 0; tid < FNT; ++tid) {
    const int tx = tid % 16, ty = tid / 16;
    const int ri = P::kRowsFast ? tx : ty, ci = P::kRowsFast ? ty : tx;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t m = m0 + ri + 16 * i, n = n0 + ci + 16 * j;
        const int at = tid * 16 + i * 4 + j;
        if (m < p.M && n < p.N) p.epi(m, n, static_cast<int>(bz), acc1[at], acc2[at]);
      }
  }
}

// gemm::wmma_kernel for block (bx, by, bz), with the tiles in the compute type (the conversions
// of the FMA kernel) and each warp's 16 x 16 fragment products as plain sums over the k-step.
template <class P> void wmma_block(const P& p, unsigned int bx, unsigned int by, unsigned int bz) {
  using namespace gemm;
  using A = typename Acc<typename P::T>::type;
  constexpr MathMode kMode = MathMode::kFma;
  const A nan = std::numeric_limits<A>::quiet_NaN();
  std::vector<A> As(WBM * WLD), Bs(WBN * WLD), As2(WBM * WLD), Bs2(WBN * WLD);
  std::vector<A> acc1(WBM * WBN, A(0)), acc2(WBM * WBN, A(0));  // [m][n] of the block tile
  const int64_t m0 = static_cast<int64_t>(bx) * WBM, n0 = static_cast<int64_t>(by) * WBN;
  const Range kr = k_range(p, bz);
  const bool rows2 = p.second && m0 + WBM > p.m2_lo;

  for (int64_t k0 = kr.begin; k0 < kr.end; k0 += WBK) {
    const bool tile2 = rows2 && k0 + WBK > p.k2_lo;
    ++counters.ksteps;
    counters.ksteps2 += tile2;
    for (auto* t : {&As, &Bs, &As2, &Bs2}) t->assign(t->size(), nan);
    A* const sq = P::kB2 == SecondB::kSquare && tile2 ? Bs2.data() : nullptr;
    for (thread_x = 0; thread_x < WNT; ++thread_x) {
      load_tile<WBM, WBK, WNT, kMode>(As.data(), static_cast<A*>(nullptr), WLD, 1, p.a, m0, k0, p.M, kr.end);
      load_tile<WBN, WBK, WNT, kMode>(Bs.data(), sq, WLD, 1, p.b, n0, k0, p.N, kr.end);
      if (tile2) {
        load_tile<WBM, WBK, WNT, kMode>(As2.data(), static_cast<A*>(nullptr), WLD, 1, p.a2, m0, k0, p.M, kr.end);
        if constexpr (P::kB2 == SecondB::kLoad)
          load_tile<WBN, WBK, WNT, kMode>(Bs2.data(), static_cast<A*>(nullptr), WLD, 1, p.b2, n0, k0, p.N, kr.end);
      }
    }
    // The fragments read columns [0, WBK) of every row (not the padding).
    for (int x = 0; x < WBM; ++x)
      for (int k = 0; k < WBK; ++k) {
        require_written(As, x * WLD + k, "A", k0, x, k);
        require_written(Bs, x * WLD + k, "B", k0, x, k);
        if (tile2) {
          require_written(As2, x * WLD + k, "A2", k0, x, k);
          if (P::kB2 != SecondB::kAbs) require_written(Bs2, x * WLD + k, "B2", k0, x, k);
        }
      }
    for (int m = 0; m < WBM; ++m)
      for (int n = 0; n < WBN; ++n) {
        A s1 = 0, s2 = 0;
        for (int kk = 0; kk < WBK; ++kk) {
          const A b = Bs[n * WLD + kk];
          s1 += As[m * WLD + kk] * b;
          if (tile2) s2 += As2[m * WLD + kk] * (P::kB2 == SecondB::kAbs ? absval(b) : Bs2[n * WLD + kk]);
        }
        acc1[m * WBN + n] += s1;
        acc2[m * WBN + n] += s2;
      }
  }
  // store_matrix_sync of the fragment at (fm, fn) to C + off with leading dimension CLD: element
  // (i, j) of the fragment at [i * CLD + j] (mem_row_major) or [i + j * CLD] (mem_col_major).
  std::vector<A> C1(WBM * CLD, nan), C2(WBM * CLD, nan);
  for (int warp = 0; warp < WNT / 32; ++warp) {
    const int wm = warp / 2, wn = warp % 2;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) {
        const int fm = wm * 32 + i * 16, fn = wn * 32 + j * 16;
        const int off = P::kRowsFast ? fn * CLD + fm : fm * CLD + fn;
        for (int r = 0; r < 16; ++r)
          for (int c = 0; c < 16; ++c) {
            const int at = P::kRowsFast ? off + r + c * CLD : off + r * CLD + c;
            C1[at] = acc1[(fm + r) * WBN + fn + c];
            C2[at] = acc2[(fm + r) * WBN + fn + c];
          }
      }
  }
  for (thread_x = 0; thread_x < WNT; ++thread_x)
    for (int e = static_cast<int>(thread_x); e < WBM * WBN; e += WNT) {
      const int m = P::kRowsFast ? e % WBM : e / WBN, n = P::kRowsFast ? e / WBM : e % WBN;
      const int off = P::kRowsFast ? n * CLD + m : m * CLD + n;
      if (std::isnan(C1[off]) || std::isnan(C2[off])) throw std::runtime_error("staging element not stored");
      if (m0 + m < p.M && n0 + n < p.N) p.epi(m0 + m, n0 + n, static_cast<int>(bz), C1[off], C2[off]);
    }
}

template <class P> void launch(const P& p, dim3 grid, MathMode mode) {
  const bool wmma = schedule == Schedule::kWmma || (schedule == Schedule::kKernel && mode != MathMode::kFma);
  ++counters.launches;
  counters.grid_x = grid.x, counters.grid_y = grid.y, counters.grid_z = grid.z;
  for (unsigned int z = 0; z < grid.z; ++z)
    for (unsigned int y = 0; y < grid.y; ++y)
      for (unsigned int x = 0; x < grid.x; ++x) {
        ++counters.blocks;
        if (wmma) {
          wmma_block(p, x, y, z);
        } else {
          fma_block(p, x, y, z);
        }
      }
}

// sum_splits_kernel of interval_conv.cu.
template <typename T, typename A> void sum_splits(const A* workspace, T* out, int64_t size, int64_t splits) {
  for (int64_t i = 0; i < size; ++i) {
    A s = 0;
    for (int64_t z = 0; z < splits; ++z) {
      const A* w = workspace + z * size + i;
      check_access(w, sizeof(A), false);
      s += *w;
    }
    store(out + i, s);
  }
}

}  // namespace host_emulation
}  // namespace cure_fast
