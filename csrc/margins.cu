// The margin fold of the last linear layer (the specification e_y - e_j inside the weight), for
// interval and l2 inputs, and the l2 row norms of a first linear layer.
#include "common.h"

namespace cure_fast {
namespace {

constexpr int kWarps = 8;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// One block per row n of c; warp w handles classes j = w, w + kWarps, ...; its lanes split the
// features and combine with shuffles. Row W_y stays in L1 across the block's classes.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    margins_kernel(const T* __restrict__ c, const T* __restrict__ r, const T* __restrict__ weight,
                   const T* __restrict__ bias, const int64_t* __restrict__ labels, const T* __restrict__ eps,
                   T* __restrict__ out, int64_t n_points, int64_t r_rows, int64_t classes, int64_t features,
                   bool l2) {
  using A = typename Acc<T>::type;
  const int64_t n = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t y = labels[n];
  const bool valid = y >= 0 && y < classes;
  const bool has_r = r != nullptr && n >= n_points;
  const T* c_row = c + n * features;
  const T* r_row = has_r ? r + (l2 && r_rows == 1 ? 0 : n - n_points) * features : nullptr;
  const T* w_y = weight + (valid ? y : 0) * features;
  const A e = eps != nullptr ? A(load(eps + n)) : A(1);
  for (int64_t j = warp; j < classes; j += kWarps) {
    const T* w_j = weight + j * features;
    A acc_c = 0, acc_r = 0;
    for (int64_t i = lane; i < features; i += 32) {
      const A d = A(load(w_y + i)) - A(load(w_j + i));
      acc_c = fma(d, A(load(c_row + i)), acc_c);
      if (has_r) acc_r = fma(l2 ? d * d : absval(d), A(load(r_row + i)), acc_r);
    }
    acc_c = warp_sum(acc_c);
    acc_r = warp_sum(acc_r);
    if (lane == 0) {
      A m = acc_c;
      if (bias != nullptr) m += A(load(bias + (valid ? y : 0))) - A(load(bias + j));
      if (has_r) m -= e * (l2 ? sqrt(acc_r) : acc_r);
      store(out + n * classes + j, valid ? m : A(NAN));
    }
  }
}

// One warp per output row: radius[o] = sqrt(sum_i W[o, i]^2 s2[i]).
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    row_norms_kernel(const T* __restrict__ weight, const T* __restrict__ s2, T* __restrict__ radius,
                     int64_t out_features, int64_t features) {
  using A = typename Acc<T>::type;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (o >= out_features) return;
  A acc = 0;
  for (int64_t i = lane; i < features; i += 32) {
    const A w = load(weight + o * features + i);
    acc = fma(w * w, s2 != nullptr ? A(load(s2 + i)) : A(1), acc);
  }
  acc = warp_sum(acc);
  if (lane == 0) store(radius + o, sqrt(acc));
}

}  // namespace

template <typename T>
void margins_linear_cuda(const T* c, const T* r, const T* weight, const T* bias, const int64_t* labels, const T* eps,
                         T* out, int64_t n, int64_t n_points, int64_t r_rows, int64_t classes, int64_t features,
                         bool l2, cudaStream_t stream) {
  if (n == 0 || classes == 0) return;
  if (n > 0x7fffffffLL) throw std::invalid_argument("margins_linear: more than 2^31 - 1 rows");
  margins_kernel<T><<<static_cast<unsigned int>(n), kWarps * 32, 0, stream>>>(
      c, r, weight, bias, labels, eps, out, n_points, r_rows, classes, features, l2);
  CURE_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void l2_row_norms_cuda(const T* weight, const T* s2, T* radius, int64_t out_features, int64_t features,
                       cudaStream_t stream) {
  if (out_features == 0) return;
  const int64_t blocks = (out_features + kWarps - 1) / kWarps;
  row_norms_kernel<T><<<static_cast<unsigned int>(blocks), kWarps * 32, 0, stream>>>(weight, s2, radius,
                                                                                      out_features, features);
  CURE_CUDA_CHECK(cudaGetLastError());
}

#define CURE_INSTANTIATE(T)                                                                                    \
  template void margins_linear_cuda<T>(const T*, const T*, const T*, const T*, const int64_t*, const T*, T*, \
                                       int64_t, int64_t, int64_t, int64_t, int64_t, bool, cudaStream_t);      \
  template void l2_row_norms_cuda<T>(const T*, const T*, T*, int64_t, int64_t, cudaStream_t);
CURE_INSTANTIATE(float)
CURE_INSTANTIATE(double)
CURE_INSTANTIATE(__half)
CURE_INSTANTIATE(__nv_bfloat16)
#undef CURE_INSTANTIATE

}  // namespace cure_fast
