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

// Compute type (accumulators, split-K workspaces): float for every storage type except double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// ---------------------------------------------------------------------------------------------
// Device helpers (only seen by nvcc). CURE_HOST_DEVICE marks the ones that the host emulation of
// the GEMM kernels (tests/cuda_host, built with CURE_FAST_HOST_EMULATION defined) also calls on
// the host; the device code is the same with or without it.
#ifdef __CUDACC__
#define CURE_HOST_DEVICE __host__ __device__

// CURE_THREAD_INDEX is the thread's index in its block (threadIdx.x) and CURE_CHECK_ACCESS(p, write)
// nothing, except in the host code of the host emulation build: there they are the thread being
// emulated and a bounds check of the load (store: write) at p, both defined by the test. (Macros
// rather than functions: device code sees the very same expressions, so its code stays the same.)
#ifdef CURE_FAST_HOST_EMULATION
namespace host_emulation {
inline unsigned int thread_x = 0;
void check_access(const void* p, size_t bytes, bool write);
}  // namespace host_emulation
#endif
#if defined(CURE_FAST_HOST_EMULATION) && !defined(__CUDA_ARCH__)
#define CURE_THREAD_INDEX (::cure_fast::host_emulation::thread_x)
#define CURE_CHECK_ACCESS(p, write) ::cure_fast::host_emulation::check_access((p), sizeof(*(p)), (write))
#else
#define CURE_THREAD_INDEX threadIdx.x
#define CURE_CHECK_ACCESS(p, write) ((void)0)
#endif

CURE_HOST_DEVICE __forceinline__ float load(const float* p) { CURE_CHECK_ACCESS(p, false); return *p; }
CURE_HOST_DEVICE __forceinline__ double load(const double* p) { CURE_CHECK_ACCESS(p, false); return *p; }
CURE_HOST_DEVICE __forceinline__ float load(const __half* p) { CURE_CHECK_ACCESS(p, false); return __half2float(*p); }
CURE_HOST_DEVICE __forceinline__ float load(const __nv_bfloat16* p) {
  CURE_CHECK_ACCESS(p, false);
  return __bfloat162float(*p);
}

CURE_HOST_DEVICE __forceinline__ void store(float* p, float v) { CURE_CHECK_ACCESS(p, true); *p = v; }
CURE_HOST_DEVICE __forceinline__ void store(double* p, double v) { CURE_CHECK_ACCESS(p, true); *p = v; }
CURE_HOST_DEVICE __forceinline__ void store(__half* p, float v) { CURE_CHECK_ACCESS(p, true); *p = __float2half_rn(v); }
CURE_HOST_DEVICE __forceinline__ void store(__nv_bfloat16* p, float v) {
  CURE_CHECK_ACCESS(p, true);
  *p = __float2bfloat16_rn(v);
}

// max(x, 0) that keeps NaN, like torch.relu.
template <typename A> CURE_HOST_DEVICE __forceinline__ A relu(A x) { return x < A(0) ? A(0) : x; }
CURE_HOST_DEVICE __forceinline__ float absval(float x) { return fabsf(x); }
CURE_HOST_DEVICE __forceinline__ double absval(double x) { return fabs(x); }
// sign(x) in {-1, 0, 1}, like torch.sgn: the derivative of |x| that autograd uses.
template <typename A> CURE_HOST_DEVICE __forceinline__ A sign(A x) { return A((x > A(0)) - (x < A(0))); }
#endif

// ---------------------------------------------------------------------------------------------
// Launchers, instantiated for float, double, __half and __nv_bfloat16 (T). Rows: c has n rows, r
// has m <= n rows, the radii of the LAST m rows of c; the first n - m rows of c are points.

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

// How the dot products of a GEMM are computed.
enum class MathMode : int {
  kFma = 0,   // CUDA-core FMA in the compute type (IEEE fp32, or fp64 for double)
  kTf32 = 1,  // tensor cores, fp32 inputs rounded to TF32, fp32 accumulation (sm_80+)
  kBf16 = 2,  // tensor cores, inputs rounded to bfloat16, fp32 accumulation (sm_80+)
  kHalf = 3,  // tensor cores, fp16 inputs, fp32 accumulation
};

// One "interval GEMM": two products that share the operand B,
//   acc1[m, n] = sum_{k}         A [m, k] * B[k, n]           for m in [0, M)
//   acc2[m, n] = sum_{k >= k2_lo} A2[m, k] * B2[k, n]          for m in [m2_lo, M)
// with B2 = |B| when b2 is null. Operands are addressed through strides, so that the same kernel
// computes the forward (c W^T, r |W|^T), the input gradient (g W, g_r |W|) and the weight
// gradient (g^T c + sign(W) (g_r^T r)). A2 element (m, k) lives at a2[(m - m2_lo) * sa2_m +
// (k - k2_lo) * sa2_k], B2 element (k, n) at b2[(k - k2_lo) * sb2_k + n * sb2_n].
//
// Epilogue (all pointers optional):
//   interval mode (sign_of == null):
//     pre1[m, n] = acc1, pre2[m - m2_lo, n] = acc2                (kept for the backward)
//     z_c = (acc1 + bias[n]) * scale[n] + shift[n], z_r = acc2 * |scale[n]|
//     relu: z_c, z_r <- interval ReLU (points: relu(z_c))
//     out1[m, n] = z_c (row-major [M, N]), out2[m - m2_lo, n] = z_r (row-major [M - m2_lo, N])
//   weight-gradient mode (sign_of != null, row-major [M, N]):
//     out1[m, n] = acc1 + sign(sign_of[m, n]) * acc2
template <typename T>
struct GemmParams {
  int64_t M = 0, N = 0, K = 0;
  const T* a = nullptr;  int64_t sa_m = 0, sa_k = 0;
  const T* b = nullptr;  int64_t sb_k = 0, sb_n = 0;
  const T* a2 = nullptr; int64_t sa2_m = 0, sa2_k = 0;
  const T* b2 = nullptr; int64_t sb2_k = 0, sb2_n = 0;
  int64_t m2_lo = 0, k2_lo = 0;
  const T* bias = nullptr;
  const T* scale = nullptr;
  const T* shift = nullptr;
  bool relu = false;
  const T* sign_of = nullptr;
  T* out1 = nullptr;
  T* out2 = nullptr;
  T* pre1 = nullptr;
  T* pre2 = nullptr;
};

// Launches the interval GEMM. mode kFma for every T; kTf32 / kBf16 for float; kBf16 for bfloat16;
// kHalf for half (the bindings pick a valid one). Throws std::invalid_argument otherwise. The
// reduction is split over interval_gemm_splits(M, N, K, sm_count) blocks; when that is more than
// one, workspace holds 2 * splits * M * N elements of the compute type.
int64_t interval_gemm_splits(int64_t M, int64_t N, int64_t K, int sm_count);
template <typename T>
void interval_gemm_cuda(const GemmParams<T>& p, typename Acc<T>::type* workspace, int sm_count, MathMode mode,
                        cudaStream_t stream);

// A 2-d convolution over contiguous NCHW tensors: input (batch, channels, height, width), weight
// (out_channels, channels, kernel_h, kernel_w), output (batch, out_channels, out_height, out_width)
// with out_height = (height + 2 pad_h - dil_h (kernel_h - 1) - 1) / stride_h + 1 (likewise the
// width; the bindings check it). groups == 1. Radii (r, grad_r) hold the LAST radius_rows samples.
struct ConvGeometry {
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  int64_t out_channels = 0, out_height = 0, out_width = 0;
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
};

// Interval conv2d forward as one implicit GEMM: acc1 = conv(c, W) over the batch samples of c,
// acc2 = conv(r, |W|) over the last radius_rows samples (r holds their radii), then the epilogue of
// GemmParams (bias, scale, shift, interval ReLU; points: relu) with NCHW outputs out_c
// (batch, O, P, Q), out_r (radius_rows, O, P, Q); pre_c / pre_r (optional) get acc1 / acc2.
template <typename T>
void interval_conv2d_forward_cuda(const ConvGeometry& g, int64_t radius_rows, const T* c, const T* r,
                                  const T* weight, const T* bias, const T* scale, const T* shift, bool relu,
                                  T* out_c, T* out_r, T* pre_c, T* pre_r, MathMode mode, cudaStream_t stream);

// The first conv layer under an l2 ellipsoid, one pass over the weight: centre = conv(x, W) + bias
// (batch samples) and, for the last radius_rows samples j = n - (batch - radius_rows),
// radius[j] = eps[j] * sqrt(conv(s2, W^2)) (eps null: 1). s2 holds the squared scale: one image
// for every sample (s2_shared) or one per sample (then radius_rows == batch).
template <typename T>
void l2_conv2d_forward_cuda(const ConvGeometry& g, int64_t radius_rows, const T* x, const T* s2, bool s2_shared,
                            const T* weight, const T* bias, const T* eps, T* centre, T* radius, MathMode mode,
                            cudaStream_t stream);

// Input gradient of the interval conv2d: d_c = conv_transpose(grad_c, W) (batch samples),
// d_r = conv_transpose(grad_r, |W|) (the last radius_rows samples). grad (_, O, P, Q) -> (_, C, H, W).
template <typename T>
void interval_conv2d_grad_input_cuda(const ConvGeometry& g, int64_t radius_rows, const T* grad_c,
                                     const T* grad_r, const T* weight, T* d_c, T* d_r, MathMode mode,
                                     cudaStream_t stream);

// Weight gradient of the interval conv2d in one GEMM: d_w = sum_n grad_c ⋆ c + sign(W) ⊙ sum_n grad_r ⋆ r.
// The reduction over the batch pixels is split over conv_grad_weight_splits(g, sm_count) blocks in
// z; with more than one split, workspace holds splits * O * C * KH * KW values of the compute type
// (float, double for double) and a second kernel sums them into d_w.
int64_t conv_grad_weight_splits(const ConvGeometry& g, int sm_count);
template <typename T, typename A>
void interval_conv2d_grad_weight_cuda(const ConvGeometry& g, int64_t radius_rows, const T* grad_c, const T* grad_r,
                                      const T* c, const T* r, const T* weight, T* d_w, A* workspace, int sm_count,
                                      MathMode mode, cudaStream_t stream);

// Per-channel epilogue on tensors viewed as (rows, channels, inner), contiguous:
//   z_c = (xc + bias) * scale + shift, z_r = xr * |scale|, then the interval ReLU when relu.
// xc, out_c: n_rows rows; xr, out_r: m_rows <= n_rows rows (the last ones). The inputs may have
// a row stride (xc_row_stride, xr_row_stride >= channels * inner elements, e.g. the two halves of
// a grouped convolution's output); the outputs are contiguous.
template <typename T>
void channel_epilogue_forward_cuda(const T* xc, const T* xr, const T* bias, const T* scale,
                                   const T* shift, bool relu, T* out_c, T* out_r, int64_t n_rows,
                                   int64_t m_rows, int64_t channels, int64_t inner,
                                   int64_t xc_row_stride, int64_t xr_row_stride, cudaStream_t stream);

// Backward of channel_epilogue_forward_cuda: writes grad_xc, grad_xr (shapes of xc, xr) and the
// per-channel partial sums partial[chunk, 0, ch] = sum g_zc, partial[chunk, 1, ch] =
// sum (g_zc * (xc + bias) + g_zr * xr * sign(scale)) over the chunk's rows, g_z being the
// gradient at z (before the ReLU). partial is in the compute type (float, double for double) and
// holds channel_reduce_chunks(...) chunks. xc / xr have the row strides of the forward; the
// gradients are contiguous.
template <typename T, typename A>
void channel_epilogue_backward_cuda(const T* xc, const T* xr, const T* bias, const T* scale,
                                    const T* shift, bool relu, const T* grad_c_out,
                                    const T* grad_r_out, T* grad_xc, T* grad_xr, A* partial,
                                    int64_t n_rows, int64_t m_rows, int64_t channels,
                                    int64_t inner, int64_t xc_row_stride, int64_t xr_row_stride,
                                    cudaStream_t stream);

// Per-channel partial sums of x over the first `rows` rows of x (rows, channels, inner):
// partial[chunk, 0, ch] = sum x, partial[chunk, 1, ch] = sum (x - mean[ch])^2 when mean is
// given, else sum x^2. The bindings finish the sums over chunks.
template <typename T, typename A>
void channel_moments_cuda(const T* x, const A* mean, A* partial, int64_t rows, int64_t channels,
                          int64_t inner, cudaStream_t stream);

// Chunks (grid rows) of the channel reductions above, for the partial-sum buffer size.
int64_t channel_reduce_chunks(int64_t rows, int64_t channels, int64_t inner);

// Margins of a last linear layer with the specification e_y - e_j folded in, for row n:
//   out[n, j] = (W_y - W_j) . c[n] + b_y - b_j - eps_n * f(spread[n, j]),
//   spread = sum_i |W_y,i - W_j,i| r[n - n_points, i]            (l2 == false, f = identity)
//   spread = sum_i (W_y,i - W_j,i)^2 r[(n - n_points) or 0, i]    (l2 == true, f = sqrt)
// rows n < n_points have no spread. In l2 mode r holds the squared scale, with r_rows == 1 (one
// row for every sample) or r_rows == n; eps is null (1), or one value per row of c.
// c (n, F), r (r_rows, F), weight (K, F), labels (n,) int64 -> out (n, K).
template <typename T>
void margins_linear_cuda(const T* c, const T* r, const T* weight, const T* bias,
                         const int64_t* labels, const T* eps, T* out, int64_t n, int64_t n_points,
                         int64_t r_rows, int64_t classes, int64_t features, bool l2,
                         cudaStream_t stream);

// Row norms of the first linear layer under an l2 ellipsoid: radius[o] = sqrt(sum_i W[o,i]^2 s2[i])
// (s2 null: ones). weight (O, F) -> radius (O).
template <typename T>
void l2_row_norms_cuda(const T* weight, const T* s2, T* radius, int64_t out_features,
                       int64_t features, cudaStream_t stream);

}  // namespace cure_fast
