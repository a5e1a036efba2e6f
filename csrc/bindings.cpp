// Python bindings of the CUDA kernels: input checks, allocation, launch on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "common.h"

namespace {

// CUDA storage type of a torch scalar type.
template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T> const T* in(const at::Tensor& t) { return static_cast<const T*>(t.const_data_ptr()); }
template <typename T> T* out(at::Tensor& t) { return static_cast<T*>(t.mutable_data_ptr()); }

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& c) {
  TORCH_CHECK(t.device() == c.device(), op, ": ", name, " must be on c's device ", c.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == c.scalar_type(), op, ": ", name, " must have c's dtype ", c.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
}

// c (N, *) and r (M, *) with M <= N: r holds the radii of the last M rows of c.
void check_interval(const char* op, const at::Tensor& c, const at::Tensor& r) {
  TORCH_CHECK(c.is_cuda(), op, ": c must be a CUDA tensor, got device ", c.device());
  const auto dtype = c.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(c.is_contiguous(), op, ": c must be contiguous (call .contiguous())");
  check_like(op, "r", r, c);
  TORCH_CHECK(c.dim() >= 1 && r.dim() == c.dim(), op, ": c (N, *) and r (M, *) must have the same number (>= 1) "
              "of dimensions, got c ", c.sizes(), " and r ", r.sizes());
  TORCH_CHECK(r.sizes().slice(1) == c.sizes().slice(1), op, ": trailing shapes of c and r must match, got c ",
              c.sizes(), " and r ", r.sizes());
  TORCH_CHECK(r.size(0) <= c.size(0), op, ": r must have at most as many rows as c, got c ", c.sizes(), " and r ",
              r.sizes());
}

std::tuple<at::Tensor, at::Tensor> interval_relu_forward(const at::Tensor& c, const at::Tensor& r) {
  check_interval("interval_relu_forward", c, r);
  const c10::cuda::CUDAGuard guard(c.device());
  auto c_out = at::empty_like(c);
  auto r_out = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "interval_relu_forward", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::interval_relu_forward_cuda<T>(in<T>(c), in<T>(r), out<T>(c_out), out<T>(r_out), c.numel(),
                                             c.numel() - r.numel(), c10::cuda::getCurrentCUDAStream());
  });
  return {c_out, r_out};
}

std::tuple<at::Tensor, at::Tensor> interval_relu_backward(const at::Tensor& c, const at::Tensor& r,
                                                          const at::Tensor& grad_c_out,
                                                          const at::Tensor& grad_r_out) {
  const char* op = "interval_relu_backward";
  check_interval(op, c, r);
  check_like(op, "grad_c_out", grad_c_out, c);
  check_like(op, "grad_r_out", grad_r_out, c);
  TORCH_CHECK(grad_c_out.sizes() == c.sizes(), op, ": grad_c_out must have c's shape ", c.sizes(), ", got ",
              grad_c_out.sizes());
  TORCH_CHECK(grad_r_out.sizes() == r.sizes(), op, ": grad_r_out must have r's shape ", r.sizes(), ", got ",
              grad_r_out.sizes());
  const c10::cuda::CUDAGuard guard(c.device());
  auto grad_c = at::empty_like(c);
  auto grad_r = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "interval_relu_backward", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::interval_relu_backward_cuda<T>(in<T>(c), in<T>(r), in<T>(grad_c_out), in<T>(grad_r_out),
                                              out<T>(grad_c), out<T>(grad_r), c.numel(), c.numel() - r.numel(),
                                              c10::cuda::getCurrentCUDAStream());
  });
  return {grad_c, grad_r};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cure_fast CUDA kernels";
  m.def("interval_relu_forward", &interval_relu_forward, "Interval ReLU: (c (N, *), r (M, *)) -> (c_out, r_out)",
        py::arg("c"), py::arg("r"));
  m.def("interval_relu_backward", &interval_relu_backward,
        "Gradients of interval_relu_forward: (c, r, grad_c_out, grad_r_out) -> (grad_c, grad_r)", py::arg("c"),
        py::arg("r"), py::arg("grad_c_out"), py::arg("grad_r_out"));
}
