// Python bindings of the CUDA kernels: input checks, allocation, launch on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <limits>
#include <type_traits>

#include "common.h"

namespace {

// CUDA storage type of a torch scalar type.
template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T> const T* in(const at::Tensor& t) { return static_cast<const T*>(t.const_data_ptr()); }
template <typename T> const T* in_opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? in<T>(*t) : nullptr;
}
template <typename T> T* out(at::Tensor& t) { return static_cast<T*>(t.mutable_data_ptr()); }

// Test hook: when set, every output starts as NaN, so that an element a kernel fails to write shows up.
bool g_poison = false;

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (g_poison) return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(sizes, options);
}

void check_dtype(const char* op, const at::Tensor& c) {
  const auto dtype = c.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float64, float16 or bfloat16, got ", dtype);
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& c) {
  TORCH_CHECK(t.device() == c.device(), op, ": ", name, " must be on c's device ", c.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == c.scalar_type(), op, ": ", name, " must have c's dtype ", c.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
}

// An optional per-feature vector: contiguous, c's dtype and device, shape (features,).
void check_vector(const char* op, const char* name, const c10::optional<at::Tensor>& t, const at::Tensor& c,
                  int64_t features) {
  if (!t.has_value()) return;
  check_like(op, name, *t, c);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == features, op, ": ", name, " must have shape (", features, "), got ",
              t->sizes());
}

// c (N, *) and r (M, *) with M <= N: r holds the radii of the last M rows of c.
void check_interval(const char* op, const at::Tensor& c, const at::Tensor& r) {
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

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// ---------------------------------------------------------------------------------------------
// Interval ReLU

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

// ---------------------------------------------------------------------------------------------
// Interval linear (the interval GEMM)

// The math mode for `precision` on `dtype` inputs: fp64 and "ieee" fp32 on CUDA cores; "tf32" /
// "bf16" fp32 on tensor cores; fp16 / bf16 inputs on tensor cores in their own type (their
// products are exact in fp32). Tensor cores need sm_80+; below that the FMA kernel runs.
cure_fast::MathMode math_mode(const char* op, at::ScalarType dtype, const std::string& precision) {
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

void run_gemm(const char* op, at::ScalarType dtype, const std::string& precision,
              const std::function<void(cure_fast::MathMode, cudaStream_t)>& launch) {
  const auto mode = math_mode(op, dtype, precision);
  try {
    launch(mode, c10::cuda::getCurrentCUDAStream());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

int sm_count() {
  int count = 0;
  CURE_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

// The interval GEMM p on the current stream, with the workspace of its split-K pieces (if it splits).
template <typename T>
void run_interval_gemm(const char* op, const at::Tensor& like, const std::string& precision,
                       const cure_fast::GemmParams<T>& p) {
  using A = typename cure_fast::Acc<T>::type;
  const int sms = sm_count();
  const int64_t splits = cure_fast::interval_gemm_splits(p.M, p.N, p.K, sms);
  const auto acc = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  auto workspace = at::empty({splits > 1 ? 2 * splits * p.M * p.N : 0}, like.options().dtype(acc));
  run_gemm(op, like.scalar_type(), precision, [&](cure_fast::MathMode mode, cudaStream_t s) {
    cure_fast::interval_gemm_cuda<T>(p, static_cast<A*>(workspace.mutable_data_ptr()), sms, mode, s);
  });
}

void check_linear(const char* op, const at::Tensor& c, const at::Tensor& r, const at::Tensor& weight) {
  check_interval(op, c, r);
  TORCH_CHECK(c.dim() == 2, op, ": c must be 2-d (rows, in_features), got ", c.sizes());
  check_like(op, "weight", weight, c);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == c.size(1), op, ": weight must have shape (out, ", c.size(1),
              "), got ", weight.sizes());
}

// (c W^T + bias) * scale + shift and r |W|^T * |scale|, then the interval ReLU when relu. With
// save_pre, also the accumulators c W^T and r |W|^T (for the backward of the epilogue); else
// empty tensors in their place. c (N, K), r (M, K), weight (O, K) -> (N, O), (M, O), pre...
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> interval_linear_forward(
    const at::Tensor& c, const at::Tensor& r, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, bool relu,
    const std::string& precision, bool save_pre) {
  const char* op = "interval_linear_forward";
  check_linear(op, c, r, weight);
  const int64_t n = c.size(0), m = r.size(0), k = c.size(1), o = weight.size(0);
  check_vector(op, "bias", bias, c, o);
  check_vector(op, "scale", scale, c, o);
  check_vector(op, "shift", shift, c, o);
  const c10::cuda::CUDAGuard guard(c.device());
  auto c_out = new_output({n, o}, c.options());
  auto r_out = new_output({m, o}, c.options());
  auto pre_c = save_pre ? new_output({n, o}, c.options()) : at::empty({0}, c.options());
  auto pre_r = save_pre ? new_output({m, o}, c.options()) : at::empty({0}, c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "interval_linear_forward", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::GemmParams<T> p;
    p.M = n, p.N = o, p.K = k;
    p.a = in<T>(c), p.sa_m = k, p.sa_k = 1;
    p.b = in<T>(weight), p.sb_k = 1, p.sb_n = k;  // B[k][n] = W[n][k]
    if (m > 0) p.a2 = in<T>(r), p.sa2_m = k, p.sa2_k = 1, p.out2 = out<T>(r_out);
    p.m2_lo = n - m;
    p.bias = in_opt<T>(bias), p.scale = in_opt<T>(scale), p.shift = in_opt<T>(shift), p.relu = relu;
    p.out1 = out<T>(c_out);
    if (save_pre) {
      p.pre1 = out<T>(pre_c);
      if (m > 0) p.pre2 = out<T>(pre_r);
    }
    run_interval_gemm<T>(op, c, precision, p);
  });
  return {c_out, r_out, pre_c, pre_r};
}

// Gradients of the inputs of the GEMM: (grad_c W, grad_r |W|). grad_c (N, O), grad_r (M, O),
// weight (O, K) -> (N, K), (M, K).
std::tuple<at::Tensor, at::Tensor> interval_linear_grad_input(const at::Tensor& grad_c, const at::Tensor& grad_r,
                                                              const at::Tensor& weight, const std::string& precision) {
  const char* op = "interval_linear_grad_input";
  check_interval(op, grad_c, grad_r);
  TORCH_CHECK(grad_c.dim() == 2, op, ": grad_c must be 2-d (rows, out_features), got ", grad_c.sizes());
  check_like(op, "weight", weight, grad_c);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == grad_c.size(1), op, ": weight must have shape (",
              grad_c.size(1), ", in), got ", weight.sizes());
  const int64_t n = grad_c.size(0), m = grad_r.size(0), o = weight.size(0), k = weight.size(1);
  const c10::cuda::CUDAGuard guard(grad_c.device());
  auto dc = new_output({n, k}, grad_c.options());
  auto dr = new_output({m, k}, grad_c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_c.scalar_type(), "interval_linear_grad_input", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::GemmParams<T> p;
    p.M = n, p.N = k, p.K = o;
    p.a = in<T>(grad_c), p.sa_m = o, p.sa_k = 1;
    p.b = in<T>(weight), p.sb_k = k, p.sb_n = 1;  // B[o][k] = W[o][k]
    if (m > 0) p.a2 = in<T>(grad_r), p.sa2_m = o, p.sa2_k = 1, p.out2 = out<T>(dr);
    p.m2_lo = n - m;
    p.out1 = out<T>(dc);
    run_interval_gemm<T>(op, grad_c, precision, p);
  });
  return {dc, dr};
}

// The weight gradient grad_c^T c + sign(W) ⊙ (grad_r^T r) in one kernel. grad_c (N, O),
// grad_r (M, O), c (N, K), r (M, K), weight (O, K) -> (O, K).
at::Tensor interval_linear_grad_weight(const at::Tensor& grad_c, const at::Tensor& grad_r, const at::Tensor& c,
                                       const at::Tensor& r, const at::Tensor& weight, const std::string& precision) {
  const char* op = "interval_linear_grad_weight";
  check_linear(op, c, r, weight);
  check_like(op, "grad_c", grad_c, c);
  check_like(op, "grad_r", grad_r, c);
  const int64_t n = c.size(0), m = r.size(0), k = c.size(1), o = weight.size(0);
  check_shape(op, "grad_c", grad_c, {n, o});
  check_shape(op, "grad_r", grad_r, {m, o});
  const c10::cuda::CUDAGuard guard(c.device());
  auto dw = new_output({o, k}, c.options());
  if (n == 0) return dw.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "interval_linear_grad_weight", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::GemmParams<T> p;
    p.M = o, p.N = k, p.K = n;                         // reduction over the rows
    p.a = in<T>(grad_c), p.sa_m = 1, p.sa_k = o;       // A[o][i] = grad_c[i][o]
    p.b = in<T>(c), p.sb_k = k, p.sb_n = 1;            // B[i][k] = c[i][k]
    if (m > 0) {
      p.a2 = in<T>(grad_r), p.sa2_m = 1, p.sa2_k = o;  // A2[o][i] = grad_r[i - (n - m)][o]
      p.b2 = in<T>(r), p.sb2_k = k, p.sb2_n = 1;       // B2[i][k] = r[i - (n - m)][k]
    }
    p.k2_lo = n - m;
    p.sign_of = in<T>(weight);
    p.out1 = out<T>(dw);
    run_interval_gemm<T>(op, c, precision, p);
  });
  return dw;
}

// ---------------------------------------------------------------------------------------------
// Interval conv2d as an implicit GEMM (groups == 1) and the l2 first conv layer

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
    const at::Tensor& c, const at::Tensor& r, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, bool relu, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, const std::string& precision, bool save_pre) {
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
                                                              at::IntArrayRef dilation, const std::string& precision) {
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
                                       const std::string& precision) {
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
                                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                     const c10::optional<at::Tensor>& eps, at::IntArrayRef stride,
                                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                                     const std::string& precision) {
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

// ---------------------------------------------------------------------------------------------
// Per-channel epilogue (bias, scale, shift, interval ReLU) on (rows, channels, *) tensors

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
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                           const c10::optional<at::Tensor>& shift) {
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
                                                            const c10::optional<at::Tensor>& bias,
                                                            const c10::optional<at::Tensor>& scale,
                                                            const c10::optional<at::Tensor>& shift, bool relu) {
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
    const at::Tensor& xc, const at::Tensor& xr, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, bool relu,
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

// ---------------------------------------------------------------------------------------------
// Margins and the l2 first-layer radius

// Interval (l2 == false): c (N, F), r (M, F) radii of the last M rows; eps must be None.
// l2 (l2 == true): c = x (N, F), r = the squared scale (1 or N rows), eps None or (N,).
// weight (K, F), bias (K,) or None, labels (N,) int64 -> (N, K).
at::Tensor margins_linear(const at::Tensor& c, const at::Tensor& r, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                          const c10::optional<at::Tensor>& eps, bool l2) {
  const char* op = "margins_linear";
  TORCH_CHECK(c.is_cuda(), op, ": c must be a CUDA tensor, got device ", c.device());
  check_dtype(op, c);
  TORCH_CHECK(c.is_contiguous(), op, ": c must be contiguous (call .contiguous())");
  TORCH_CHECK(c.dim() == 2, op, ": c must be 2-d (rows, features), got ", c.sizes());
  check_like(op, "r", r, c);
  TORCH_CHECK(r.dim() == 2 && r.size(1) == c.size(1), op, ": r must have shape (rows, ", c.size(1), "), got ",
              r.sizes());
  const int64_t n = c.size(0), features = c.size(1);
  if (l2) {
    TORCH_CHECK(r.size(0) == 1 || r.size(0) == n, op, ": the squared scale must have 1 or ", n, " rows, got ",
                r.size(0));
  } else {
    TORCH_CHECK(r.size(0) <= n, op, ": r must have at most as many rows as c, got ", r.size(0), " > ", n);
    TORCH_CHECK(!eps.has_value(), op, ": eps is for l2 margins only");
  }
  check_like(op, "weight", weight, c);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == features, op, ": weight must have shape (classes, ", features,
              "), got ", weight.sizes());
  const int64_t classes = weight.size(0);
  check_vector(op, "bias", bias, c, classes);
  check_vector(op, "eps", eps, c, n);
  TORCH_CHECK(labels.device() == c.device() && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.dim() == 1 && labels.size(0) == n,
              op, ": labels must be a contiguous int64 tensor of shape (", n, ") on c's device, got ",
              labels.scalar_type(), " ", labels.sizes(), " on ", labels.device());
  const c10::cuda::CUDAGuard guard(c.device());
  auto margins = new_output({n, classes}, c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "margins_linear", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::margins_linear_cuda<T>(in<T>(c), r.size(0) ? in<T>(r) : nullptr, in<T>(weight), in_opt<T>(bias),
                                      labels.const_data_ptr<int64_t>(), in_opt<T>(eps), out<T>(margins), n,
                                      l2 ? 0 : n - r.size(0), r.size(0), classes, features, l2,
                                      c10::cuda::getCurrentCUDAStream());
  });
  return margins;
}

// radius[o] = sqrt(sum_i W[o, i]^2 s2[i]); weight (O, F), s2 (F,) or None -> (O,).
at::Tensor l2_row_norms(const at::Tensor& weight, const c10::optional<at::Tensor>& s2) {
  const char* op = "l2_row_norms";
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor, got device ", weight.device());
  check_dtype(op, weight);
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2, op, ": weight must be contiguous and 2-d, got ",
              weight.sizes());
  check_vector(op, "s2", s2, weight, weight.size(1));
  const c10::cuda::CUDAGuard guard(weight.device());
  auto radius = new_output({weight.size(0)}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "l2_row_norms", [&] {
    using T = typename CudaType<scalar_t>::type;
    cure_fast::l2_row_norms_cuda<T>(in<T>(weight), in_opt<T>(s2), out<T>(radius), weight.size(0), weight.size(1),
                                    c10::cuda::getCurrentCUDAStream());
  });
  return radius;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cure_fast CUDA kernels";
  m.def("interval_relu_forward", &interval_relu_forward, "Interval ReLU: (c (N, *), r (M, *)) -> (c_out, r_out)",
        py::arg("c"), py::arg("r"));
  m.def("interval_relu_backward", &interval_relu_backward,
        "Gradients of interval_relu_forward: (c, r, grad_c_out, grad_r_out) -> (grad_c, grad_r)", py::arg("c"),
        py::arg("r"), py::arg("grad_c_out"), py::arg("grad_r_out"));
  m.def("interval_linear_forward", &interval_linear_forward,
        "Fused interval linear: ((c W^T + bias) * scale + shift, r |W|^T * |scale|), interval ReLU if relu; "
        "-> (c_out, r_out, pre_c, pre_r)",
        py::arg("c"), py::arg("r"), py::arg("weight"), py::arg("bias"), py::arg("scale"), py::arg("shift"),
        py::arg("relu"), py::arg("precision"), py::arg("save_pre"));
  m.def("interval_linear_grad_input", &interval_linear_grad_input,
        "(grad_c W, grad_r |W|): (grad_c (N, O), grad_r (M, O), weight (O, K), precision)", py::arg("grad_c"),
        py::arg("grad_r"), py::arg("weight"), py::arg("precision"));
  m.def("interval_linear_grad_weight", &interval_linear_grad_weight,
        "grad_c^T c + sign(W) * (grad_r^T r) in one kernel", py::arg("grad_c"), py::arg("grad_r"), py::arg("c"),
        py::arg("r"), py::arg("weight"), py::arg("precision"));
  m.def("interval_conv2d_forward", &interval_conv2d_forward,
        "Interval conv2d as one implicit GEMM: ((conv(c, W) + bias) * scale + shift, conv(r, |W|) * |scale|), "
        "interval ReLU if relu; -> (c_out, r_out, pre_c, pre_r)",
        py::arg("c"), py::arg("r"), py::arg("weight"), py::arg("bias"), py::arg("scale"), py::arg("shift"),
        py::arg("relu"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("precision"),
        py::arg("save_pre"));
  m.def("interval_conv2d_grad_input", &interval_conv2d_grad_input,
        "(conv_transpose(grad_c, W), conv_transpose(grad_r, |W|)) as one implicit GEMM", py::arg("grad_c"),
        py::arg("grad_r"), py::arg("weight"), py::arg("input_size"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("precision"));
  m.def("interval_conv2d_grad_weight", &interval_conv2d_grad_weight,
        "sum_n grad_c * c + sign(W) * sum_n grad_r * r as one split-K implicit GEMM", py::arg("grad_c"),
        py::arg("grad_r"), py::arg("c"), py::arg("r"), py::arg("weight"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("precision"));
  m.def("l2_conv2d_forward", &l2_conv2d_forward,
        "First conv layer under an l2 ellipsoid: (conv(x, W) + bias, eps * sqrt(conv(s2, W^2))) in one pass",
        py::arg("x"), py::arg("s2"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("precision"));
  m.def("channel_epilogue_forward", &channel_epilogue_forward,
        "Per-channel (x + bias) * scale + shift, r * |scale|, interval ReLU if relu, on (N, C, *) tensors",
        py::arg("xc"), py::arg("xr"), py::arg("bias"), py::arg("scale"), py::arg("shift"), py::arg("relu"));
  m.def("channel_epilogue_backward", &channel_epilogue_backward,
        "Backward of channel_epilogue_forward -> (grad_xc, grad_xr, sums (2, C))", py::arg("xc"), py::arg("xr"),
        py::arg("bias"), py::arg("scale"), py::arg("shift"), py::arg("relu"), py::arg("grad_c_out"),
        py::arg("grad_r_out"));
  m.def("channel_moments", &channel_moments, "Per-channel mean and biased variance of the first rows of x",
        py::arg("x"), py::arg("rows"));
  m.def("margins_linear", &margins_linear, "Margins z_y - z_j of a last linear layer (interval or l2 input)",
        py::arg("c"), py::arg("r"), py::arg("weight"), py::arg("bias"), py::arg("labels"), py::arg("eps"),
        py::arg("l2"));
  m.def("l2_row_norms", &l2_row_norms, "sqrt(sum_i W[o, i]^2 s2[i]) per output row", py::arg("weight"),
        py::arg("s2"));
  m.def("set_poison", [](bool on) { g_poison = on; }, "Test hook: outputs start as NaN when on", py::arg("on"));
}
