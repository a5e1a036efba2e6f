// The interval ReLU (csrc/interval_relu.cu) as CUDA kernels of the cure_fast_C operators.
#include "glue.h"

namespace {

using namespace cure_fast::glue;

std::tuple<at::Tensor, at::Tensor> interval_relu_forward(const at::Tensor& c, const at::Tensor& r) {
  check_interval("interval_relu_forward", c, r);
  const c10::cuda::CUDAGuard guard(c.device());
  auto c_out = new_output(c.sizes(), c.options());
  auto r_out = new_output(r.sizes(), r.options());
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
  check_shape(op, "grad_c_out", grad_c_out, c.sizes());
  check_shape(op, "grad_r_out", grad_r_out, r.sizes());
  const c10::cuda::CUDAGuard guard(c.device());
  auto grad_c = new_output(c.sizes(), c.options());
  auto grad_r = new_output(r.sizes(), r.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "interval_relu_backward", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::interval_relu_backward_cuda<T>(in<T>(c), in<T>(r), in<T>(grad_c_out), in<T>(grad_r_out),
                                              out<T>(grad_c), out<T>(grad_r), c.numel(), c.numel() - r.numel(),
                                              c10::cuda::getCurrentCUDAStream());
  });
  return {grad_c, grad_r};
}

}  // namespace

TORCH_LIBRARY_IMPL(cure_fast_C, CUDA, m) {
  m.impl("interval_relu_forward", &interval_relu_forward);
  m.impl("interval_relu_backward", &interval_relu_backward);
}
