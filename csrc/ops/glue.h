// Shared by the op files of csrc/ops/: the checks, allocation and launch helpers that turn torch
// tensors into the kernels' raw pointers (the kernel files, csrc/*.cu, include no torch headers).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <functional>
#include <limits>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../common.h"

namespace cure_fast::glue {

// CUDA storage type of a torch scalar type.
template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T> const T* in(const at::Tensor& t) { return static_cast<const T*>(t.const_data_ptr()); }
template <typename T> const T* in_opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? in<T>(*t) : nullptr;
}
template <typename T> T* out(at::Tensor& t) { return static_cast<T*>(t.mutable_data_ptr()); }

// Test hook: when set, every output starts as NaN, so that an element a kernel fails to write shows up.
inline bool g_poison = false;

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (g_poison) return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(sizes, options);
}

inline void check_dtype(const char* op, const at::Tensor& c) {
  const auto dtype = c.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& c) {
  TORCH_CHECK(t.device() == c.device(), op, ": ", name, " must be on c's device ", c.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == c.scalar_type(), op, ": ", name, " must have c's dtype ", c.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
}

// An optional per-feature vector: contiguous, c's dtype and device, shape (features,).
inline void check_vector(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& c,
                         int64_t features) {
  if (!t.has_value()) return;
  check_like(op, name, *t, c);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == features, op, ": ", name, " must have shape (", features, "), got ",
              t->sizes());
}

// c (N, *) and r (M, *) with M <= N: r holds the radii of the last M rows of c.
inline void check_interval(const char* op, const at::Tensor& c, const at::Tensor& r) {
  TORCH_CHECK(c.is_cuda(), op, ": c must be a CUDA tensor, got device ", c.device());
  check_dtype(op, c);
  TORCH_CHECK(c.is_contiguous(), op, ": c must be contiguous (call .contiguous())");
  check_like(op, "r", r, c);
  TORCH_CHECK(c.dim() >= 1 && r.dim() == c.dim(), op, ": c (N, *) and r (M, *) must have the same number (>= 1) "
              "of dimensions, got c ", c.sizes(), " and r ", r.sizes());
  TORCH_CHECK(r.sizes().slice(1) == c.sizes().slice(1), op, ": trailing shapes of c and r must match, got c ",
              c.sizes(), " and r ", r.sizes());
  TORCH_CHECK(r.size(0) <= c.size(0), op, ": r must have at most as many rows as c, got c ", c.sizes(), " and r ",
              r.sizes());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// ---------------------------------------------------------------------------------------------
// The dot-product precision of the GEMM kernels

// The math mode for `precision` on `dtype` inputs: fp64 and "ieee" fp32 on CUDA cores; "tf32" /
// "bf16" fp32 on tensor cores; fp16 / bf16 inputs on tensor cores in their own type (their
// products are exact in fp32). Tensor cores need sm_80+; below that the FMA kernel runs.
inline cure_fast::MathMode math_mode(const char* op, at::ScalarType dtype, std::string_view precision) {
  TORCH_CHECK(precision == "ieee" || precision == "tf32" || precision == "bf16", op,
              ": precision must be 'ieee', 'tf32' or 'bf16', got '", precision, "'");
  int major = 0;
  CURE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c10::cuda::current_device()));
  if (dtype == at::kDouble || major < 8) return cure_fast::MathMode::kFma;
  if (dtype == at::kHalf) return cure_fast::MathMode::kHalf;
  if (dtype == at::kBFloat16) return cure_fast::MathMode::kBf16;
  if (precision == "tf32") return cure_fast::MathMode::kTf32;
  if (precision == "bf16") return cure_fast::MathMode::kBf16;
  return cure_fast::MathMode::kFma;
}

inline void run_gemm(const char* op, at::ScalarType dtype, std::string_view precision,
                     const std::function<void(cure_fast::MathMode, cudaStream_t)>& launch) {
  const auto mode = math_mode(op, dtype, precision);
  try {
    launch(mode, c10::cuda::getCurrentCUDAStream());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

inline int sm_count() {
  int count = 0;
  CURE_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

}  // namespace cure_fast::glue
