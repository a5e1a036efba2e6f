// Helpers shared by the kernel files and the bindings; no torch headers here.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define CURE_CUDA_CHECK(expr) ::cure_fast::cuda_check((expr), #expr, __FILE__, __LINE__)

namespace cure_fast {

inline void cuda_check(cudaError_t err, const char* expr, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + expr + ": " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

constexpr int kThreads = 256;
// Blocks in flight for a grid-stride loop: 8192 x 256 threads is several waves on an H100.
constexpr int64_t kMaxBlocks = 8192;

// Blocks for a grid-stride loop over n > 0 elements.
inline unsigned int grid_size(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Launchers, instantiated for float, double, __half and __nv_bfloat16.

// Interval ReLU: c holds n elements, the first n_points of which are points; r holds the radii
// of the remaining n - n_points elements. Writes c_out (n elements) and r_out (n - n_points).
template <typename T>
void interval_relu_forward_cuda(const T* c, const T* r, T* c_out, T* r_out, int64_t n,
                                int64_t n_points, cudaStream_t stream);

// Gradients of interval_relu_forward_cuda: grad_c (n elements) and grad_r (n - n_points).
template <typename T>
void interval_relu_backward_cuda(const T* c, const T* r, const T* grad_c_out, const T* grad_r_out,
                                 T* grad_c, T* grad_r, int64_t n, int64_t n_points,
                                 cudaStream_t stream);

}  // namespace cure_fast
