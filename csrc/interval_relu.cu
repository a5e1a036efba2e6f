// Interval ReLU on centre-radius intervals; the first n_points elements of c are points.
#include "common.h"

namespace cure_fast {
namespace {

template <typename T>
__global__ void interval_relu_forward_kernel(const T* __restrict__ c, const T* __restrict__ r,
                                             T* __restrict__ c_out, T* __restrict__ r_out,
                                             int64_t n, int64_t n_points) {
  using A = typename Acc<T>::type;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A ci = load(c + i);
    if (i < n_points) {
      store(c_out + i, relu(ci));
      continue;
    }
    const int64_t j = i - n_points;
    const A ri = load(r + j);
    const A l = relu(ci - ri), u = relu(ci + ri);
    store(c_out + i, (u + l) / A(2));
    store(r_out + j, (u - l) / A(2));
  }
}

template <typename T>
__global__ void interval_relu_backward_kernel(const T* __restrict__ c, const T* __restrict__ r,
                                              const T* __restrict__ grad_c_out,
                                              const T* __restrict__ grad_r_out,
                                              T* __restrict__ grad_c, T* __restrict__ grad_r,
                                              int64_t n, int64_t n_points) {
  using A = typename Acc<T>::type;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A ci = load(c + i), gc = load(grad_c_out + i);
    if (i < n_points) {
      store(grad_c + i, ci > A(0) ? gc : A(0));
      continue;
    }
    const int64_t j = i - n_points;
    const A ri = load(r + j), gr = load(grad_r_out + j);
    const A gl = ci - ri > A(0) ? (gc - gr) / A(2) : A(0);
    const A gu = ci + ri > A(0) ? (gc + gr) / A(2) : A(0);
    store(grad_c + i, gl + gu);
    store(grad_r + j, gu - gl);
  }
}

}  // namespace

template <typename T>
void interval_relu_forward_cuda(const T* c, const T* r, T* c_out, T* r_out, int64_t n,
                                int64_t n_points, cudaStream_t stream) {
  if (n == 0) return;
  interval_relu_forward_kernel<T><<<grid_size(n), kThreads, 0, stream>>>(c, r, c_out, r_out, n, n_points);
  CURE_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void interval_relu_backward_cuda(const T* c, const T* r, const T* grad_c_out, const T* grad_r_out,
                                 T* grad_c, T* grad_r, int64_t n, int64_t n_points,
                                 cudaStream_t stream) {
  if (n == 0) return;
  interval_relu_backward_kernel<T><<<grid_size(n), kThreads, 0, stream>>>(
      c, r, grad_c_out, grad_r_out, grad_c, grad_r, n, n_points);
  CURE_CUDA_CHECK(cudaGetLastError());
}

#define CURE_INSTANTIATE(T)                                                                   \
  template void interval_relu_forward_cuda<T>(const T*, const T*, T*, T*, int64_t, int64_t, \
                                              cudaStream_t);                                \
  template void interval_relu_backward_cuda<T>(const T*, const T*, const T*, const T*, T*,  \
                                               T*, int64_t, int64_t, cudaStream_t);
CURE_INSTANTIATE(float)
CURE_INSTANTIATE(double)
CURE_INSTANTIATE(__half)
CURE_INSTANTIATE(__nv_bfloat16)
#undef CURE_INSTANTIATE

}  // namespace cure_fast
