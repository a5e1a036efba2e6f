// The per-channel epilogue (bias, scale, shift, interval ReLU) on (rows, channels, *) tensors and
// the per-channel moments (csrc/channel.cu) as CUDA kernels of the cure_fast_C operators.
#include "glue.h"

namespace {

using namespace cure_fast::glue;

// Rows of t are contiguous blocks (every dimension but the first is packed); returns the row stride.
int64_t row_stride(const char* op, const char* name, const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) == expected, op, ": ", name,
                " must be contiguous within each row (dims 1..), got strides ", t.strides(), " for shape ", t.sizes());
    expected *= t.size(d);
  }
  return t.size(0) > 1 ? t.stride(0) : expected;
}

struct ChannelView {
  int64_t n, m, channels, inner, xc_stride, xr_stride;
};

ChannelView check_channels(const char* op, const at::Tensor& xc, const at::Tensor& xr,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(xc.is_cuda(), op, ": xc must be a CUDA tensor, got device ", xc.device());
  check_dtype(op, xc);
  TORCH_CHECK(xr.device() == xc.device() && xr.scalar_type() == xc.scalar_type(), op,
              ": xr must have xc's dtype and device");
  TORCH_CHECK(xc.dim() >= 2 && xr.dim() == xc.dim() && xr.sizes().slice(1) == xc.sizes().slice(1) &&
                  xr.size(0) <= xc.size(0),
              op, ": xc (N, C, *) and xr (M, C, *) need equal trailing shapes and M <= N, got ", xc.sizes(), " and ",
              xr.sizes());
  ChannelView v;
  v.n = xc.size(0), v.m = xr.size(0), v.channels = xc.size(1);
  v.inner = 1;
  for (int64_t d = 2; d < xc.dim(); ++d) v.inner *= xc.size(d);
  v.xc_stride = row_stride(op, "xc", xc);
  v.xr_stride = row_stride(op, "xr", xr);
  check_vector(op, "bias", bias, xc, v.channels);
  check_vector(op, "scale", scale, xc, v.channels);
  check_vector(op, "shift", shift, xc, v.channels);
  return v;
}

std::vector<int64_t> packed_sizes(const at::Tensor& t) { return t.sizes().vec(); }

std::tuple<at::Tensor, at::Tensor> channel_epilogue_forward(const at::Tensor& xc, const at::Tensor& xr,
                                                            const std::optional<at::Tensor>& bias,
                                                            const std::optional<at::Tensor>& scale,
                                                            const std::optional<at::Tensor>& shift, bool relu) {
  const char* op = "channel_epilogue_forward";
  const auto v = check_channels(op, xc, xr, bias, scale, shift);
  const c10::cuda::CUDAGuard guard(xc.device());
  auto c_out = new_output(packed_sizes(xc), xc.options());
  auto r_out = new_output(packed_sizes(xr), xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "channel_epilogue_forward", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::channel_epilogue_forward_cuda<T>(in<T>(xc), in<T>(xr), in_opt<T>(bias), in_opt<T>(scale),
                                                in_opt<T>(shift), relu, out<T>(c_out), out<T>(r_out), v.n, v.m,
                                                v.channels, v.inner, v.xc_stride, v.xr_stride,
                                                c10::cuda::getCurrentCUDAStream());
  });
  return {c_out, r_out};
}

// Returns (grad_xc, grad_xr, sums (2, C)): sums[0] = sum of the gradient at z_c (= the shift's
// gradient), sums[1] = the scale's gradient; the bias gradient is sums[0] * scale (sums[0] without
// a scale). In the compute type cast to the input dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_epilogue_backward(
    const at::Tensor& xc, const at::Tensor& xr, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool relu,
    const at::Tensor& grad_c_out, const at::Tensor& grad_r_out) {
  const char* op = "channel_epilogue_backward";
  const auto v = check_channels(op, xc, xr, bias, scale, shift);
  check_like(op, "grad_c_out", grad_c_out, xc);
  check_like(op, "grad_r_out", grad_r_out, xc);
  check_shape(op, "grad_c_out", grad_c_out, xc.sizes());
  check_shape(op, "grad_r_out", grad_r_out, xr.sizes());
  const c10::cuda::CUDAGuard guard(xc.device());
  auto grad_xc = new_output(packed_sizes(xc), xc.options());
  auto grad_xr = new_output(packed_sizes(xr), xc.options());
  const auto acc = xc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t chunks = cure_fast::channel_reduce_chunks(v.n, v.channels, v.inner);
  auto partial = at::empty({chunks, 2, v.channels}, xc.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "channel_epilogue_backward", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    cure_fast::channel_epilogue_backward_cuda<T, A>(
        in<T>(xc), in<T>(xr), in_opt<T>(bias), in_opt<T>(scale), in_opt<T>(shift), relu, in<T>(grad_c_out),
        in<T>(grad_r_out), out<T>(grad_xc), out<T>(grad_xr), static_cast<A*>(partial.mutable_data_ptr()), v.n, v.m,
        v.channels, v.inner, v.xc_stride, v.xr_stride, c10::cuda::getCurrentCUDAStream());
  });
  return {grad_xc, grad_xr, partial.sum(0).to(xc.scalar_type())};
}

// Per-channel mean and biased variance of the first `rows` rows of x (N, C, *) (the natural
// stream), two-pass, in float32 (float64 for float64) -> (mean (C,), var (C,)).
std::tuple<at::Tensor, at::Tensor> channel_moments(const at::Tensor& x, int64_t rows) {
  const char* op = "channel_moments";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  check_dtype(op, x);
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous (call .contiguous())");
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (N, C, *), got ", x.sizes());
  TORCH_CHECK(rows >= 1 && rows <= x.size(0), op, ": rows must lie in [1, ", x.size(0), "], got ", rows);
  const int64_t channels = x.size(1);
  int64_t inner = 1;
  for (int64_t d = 2; d < x.dim(); ++d) inner *= x.size(d);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t chunks = cure_fast::channel_reduce_chunks(rows, channels, inner);
  auto partial = at::empty({chunks, 2, channels}, x.options().dtype(acc));
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    auto* part = static_cast<A*>(partial.mutable_data_ptr());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const double count = static_cast<double>(rows * inner);
    cure_fast::channel_moments_cuda<T, A>(in<T>(x), nullptr, part, rows, channels, inner, stream);
    mean = partial.select(1, 0).sum(0).div_(count);
    cure_fast::channel_moments_cuda<T, A>(in<T>(x), static_cast<const A*>(mean.const_data_ptr()), part, rows,
                                          channels, inner, stream);
    var = partial.select(1, 1).sum(0).div_(count);
  });
  return {mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(cure_fast_C, CUDA, m) {
  m.impl("channel_epilogue_forward", &channel_epilogue_forward);
  m.impl("channel_epilogue_backward", &channel_epilogue_backward);
  m.impl("channel_moments", &channel_moments);
}
