// Interval conv2d as an implicit GEMM (groups == 1) and the l2 first conv layer (csrc/interval_conv.cu)
// as CUDA kernels of the cure_fast_C operators.
#include "glue.h"

namespace {

using namespace cure_fast::glue;

// The implicit GEMM decomposes pixel and tap indices in 32 bits.
constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max();

std::array<int64_t, 2> conv_pair(const char* op, const char* name, at::IntArrayRef v, int64_t lo) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have two values (height, width), got ", v);
  TORCH_CHECK(v[0] >= lo && v[1] >= lo, op, ": ", name, " must be >= ", lo, ", got ", v);
  return {v[0], v[1]};
}

// A 4-d tensor on c's device with c's dtype, contiguous.
void check_4d(const char* op, const char* name, const at::Tensor& t, const at::Tensor& c) {
  check_like(op, name, t, c);
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-d, got ", t.sizes());
}

// The geometry of a groups == 1 convolution of (batch, C, height, width) inputs with `weight`
// (O, C, KH, KW); checks that the kernel fits the padded input and that every GEMM index fits.
cure_fast::ConvGeometry conv_geometry(const char* op, int64_t batch, int64_t height, int64_t width,
                                      const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation) {
  const auto s = conv_pair(op, "stride", stride, 1), p = conv_pair(op, "padding", padding, 0);
  const auto d = conv_pair(op, "dilation", dilation, 1);
  cure_fast::ConvGeometry g;
  g.batch = batch, g.channels = weight.size(1), g.height = height, g.width = width;
  g.out_channels = weight.size(0), g.kernel_h = weight.size(2), g.kernel_w = weight.size(3);
  g.stride_h = s[0], g.stride_w = s[1], g.pad_h = p[0], g.pad_w = p[1], g.dil_h = d[0], g.dil_w = d[1];
  TORCH_CHECK(height >= 1 && width >= 1 && g.channels >= 1 && g.kernel_h >= 1 && g.kernel_w >= 1, op,
              ": empty image or kernel: input ", height, "x", width, ", weight ", weight.sizes());
  TORCH_CHECK(s[0] < kMaxIndex && s[1] < kMaxIndex && height + 2 * p[0] < kMaxIndex && width + 2 * p[1] < kMaxIndex &&
                  d[0] < kMaxIndex / g.kernel_h && d[1] < kMaxIndex / g.kernel_w,
              op, ": stride, padding or dilation too large");
  const int64_t span_h = d[0] * (g.kernel_h - 1), span_w = d[1] * (g.kernel_w - 1);
  TORCH_CHECK(height + 2 * p[0] > span_h && width + 2 * p[1] > span_w, op, ": the kernel (span ", span_h + 1, "x",
              span_w + 1, ") does not fit the padded input (", height, "x", width, ", padding ", padding, ")");
  g.out_height = (height + 2 * p[0] - span_h - 1) / s[0] + 1;
  g.out_width = (width + 2 * p[1] - span_w - 1) / s[1] + 1;
  const int64_t pixels = std::max(height * width, g.out_height * g.out_width);
  TORCH_CHECK(batch <= kMaxIndex / pixels && g.channels * g.kernel_h * g.kernel_w <= kMaxIndex &&
                  g.out_channels * g.kernel_h * g.kernel_w <= kMaxIndex,
              op, ": more than 2^31 - 1 pixels or taps for the implicit GEMM (use the cuDNN method)");
  return g;
}

// c (N, C, H, W), r (M, C, H, W) with M <= N, weight (O, C, KH, KW).
void check_conv(const char* op, const at::Tensor& c, const at::Tensor& r, const at::Tensor& weight) {
  check_interval(op, c, r);
  TORCH_CHECK(c.dim() == 4, op, ": c must be 4-d (N, C, H, W), got ", c.sizes());
  check_4d(op, "weight", weight, c);
  TORCH_CHECK(weight.size(1) == c.size(1), op, ": weight must have shape (out, ", c.size(1),
              ", kh, kw) (groups == 1), got ", weight.sizes());
}

// conv(c, W) + bias and conv(r, |W|) as one implicit GEMM, then * scale + shift (r: * |scale|)
// and the interval ReLU when relu; with save_pre also the two convolutions (before the bias) for
// the backward, else empty tensors. c (N, C, H, W), r (M, C, H, W) the radii of the last M samples
// -> (N, O, P, Q), (M, O, P, Q), pre...
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> interval_conv2d_forward(
    const at::Tensor& c, const at::Tensor& r, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool relu, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::string_view precision, bool save_pre) {
  const char* op = "interval_conv2d_forward";
  check_conv(op, c, r, weight);
  const auto g = conv_geometry(op, c.size(0), c.size(2), c.size(3), weight, stride, padding, dilation);
  const int64_t n = c.size(0), m = r.size(0), o = g.out_channels;
  check_vector(op, "bias", bias, c, o);
  check_vector(op, "scale", scale, c, o);
  check_vector(op, "shift", shift, c, o);
  const c10::cuda::CUDAGuard guard(c.device());
  const auto out_sizes = [&](int64_t rows) { return std::vector<int64_t>{rows, o, g.out_height, g.out_width}; };
  auto c_out = new_output(out_sizes(n), c.options());
  auto r_out = new_output(out_sizes(m), c.options());
  auto pre_c = save_pre ? new_output(out_sizes(n), c.options()) : at::empty({0}, c.options());
  auto pre_r = save_pre ? new_output(out_sizes(m), c.options()) : at::empty({0}, c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "interval_conv2d_forward", [&] {
    using T = typename CudaType<scalar_t>::type;
    run_gemm(op, c.scalar_type(), precision, [&](cure_fast::MathMode mode, cudaStream_t s) {
      cure_fast::interval_conv2d_forward_cuda<T>(g, m, in<T>(c), in<T>(r), in<T>(weight), in_opt<T>(bias),
                                                 in_opt<T>(scale), in_opt<T>(shift), relu, out<T>(c_out),
                                                 out<T>(r_out), save_pre ? out<T>(pre_c) : nullptr,
                                                 save_pre ? out<T>(pre_r) : nullptr, mode, s);
    });
  });
  return {c_out, r_out, pre_c, pre_r};
}

// (conv_transpose(grad_c, W), conv_transpose(grad_r, |W|)): the input gradients of the two
// convolutions. grad_c (N, O, P, Q), grad_r (M, O, P, Q), weight (O, C, KH, KW), input_size (H, W)
// -> (N, C, H, W), (M, C, H, W).
std::tuple<at::Tensor, at::Tensor> interval_conv2d_grad_input(const at::Tensor& grad_c, const at::Tensor& grad_r,
                                                              const at::Tensor& weight, at::IntArrayRef input_size,
                                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                                              at::IntArrayRef dilation, std::string_view precision) {
  const char* op = "interval_conv2d_grad_input";
  check_interval(op, grad_c, grad_r);
  TORCH_CHECK(grad_c.dim() == 4, op, ": grad_c must be 4-d (N, O, P, Q), got ", grad_c.sizes());
  check_4d(op, "weight", weight, grad_c);
  TORCH_CHECK(weight.size(0) == grad_c.size(1), op, ": weight must have shape (", grad_c.size(1),
              ", in, kh, kw), got ", weight.sizes());
  const auto hw = conv_pair(op, "input_size", input_size, 1);
  const auto g = conv_geometry(op, grad_c.size(0), hw[0], hw[1], weight, stride, padding, dilation);
  TORCH_CHECK(grad_c.size(2) == g.out_height && grad_c.size(3) == g.out_width, op, ": grad_c must have ",
              g.out_height, "x", g.out_width, " pixels for input size ", input_size, ", got ", grad_c.sizes());
  const int64_t n = grad_c.size(0), m = grad_r.size(0);
  const c10::cuda::CUDAGuard guard(grad_c.device());
  auto d_c = new_output({n, g.channels, g.height, g.width}, grad_c.options());
  auto d_r = new_output({m, g.channels, g.height, g.width}, grad_c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_c.scalar_type(), "interval_conv2d_grad_input", [&] {
    using T = typename CudaType<scalar_t>::type;
    run_gemm(op, grad_c.scalar_type(), precision, [&](cure_fast::MathMode mode, cudaStream_t s) {
      cure_fast::interval_conv2d_grad_input_cuda<T>(g, m, in<T>(grad_c), in<T>(grad_r), in<T>(weight), out<T>(d_c),
                                                    out<T>(d_r), mode, s);
    });
  });
  return {d_c, d_r};
}

// The weight gradient sum_n grad_c ⋆ c + sign(W) ⊙ sum_n grad_r ⋆ r in one split-K GEMM (and a
// reduction over the splits). grad_c (N, O, P, Q), grad_r (M, O, P, Q), c (N, C, H, W),
// r (M, C, H, W), weight (O, C, KH, KW) -> (O, C, KH, KW).
at::Tensor interval_conv2d_grad_weight(const at::Tensor& grad_c, const at::Tensor& grad_r, const at::Tensor& c,
                                       const at::Tensor& r, const at::Tensor& weight, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                       std::string_view precision) {
  const char* op = "interval_conv2d_grad_weight";
  check_conv(op, c, r, weight);
  const auto g = conv_geometry(op, c.size(0), c.size(2), c.size(3), weight, stride, padding, dilation);
  check_like(op, "grad_c", grad_c, c);
  check_like(op, "grad_r", grad_r, c);
  const int64_t n = c.size(0), m = r.size(0);
  check_shape(op, "grad_c", grad_c, {n, g.out_channels, g.out_height, g.out_width});
  check_shape(op, "grad_r", grad_r, {m, g.out_channels, g.out_height, g.out_width});
  const c10::cuda::CUDAGuard guard(c.device());
  auto d_w = new_output(weight.sizes(), c.options());
  const int sms = sm_count();
  const int64_t splits = cure_fast::conv_grad_weight_splits(g, sms);
  const auto acc = c.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto workspace = at::empty({splits > 1 ? splits * weight.numel() : 0}, c.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "interval_conv2d_grad_weight", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    run_gemm(op, c.scalar_type(), precision, [&](cure_fast::MathMode mode, cudaStream_t s) {
      cure_fast::interval_conv2d_grad_weight_cuda<T, A>(g, m, in<T>(grad_c), in<T>(grad_r), in<T>(c), in<T>(r),
                                                        in<T>(weight), out<T>(d_w),
                                                        static_cast<A*>(workspace.mutable_data_ptr()), sms, mode, s);
    });
  });
  return d_w;
}

// The first conv layer under an l2 ellipsoid {x + s ⊙ u : |u|_2 <= eps}: centre conv(x, W) + bias and
// radius eps * sqrt(conv(s2, W^2)) (exact, padding-aware) in one implicit GEMM. x (N, C, H, W),
// s2 = s^2 (1 or N, C, H, W), eps None or (N,) -> centre (N, O, P, Q), radius (R, O, P, Q) with
// R = N when eps is given, else min(s2 rows, N) (one radius for every sample when s2 is shared).
std::tuple<at::Tensor, at::Tensor> l2_conv2d_forward(const at::Tensor& x, const at::Tensor& s2,
                                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& eps, at::IntArrayRef stride,
                                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                                     std::string_view precision) {
  const char* op = "l2_conv2d_forward";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  check_dtype(op, x);
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous (call .contiguous())");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-d (N, C, H, W), got ", x.sizes());
  const int64_t n = x.size(0);
  check_4d(op, "s2", s2, x);
  TORCH_CHECK(s2.sizes().slice(1) == x.sizes().slice(1) && (s2.size(0) == 1 || s2.size(0) == n), op,
              ": s2 must have shape (1 or ", n, ", ", x.size(1), ", ", x.size(2), ", ", x.size(3), "), got ",
              s2.sizes());
  check_4d(op, "weight", weight, x);
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight must have shape (out, ", x.size(1),
              ", kh, kw) (groups == 1), got ", weight.sizes());
  const auto g = conv_geometry(op, n, x.size(2), x.size(3), weight, stride, padding, dilation);
  check_vector(op, "bias", bias, x, g.out_channels);
  check_vector(op, "eps", eps, x, n);
  const int64_t rows = eps.has_value() ? n : std::min<int64_t>(s2.size(0), n);
  const c10::cuda::CUDAGuard guard(x.device());
  auto centre = new_output({n, g.out_channels, g.out_height, g.out_width}, x.options());
  auto radius = new_output({rows, g.out_channels, g.out_height, g.out_width}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2_conv2d_forward", [&] {
    using T = typename CudaType<scalar_t>::type;
    run_gemm(op, x.scalar_type(), precision, [&](cure_fast::MathMode mode, cudaStream_t s) {
      cure_fast::l2_conv2d_forward_cuda<T>(g, rows, in<T>(x), in<T>(s2), s2.size(0) == 1, in<T>(weight),
                                           in_opt<T>(bias), in_opt<T>(eps), out<T>(centre), out<T>(radius), mode, s);
    });
  });
  return {centre, radius};
}

}  // namespace

TORCH_LIBRARY_IMPL(cure_fast_C, CUDA, m) {
  m.impl("interval_conv2d_forward", &interval_conv2d_forward);
  m.impl("interval_conv2d_grad_input", &interval_conv2d_grad_input);
  m.impl("interval_conv2d_grad_weight", &interval_conv2d_grad_weight);
  m.impl("l2_conv2d_forward", &l2_conv2d_forward);
}
