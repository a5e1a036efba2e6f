// Interval conv2d as an implicit GEMM on the main loops of interval_gemm.cuh: the forward with its
// fused epilogue, the l2 first layer, and the input and weight gradients. Tensors are contiguous
// NCHW: input (N, C, H, W), weight (O, C, KH, KW), output (N, O, P, Q). Radii (r, grad_r) hold the
// LAST R samples: sample n >= n_lo = N - R sits at row n - n_lo; the first n_lo samples are points.
//
// Index maps (sh, ph, dh: stride, padding, dilation along the height; likewise sw, pw, dw):
//   forward  rows m = (n, p, q) over N*P*Q, columns o, reduction k = (ci, kh, kw) over C*KH*KW:
//            A[m, k] = c[n, ci, p*sh - ph + kh*dh, q*sw - pw + kw*dw]  (0 outside the image)
//            B[k, o] = W[o, ci, kh, kw] = W_flat[o * C*KH*KW + k]
//   dgrad    one GEMM per stride phase (ah, aw) in [0, sh) x [0, sw): rows m = (n, u, v) over the
//            input pixels h = ah + sh*u, w = aw + sw*v; columns ci; reduction k = (o, jh, jw) over
//            the taps that reach those pixels, kh = kh0 + jh*tsh (kh*dh = ah + ph mod sh; tsh =
//            sh / gcd(sh, dh)), likewise kw:
//            A[m, k] = g[n, o, p, q], p = (h + ph - kh*dh) / sh (exact by the choice of taps),
//                      q likewise; 0 unless 0 <= p < P, 0 <= q < Q
//            B[k, ci] = W[o, ci, kh, kw]
//            (the sub-pixel decomposition: no product with the zeros a strided convolution's
//            adjoint would otherwise insert; stride 1 is one phase with every tap)
//   wgrad    rows o, columns x = (ci, kh, kw), reduction k = (n, p, q) over N*P*Q:
//            A[o, k] = g[n, o, p, q], B[k, x] = the forward's A[(n, p, q), x]
// The second products read the radius samples through the same maps with n >= n_lo only.
#include <algorithm>
#include <numeric>

#include "interval_gemm.cuh"

namespace cure_fast {

#ifdef CURE_FAST_HOST_EMULATION
namespace host_emulation {
// Host emulation build: sum_splits_kernel below, run on the host (defined by the test).
template <typename T, typename A> void sum_splits(const A* workspace, T* out, int64_t size, int64_t splits);
}  // namespace host_emulation
#endif

namespace {

using gemm::SecondB;

// Division by a divisor d >= 1 fixed at launch, for 32-bit dividends, as a multiply-high and two
// shifts (Granlund & Montgomery, "Division by invariant integers using multiplication", 1994,
// fig. 4.1): l = ceil(log2 d), mul = floor(2^32 (2^l - d) / d) + 1, t = mulhi(n, mul),
// n / d = (t + ((n - t) >> min(l, 1))) >> max(l - 1, 0). The divisor of an empty extent (0, never
// divided by) is taken as 1.
struct Divmod {
  uint32_t d = 1, mul = 1, s1 = 0, s2 = 0;
  Divmod() = default;
  explicit Divmod(int64_t divisor) : d(static_cast<uint32_t>(divisor > 1 ? divisor : 1)) {
    uint32_t l = 0;
    while ((uint64_t(1) << l) < d) ++l;
    mul = static_cast<uint32_t>((uint64_t(1) << 32) * ((uint64_t(1) << l) - d) / d + 1);
    s1 = l < 1 ? l : 1;
    s2 = l > 1 ? l - 1 : 0;
  }
  __host__ __device__ __forceinline__ uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t t = __umulhi(n, mul);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * mul) >> 32);
#endif
    return (t + ((n - t) >> s1)) >> s2;
  }
};

// The input image x read as the im2col matrix: pixel (n, p, q) over N*P*Q, tap (ci, kh, kw) over
// C*KH*KW, element x[n - n_lo, ci, p*sh - ph + kh*dh, q*sw - pw + kw*dw]; 0 outside the image (zero
// padding) and for samples n < n_lo. Samples lie sample_stride apart (0: one image for all).
// PIXEL_IS_X: the pixel is the operand's x index (forward A), else its k index (wgrad B).
template <typename T_, bool PIXEL_IS_X> struct Im2col {
  using T = T_;
  using A = typename Acc<T>::type;
  const T* x = nullptr;
  int64_t n_lo = 0, sample_stride = 0, plane = 0;  // plane = H * W
  int height = 0, width = 0, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  Divmod pq, q, khw, kw;  // divisors P*Q, Q, KH*KW, KW
  struct Pixel {          // sample offset, image row / column of tap (0, 0)
    int64_t off;
    int h, w;
    bool ok;
  };
  struct Tap {  // channel offset, row / column offset of the tap
    int64_t off;
    int h, w;
  };

  CURE_HOST_DEVICE Pixel pixel(int64_t m) const {
    const uint32_t i = static_cast<uint32_t>(m), n = pq.div(i), s = i - n * pq.d, p = q.div(s), qq = s - p * q.d;
    return {(static_cast<int64_t>(n) - n_lo) * sample_stride, static_cast<int>(p) * sh - ph,
            static_cast<int>(qq) * sw - pw, static_cast<int64_t>(n) >= n_lo};
  }
  CURE_HOST_DEVICE Tap tap(int64_t k) const {
    const uint32_t i = static_cast<uint32_t>(k), ci = khw.div(i), t = i - ci * khw.d, r = kw.div(t), s = t - r * kw.d;
    return {static_cast<int64_t>(ci) * plane, static_cast<int>(r) * dh, static_cast<int>(s) * dw};
  }
  CURE_HOST_DEVICE A at(const Pixel& px, const Tap& tp) const {
    const int h = px.h + tp.h, w = px.w + tp.w;
    if (!px.ok || static_cast<unsigned>(h) >= static_cast<unsigned>(height) ||
        static_cast<unsigned>(w) >= static_cast<unsigned>(width))
      return A(0);
    return load(x + px.off + tp.off + static_cast<int64_t>(h) * width + w);
  }

  CURE_HOST_DEVICE bool k_fast() const { return !PIXEL_IS_X; }  // image rows run along the pixels
  CURE_HOST_DEVICE auto xpart(int64_t i) const {
    if constexpr (PIXEL_IS_X) return pixel(i); else return tap(i);
  }
  CURE_HOST_DEVICE auto kpart(int64_t i) const {
    if constexpr (PIXEL_IS_X) return tap(i); else return pixel(i);
  }
  CURE_HOST_DEVICE A get(const Pixel& px, const Tap& tp) const { return at(px, tp); }
  CURE_HOST_DEVICE A get(const Tap& tp, const Pixel& px) const { return at(px, tp); }
};

// One axis of a stride phase of the input gradient: the input pixels a + s*u (u < pixels) and the
// taps kh = tap0 + j*tap_step (j < taps) that reach them, those with kh*d = a + pad (mod s). Tap j
// reaches pixel a + s*u from output p = u + out0 - j*out_step exactly (out0 = (a + pad -
// tap0*d) / s, out_step = tap_step*d / s).
struct PhaseAxis {
  int64_t pixels = 0;
  int tap0 = 0, tap_step = 1, taps = 0, out0 = 0, out_step = 0;
};

PhaseAxis phase_axis(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dil, int64_t a) {
  PhaseAxis ax;
  ax.pixels = size > a ? (size - a + stride - 1) / stride : 0;
  ax.tap_step = static_cast<int>(stride / std::gcd(stride, dil));
  ax.out_step = static_cast<int>(ax.tap_step * dil / stride);
  for (int64_t k = 0; k < kernel && k < ax.tap_step; ++k) {
    if ((a + pad - k * dil) % stride == 0) {  // the first tap of the residue class
      ax.tap0 = static_cast<int>(k);
      ax.taps = static_cast<int>((kernel - 1 - k) / ax.tap_step + 1);
      ax.out0 = static_cast<int>((a + pad - k * dil) / stride);
      break;
    }
  }
  return ax;
}

// The output gradient g (samples, O, P, Q) read as the A operand of one phase of the input
// gradient: pixel (n, u, v) over N * pixels_h * pixels_w, tap (o, jh, jw) over O * taps_h * taps_w,
// element g[n - n_lo, o, u + out0_h - jh*out_step_h, v + out0_w - jw*out_step_w]; 0 outside the
// output and for samples n < n_lo.
template <typename T_> struct Col2im {
  using T = T_;
  using A = typename Acc<T>::type;
  const T* g = nullptr;
  int64_t n_lo = 0, sample_stride = 0, plane = 0;  // sample_stride = O*P*Q, plane = P*Q
  int out_h = 0, out_w = 0, p0 = 0, q0 = 0, p_step = 0, q_step = 0;
  Divmod per_sample, per_row, per_out, per_tap_row;  // divisors: the phase's pixels, its row length, its taps per
                                                     // output channel, its taps per kernel row
  struct Pixel {  // sample offset, output row / column of tap (0, 0)
    int64_t off;
    int p, q;
    bool ok;
  };
  struct Tap {  // o * P*Q, output row / column offset of the tap
    int64_t off;
    int p, q;
  };

  CURE_HOST_DEVICE bool k_fast() const { return false; }  // gradient rows run along the pixels
  CURE_HOST_DEVICE Pixel xpart(int64_t m) const {
    const uint32_t i = static_cast<uint32_t>(m), n = per_sample.div(i), s = i - n * per_sample.d, u = per_row.div(s),
                   v = s - u * per_row.d;
    return {(static_cast<int64_t>(n) - n_lo) * sample_stride, static_cast<int>(u) + p0, static_cast<int>(v) + q0,
            static_cast<int64_t>(n) >= n_lo};
  }
  CURE_HOST_DEVICE Tap kpart(int64_t k) const {
    const uint32_t i = static_cast<uint32_t>(k), o = per_out.div(i), t = i - o * per_out.d, jh = per_tap_row.div(t),
                   jw = t - jh * per_tap_row.d;
    return {static_cast<int64_t>(o) * plane, static_cast<int>(jh) * p_step, static_cast<int>(jw) * q_step};
  }
  CURE_HOST_DEVICE A get(const Pixel& px, const Tap& tp) const {
    const int p = px.p - tp.p, q = px.q - tp.q;
    if (!px.ok || static_cast<unsigned>(p) >= static_cast<unsigned>(out_h) ||
        static_cast<unsigned>(q) >= static_cast<unsigned>(out_w))
      return A(0);
    return load(g + px.off + tp.off + static_cast<int64_t>(p) * out_w + q);
  }
};

// The weight read as the B operand of one phase of the input gradient: element (k = (o, jh, jw),
// x = ci) is W[o, ci, kh0 + jh*tsh, kw0 + jw*tsw] = W_flat[o * C*KH*KW + ci * KH*KW + first +
// jh * row_step + jw * col_step].
template <typename T_> struct WeightByOut {
  using T = T_;
  const T* w = nullptr;
  int64_t per_out = 0, taps = 0;           // C*KH*KW, KH*KW
  int64_t first = 0, row_step = 0, col_step = 0;  // kh0*KW + kw0, tsh*KW, tsw
  Divmod phase_taps, tap_row;              // divisors: taps_h * taps_w, taps_w
  struct Part {
    int64_t off;
  };
  CURE_HOST_DEVICE bool k_fast() const { return true; }
  CURE_HOST_DEVICE Part xpart(int64_t ci) const { return {ci * taps}; }
  CURE_HOST_DEVICE Part kpart(int64_t k) const {
    const uint32_t i = static_cast<uint32_t>(k), o = phase_taps.div(i), t = i - o * phase_taps.d, jh = tap_row.div(t),
                   jw = t - jh * tap_row.d;
    return {static_cast<int64_t>(o) * per_out + first + jh * row_step + jw * col_step};
  }
  CURE_HOST_DEVICE typename Acc<T>::type get(const Part& x, const Part& k) const { return load(w + x.off + k.off); }
};

// The output gradient read as the A operand of the weight gradient: element (x = o, k = (n, p, q)
// over N*P*Q) is g[n - n_lo, o, p, q], 0 for n < n_lo.
template <typename T_> struct GradRows {
  using T = T_;
  using A = typename Acc<T>::type;
  const T* g = nullptr;
  int64_t n_lo = 0, sample_stride = 0, plane = 0;  // O*P*Q, P*Q
  Divmod pq;                                       // divisor P*Q
  struct XPart {
    int64_t off;
  };
  struct KPart {
    int64_t off;
    bool ok;
  };
  CURE_HOST_DEVICE bool k_fast() const { return true; }
  CURE_HOST_DEVICE XPart xpart(int64_t o) const { return {o * plane}; }
  CURE_HOST_DEVICE KPart kpart(int64_t k) const {
    const uint32_t i = static_cast<uint32_t>(k), n = pq.div(i);
    return {(static_cast<int64_t>(n) - n_lo) * sample_stride + (i - n * pq.d), static_cast<int64_t>(n) >= n_lo};
  }
  CURE_HOST_DEVICE A get(const XPart& x, const KPart& k) const { return k.ok ? A(load(g + x.off + k.off)) : A(0); }
};

// Where GEMM output (m, ch) lives in NCHW tensors of `pixels` pixels per sample: m = (sample n, row
// i of the sample's `rows`), row i at pixel origin + (i / cols) * row_step + (i % cols) * col_step
// (the identity by default; a stride phase of the input gradient: its grid of pixels). idx in a
// tensor of every sample, idx - first() in one of the samples n >= n_lo only.
struct NchwRows {
  int64_t channels = 0, pixels = 0, n_lo = 0;
  int64_t origin = 0, row_step = 1, col_step = 0;
  Divmod per_sample, cols;  // divisors: rows per sample, rows per pixel-grid row

  NchwRows() = default;
  NchwRows(int64_t channels_, int64_t pixels_, int64_t n_lo_)
      : channels(channels_), pixels(pixels_), n_lo(n_lo_), per_sample(Divmod(pixels_)) {}
  // Rows on the grid origin + s_row * u + s_col * v (u < grid_rows, v < grid_cols) of the pixels.
  void grid(int64_t origin_, int64_t s_row, int64_t s_col, int64_t grid_rows, int64_t grid_cols) {
    origin = origin_, row_step = s_row, col_step = s_col;
    per_sample = Divmod(grid_rows * grid_cols), cols = Divmod(grid_cols);
  }
  CURE_HOST_DEVICE __forceinline__ int64_t sample(int64_t m) const { return per_sample.div(static_cast<uint32_t>(m)); }
  CURE_HOST_DEVICE __forceinline__ int64_t index(int64_t n, int64_t m, int64_t ch) const {
    const uint32_t i = static_cast<uint32_t>(m - n * per_sample.d), u = cols.div(i);
    return (n * channels + ch) * pixels + origin + u * row_step + (i - u * cols.d) * col_step;
  }
  CURE_HOST_DEVICE __forceinline__ int64_t first() const { return n_lo * channels * pixels; }
};

// NCHW outputs of the forward and of the input gradient: row m = (n, pixel), column ch. out1 / pre1
// hold every sample, out2 / pre2 the samples n >= n_lo (at n - n_lo); the Affine epilogue runs
// between the accumulators (pre*) and the outputs.
template <typename T> struct ConvStore {
  T* out1 = nullptr;
  T* out2 = nullptr;
  T* pre1 = nullptr;
  T* pre2 = nullptr;
  gemm::Affine<T> affine;
  NchwRows rows;

  template <typename A>
  CURE_HOST_DEVICE __forceinline__ void operator()(int64_t m, int64_t ch, int, A acc1, A acc2) const {
    const int64_t n = rows.sample(m);
    const int64_t idx = rows.index(n, m, ch);
    const bool has_r = out2 != nullptr && n >= rows.n_lo;
    const int64_t idx2 = idx - rows.first();
    if (pre1 != nullptr) store(pre1 + idx, acc1);
    if (has_r && pre2 != nullptr) store(pre2 + idx2, acc2);
    A zc = acc1, zr = acc2;
    affine(ch, has_r, zc, zr);
    store(out1 + idx, zc);
    if (has_r) store(out2 + idx2, zr);
  }
};

// Outputs of the l2 first layer (NCHW like ConvStore): centre = acc1 + bias for every sample,
// radius = eps[n - n_lo] * sqrt(acc2) for the samples n >= n_lo (eps null: 1).
template <typename T> struct L2Store {
  T* centre = nullptr;
  T* radius = nullptr;
  const T* bias = nullptr;
  const T* eps = nullptr;
  NchwRows rows;

  template <typename A>
  CURE_HOST_DEVICE __forceinline__ void operator()(int64_t m, int64_t ch, int, A acc1, A acc2) const {
    const int64_t n = rows.sample(m);
    const int64_t idx = rows.index(n, m, ch);
    store(centre + idx, bias != nullptr ? acc1 + A(load(bias + ch)) : acc1);
    if (n < rows.n_lo) return;
    const A e = eps != nullptr ? A(load(eps + (n - rows.n_lo))) : A(1);
    store(radius + idx - rows.first(), e * sqrt(acc2));
  }
};

// The weight gradient acc1 + sign(W) ⊙ acc2 of output (o, x), row-major [O, C*KH*KW]: into the
// output when the reduction is not split, else into slice z of the compute-type workspace.
template <typename T> struct WgradStore {
  using A = typename Acc<T>::type;
  const T* weight = nullptr;
  T* out = nullptr;
  A* workspace = nullptr;
  int64_t cols = 0, size = 0;  // C*KH*KW, O*C*KH*KW

  CURE_HOST_DEVICE __forceinline__ void operator()(int64_t m, int64_t n, int z, A acc1, A acc2) const {
    const int64_t idx = m * cols + n;
    const A v = acc1 + sign(A(load(weight + idx))) * acc2;
    if (workspace != nullptr) {
      store(workspace + z * size + idx, v);
    } else {
      store(out + idx, v);
    }
  }
};

// out[i] = sum over the splits z of workspace[z, i], cast to T.
template <typename T, typename A>
__global__ void sum_splits_kernel(const A* __restrict__ workspace, T* __restrict__ out, int64_t size,
                                  int64_t splits) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size; i += stride) {
    A s = 0;
    for (int64_t z = 0; z < splits; ++z) s += workspace[z * size + i];
    store(out + i, s);
  }
}

template <typename T>
using ForwardProblem = gemm::Problem<T, SecondB::kAbs, true, Im2col<T, true>, gemm::Strided<T>, Im2col<T, true>,
                                     gemm::NoOperand<T>, ConvStore<T>>;
template <typename T>
using L2Problem = gemm::Problem<T, SecondB::kSquare, true, Im2col<T, true>, gemm::Strided<T>, Im2col<T, true>,
                                gemm::NoOperand<T>, L2Store<T>>;
template <typename T>
using GradInputProblem = gemm::Problem<T, SecondB::kAbs, true, Col2im<T>, WeightByOut<T>, Col2im<T>,
                                       gemm::NoOperand<T>, ConvStore<T>>;
template <typename T>
using GradWeightProblem = gemm::Problem<T, SecondB::kLoad, false, GradRows<T>, Im2col<T, false>, GradRows<T>,
                                        Im2col<T, false>, WgradStore<T>>;

int64_t pixels_in(const ConvGeometry& g) { return g.height * g.width; }
int64_t pixels_out(const ConvGeometry& g) { return g.out_height * g.out_width; }
int64_t taps(const ConvGeometry& g) { return g.channels * g.kernel_h * g.kernel_w; }

template <typename T, bool PIXEL_IS_X>
Im2col<T, PIXEL_IS_X> im2col(const ConvGeometry& g, const T* x, int64_t n_lo, int64_t sample_stride) {
  Im2col<T, PIXEL_IS_X> op;
  op.x = x;
  op.n_lo = n_lo, op.sample_stride = sample_stride, op.plane = pixels_in(g);
  op.height = static_cast<int>(g.height), op.width = static_cast<int>(g.width);
  op.sh = static_cast<int>(g.stride_h), op.sw = static_cast<int>(g.stride_w);
  op.ph = static_cast<int>(g.pad_h), op.pw = static_cast<int>(g.pad_w);
  op.dh = static_cast<int>(g.dil_h), op.dw = static_cast<int>(g.dil_w);
  op.pq = Divmod(pixels_out(g)), op.q = Divmod(g.out_width);
  op.khw = Divmod(g.kernel_h * g.kernel_w), op.kw = Divmod(g.kernel_w);
  return op;
}

template <typename T>
Col2im<T> col2im(const ConvGeometry& g, const T* grad, int64_t n_lo, const PhaseAxis& y, const PhaseAxis& x) {
  Col2im<T> op;
  op.g = grad;
  op.n_lo = n_lo, op.sample_stride = g.out_channels * pixels_out(g), op.plane = pixels_out(g);
  op.out_h = static_cast<int>(g.out_height), op.out_w = static_cast<int>(g.out_width);
  op.p0 = y.out0, op.q0 = x.out0, op.p_step = y.out_step, op.q_step = x.out_step;
  op.per_sample = Divmod(y.pixels * x.pixels), op.per_row = Divmod(x.pixels);
  op.per_out = Divmod(static_cast<int64_t>(y.taps) * x.taps), op.per_tap_row = Divmod(x.taps);
  return op;
}

template <typename T> WeightByOut<T> weight_by_out(const ConvGeometry& g, const T* w, const PhaseAxis& y,
                                                   const PhaseAxis& x) {
  WeightByOut<T> op;
  op.w = w;
  op.per_out = taps(g), op.taps = g.kernel_h * g.kernel_w;
  op.first = y.tap0 * g.kernel_w + x.tap0, op.row_step = y.tap_step * g.kernel_w, op.col_step = x.tap_step;
  op.phase_taps = Divmod(static_cast<int64_t>(y.taps) * x.taps), op.tap_row = Divmod(x.taps);
  return op;
}

template <typename T> GradRows<T> grad_rows(const ConvGeometry& g, const T* grad, int64_t n_lo) {
  GradRows<T> op;
  op.g = grad;
  op.n_lo = n_lo, op.sample_stride = g.out_channels * pixels_out(g), op.plane = pixels_out(g);
  op.pq = Divmod(pixels_out(g));
  return op;
}

// The NCHW store of an output with `channels` channels and `pixels` pixels per sample.
template <typename T> ConvStore<T> conv_store(T* out1, T* out2, int64_t channels, int64_t pixels, int64_t n_lo) {
  ConvStore<T> s;
  s.out1 = out1, s.out2 = out2;
  s.rows = NchwRows(channels, pixels, n_lo);
  return s;
}

// Reduction splits of the weight gradient (split-K over the batch pixels).
gemm::SplitK wgrad_split(const ConvGeometry& g, int sm_count) {
  return gemm::split_k(g.out_channels, taps(g), g.batch * pixels_out(g), sm_count);
}

}  // namespace

template <typename T>
void interval_conv2d_forward_cuda(const ConvGeometry& g, int64_t radius_rows, const T* c, const T* r,
                                  const T* weight, const T* bias, const T* scale, const T* shift, bool relu,
                                  T* out_c, T* out_r, T* pre_c, T* pre_r, MathMode mode, cudaStream_t stream) {
  const int64_t n_lo = g.batch - radius_rows, image = g.channels * pixels_in(g);
  const bool second = radius_rows > 0;
  ForwardProblem<T> p;
  p.M = g.batch * pixels_out(g), p.N = g.out_channels, p.K = taps(g);
  p.m2_lo = n_lo * pixels_out(g), p.second = second;
  p.a = im2col<T, true>(g, c, 0, image);
  p.b = {weight, taps(g), 1, 0, 0};  // B[k][o] = W_flat[o * K + k]
  p.a2 = im2col<T, true>(g, r, n_lo, image);
  p.epi = conv_store<T>(out_c, second ? out_r : nullptr, g.out_channels, pixels_out(g), n_lo);
  p.epi.pre1 = pre_c, p.epi.pre2 = second ? pre_r : nullptr;
  p.epi.affine = {bias, scale, shift, relu};
  gemm::run(p, mode, stream);
}

template <typename T>
void l2_conv2d_forward_cuda(const ConvGeometry& g, int64_t radius_rows, const T* x, const T* s2, bool s2_shared,
                            const T* weight, const T* bias, const T* eps, T* centre, T* radius, MathMode mode,
                            cudaStream_t stream) {
  const int64_t n_lo = g.batch - radius_rows, image = g.channels * pixels_in(g);
  L2Problem<T> p;
  p.M = g.batch * pixels_out(g), p.N = g.out_channels, p.K = taps(g);
  p.m2_lo = n_lo * pixels_out(g), p.second = radius_rows > 0;
  p.a = im2col<T, true>(g, x, 0, image);
  p.b = {weight, taps(g), 1, 0, 0};
  p.a2 = im2col<T, true>(g, s2, n_lo, s2_shared ? 0 : image);
  p.epi.centre = centre, p.epi.radius = radius, p.epi.bias = bias, p.epi.eps = eps;
  p.epi.rows = NchwRows(g.out_channels, pixels_out(g), n_lo);
  gemm::run(p, mode, stream);
}

template <typename T>
void interval_conv2d_grad_input_cuda(const ConvGeometry& g, int64_t radius_rows, const T* grad_c,
                                     const T* grad_r, const T* weight, T* d_c, T* d_r, MathMode mode,
                                     cudaStream_t stream) {
  const int64_t n_lo = g.batch - radius_rows;
  const bool second = radius_rows > 0;
  // Phases at or past the image's edge have no pixels: at most min(stride, size) per axis.
  for (int64_t ah = 0; ah < std::min(g.stride_h, g.height); ++ah) {
    const PhaseAxis y = phase_axis(g.height, g.kernel_h, g.stride_h, g.pad_h, g.dil_h, ah);
    for (int64_t aw = 0; aw < std::min(g.stride_w, g.width); ++aw) {
      const PhaseAxis x = phase_axis(g.width, g.kernel_w, g.stride_w, g.pad_w, g.dil_w, aw);
      GradInputProblem<T> p;  // a phase without taps (K = 0) stores zeros
      p.M = g.batch * y.pixels * x.pixels, p.N = g.channels, p.K = g.out_channels * y.taps * x.taps;
      p.m2_lo = n_lo * y.pixels * x.pixels, p.second = second;
      p.a = col2im<T>(g, grad_c, 0, y, x);
      p.b = weight_by_out<T>(g, weight, y, x);
      p.a2 = col2im<T>(g, grad_r, n_lo, y, x);
      p.epi = conv_store<T>(d_c, second ? d_r : nullptr, g.channels, pixels_in(g), n_lo);
      p.epi.rows.grid(ah * g.width + aw, g.stride_h * g.width, g.stride_w, y.pixels, x.pixels);
      gemm::run(p, mode, stream);
    }
  }
}

int64_t conv_grad_weight_splits(const ConvGeometry& g, int sm_count) { return wgrad_split(g, sm_count).splits; }

template <typename T, typename A>
void interval_conv2d_grad_weight_cuda(const ConvGeometry& g, int64_t radius_rows, const T* grad_c, const T* grad_r,
                                      const T* c, const T* r, const T* weight, T* d_w, A* workspace, int sm_count,
                                      MathMode mode, cudaStream_t stream) {
  static_assert(std::is_same_v<A, typename Acc<T>::type>, "the workspace is in the compute type");
  const int64_t n_lo = g.batch - radius_rows, image = g.channels * pixels_in(g);
  const gemm::SplitK split = wgrad_split(g, sm_count);
  GradWeightProblem<T> p;
  p.M = g.out_channels, p.N = taps(g), p.K = g.batch * pixels_out(g);
  p.k2_lo = n_lo * pixels_out(g), p.second = radius_rows > 0;
  p.k_chunk = split.chunk;
  p.a = grad_rows<T>(g, grad_c, 0);
  p.b = im2col<T, false>(g, c, 0, image);
  p.a2 = grad_rows<T>(g, grad_r, n_lo);
  p.b2 = im2col<T, false>(g, r, n_lo, image);
  p.epi.weight = weight, p.epi.out = d_w, p.epi.cols = taps(g), p.epi.size = g.out_channels * taps(g);
  p.epi.workspace = split.splits > 1 ? workspace : nullptr;
  gemm::run(p, mode, stream);
  if (split.splits > 1 && p.epi.size > 0) {
#ifdef CURE_FAST_HOST_EMULATION
    host_emulation::sum_splits(workspace, d_w, p.epi.size, split.splits);
#else
    sum_splits_kernel<T, A><<<grid_size(p.epi.size), kThreads, 0, stream>>>(workspace, d_w, p.epi.size, split.splits);
    CURE_CUDA_CHECK(cudaGetLastError());
#endif
  }
}

#define CURE_INSTANTIATE(T, A)                                                                                       \
  template void interval_conv2d_forward_cuda<T>(const ConvGeometry&, int64_t, const T*, const T*, const T*,          \
                                                const T*, const T*, const T*, bool, T*, T*, T*, T*, MathMode,        \
                                                cudaStream_t);                                                       \
  template void l2_conv2d_forward_cuda<T>(const ConvGeometry&, int64_t, const T*, const T*, bool, const T*,          \
                                          const T*, const T*, T*, T*, MathMode, cudaStream_t);                       \
  template void interval_conv2d_grad_input_cuda<T>(const ConvGeometry&, int64_t, const T*, const T*, const T*, T*,   \
                                                   T*, MathMode, cudaStream_t);                                      \
  template void interval_conv2d_grad_weight_cuda<T, A>(const ConvGeometry&, int64_t, const T*, const T*, const T*,   \
                                                       const T*, const T*, T*, A*, int, MathMode, cudaStream_t);
CURE_INSTANTIATE(float, float)
CURE_INSTANTIATE(double, double)
CURE_INSTANTIATE(__half, float)
CURE_INSTANTIATE(__nv_bfloat16, float)
#undef CURE_INSTANTIATE

}  // namespace cure_fast
