// Interval conv2d as an implicit GEMM on the main loops of interval_gemm.cuh: the forward with its
// fused epilogue, the l2 first layer, and the input and weight gradients. Tensors are contiguous
// NCHW: input (N, C, H, W), weight (O, C, KH, KW), output (N, O, P, Q). Radii (r, grad_r) hold the
// LAST R samples: sample n >= n_lo = N - R sits at row n - n_lo; the first n_lo samples are points.
//
// Index maps (sh, ph, dh: stride, padding, dilation along the height; likewise sw, pw, dw):
//   forward  rows m = (n, p, q) over N*P*Q, columns o, reduction k = (ci, kh, kw) over C*KH*KW:
//            A[m, k] = c[n, ci, p*sh - ph + kh*dh, q*sw - pw + kw*dw]  (0 outside the image)
//            B[k, o] = W[o, ci, kh, kw] = W_flat[o * C*KH*KW + k]
//   dgrad    rows m = (n, h, w) over N*H*W, columns ci, reduction k = (o, kh, kw) over O*KH*KW:
//            A[m, k] = g[n, o, p, q] where p*sh = h + ph - kh*dh, q*sw = w + pw - kw*dw exactly,
//                      0 <= p < P, 0 <= q < Q (the outputs whose window puts tap (kh, kw) on
//                      (h, w)); 0 otherwise
//            B[k, ci] = W[o, ci, kh, kw]
//   wgrad    rows o, columns x = (ci, kh, kw), reduction k = (n, p, q) over N*P*Q:
//            A[o, k] = g[n, o, p, q], B[k, x] = the forward's A[(n, p, q), x]
// The second products read the radius samples through the same maps with n >= n_lo only.
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
// n / d = (t + ((n - t) >> min(l, 1))) >> max(l - 1, 0).
struct Divmod {
  uint32_t d = 1, mul = 1, s1 = 0, s2 = 0;
  Divmod() = default;
  explicit Divmod(int64_t divisor) : d(static_cast<uint32_t>(divisor)) {
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

// The output gradient g (samples, O, P, Q) read as the A operand of the input gradient: pixel
// (n, h, w) over N*H*W, tap (o, kh, kw) over O*KH*KW, element g[n - n_lo, o, p, q] where
// p*sh = h + ph - kh*dh and q*sw = w + pw - kw*dw are exact multiples with 0 <= p < P, 0 <= q < Q;
// 0 otherwise and for samples n < n_lo.
template <typename T_> struct Col2im {
  using T = T_;
  using A = typename Acc<T>::type;
  const T* g = nullptr;
  int64_t n_lo = 0, sample_stride = 0, plane = 0;  // sample_stride = O*P*Q, plane = P*Q
  int out_h = 0, out_w = 0, ph = 0, pw = 0, dh = 1, dw = 1;
  Divmod hw, w, khw, kw, sh, sw;  // divisors H*W, W, KH*KW, KW, the strides
  struct Pixel {                  // sample offset, h + ph, w + pw
    int64_t off;
    int h, w;
    bool ok;
  };
  struct Tap {  // o * P*Q, kh*dh, kw*dw
    int64_t off;
    int h, w;
  };

  CURE_HOST_DEVICE bool k_fast() const { return false; }  // gradient rows run along the pixels
  CURE_HOST_DEVICE Pixel xpart(int64_t m) const {
    const uint32_t i = static_cast<uint32_t>(m), n = hw.div(i), s = i - n * hw.d, y = w.div(s), x = s - y * w.d;
    return {(static_cast<int64_t>(n) - n_lo) * sample_stride, static_cast<int>(y) + ph, static_cast<int>(x) + pw,
            static_cast<int64_t>(n) >= n_lo};
  }
  CURE_HOST_DEVICE Tap kpart(int64_t k) const {
    const uint32_t i = static_cast<uint32_t>(k), o = khw.div(i), t = i - o * khw.d, r = kw.div(t), s = t - r * kw.d;
    return {static_cast<int64_t>(o) * plane, static_cast<int>(r) * dh, static_cast<int>(s) * dw};
  }
  CURE_HOST_DEVICE A get(const Pixel& px, const Tap& tp) const {
    const int th = px.h - tp.h, tw = px.w - tp.w;  // p * sh and q * sw when the tap lands on (h, w)
    if (!px.ok || th < 0 || tw < 0) return A(0);
    const uint32_t p = sh.div(static_cast<uint32_t>(th)), q = sw.div(static_cast<uint32_t>(tw));
    if (p * sh.d != static_cast<uint32_t>(th) || q * sw.d != static_cast<uint32_t>(tw) ||
        p >= static_cast<uint32_t>(out_h) || q >= static_cast<uint32_t>(out_w))
      return A(0);
    return load(g + px.off + tp.off + static_cast<int64_t>(p) * out_w + q);
  }
};

// The weight read as the B operand of the input gradient: element (k = (o, kh, kw), x = ci) is
// W[o, ci, kh, kw] = W_flat[o * C*KH*KW + ci * KH*KW + kh*KW + kw].
template <typename T_> struct WeightByOut {
  using T = T_;
  const T* w = nullptr;
  int64_t per_out = 0, taps = 0;  // C*KH*KW, KH*KW
  Divmod khw;                     // divisor KH*KW
  struct Part {
    int64_t off;
  };
  CURE_HOST_DEVICE bool k_fast() const { return true; }
  CURE_HOST_DEVICE Part xpart(int64_t ci) const { return {ci * taps}; }
  CURE_HOST_DEVICE Part kpart(int64_t k) const {
    const uint32_t i = static_cast<uint32_t>(k), o = khw.div(i);
    return {static_cast<int64_t>(o) * per_out + (i - o * khw.d)};
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

// Where GEMM output (m, ch) lives in NCHW tensors, m = (sample n, pixel): idx in a tensor of every
// sample, idx - first in one of the samples n >= n_lo only (first = n_lo * channels * pixels).
struct NchwRows {
  int64_t channels = 0, pixels = 0, n_lo = 0;
  Divmod per_sample;  // divisor pixels

  NchwRows() = default;
  NchwRows(int64_t channels_, int64_t pixels_, int64_t n_lo_)
      : channels(channels_), pixels(pixels_), n_lo(n_lo_), per_sample(Divmod(pixels_)) {}
  CURE_HOST_DEVICE __forceinline__ int64_t sample(int64_t m) const { return per_sample.div(static_cast<uint32_t>(m)); }
  CURE_HOST_DEVICE __forceinline__ int64_t index(int64_t n, int64_t m, int64_t ch) const {
    return (n * channels + ch) * pixels + (m - n * pixels);
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

template <typename T> Col2im<T> col2im(const ConvGeometry& g, const T* grad, int64_t n_lo) {
  Col2im<T> op;
  op.g = grad;
  op.n_lo = n_lo, op.sample_stride = g.out_channels * pixels_out(g), op.plane = pixels_out(g);
  op.out_h = static_cast<int>(g.out_height), op.out_w = static_cast<int>(g.out_width);
  op.ph = static_cast<int>(g.pad_h), op.pw = static_cast<int>(g.pad_w);
  op.dh = static_cast<int>(g.dil_h), op.dw = static_cast<int>(g.dil_w);
  op.hw = Divmod(pixels_in(g)), op.w = Divmod(g.width);
  op.khw = Divmod(g.kernel_h * g.kernel_w), op.kw = Divmod(g.kernel_w);
  op.sh = Divmod(g.stride_h), op.sw = Divmod(g.stride_w);
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

// Reduction splits of the weight gradient: enough blocks for about four per SM, at least
// kMinSplitK reduction steps per split, chunks a multiple of the k-steps of both kernels.
constexpr int64_t kMinSplitK = 512;

struct SplitK {
  int64_t splits, chunk;
};

SplitK wgrad_split(const ConvGeometry& g, int sm_count) {
  const int64_t k = g.batch * pixels_out(g);
  if (k == 0) return {1, 1};
  const int64_t tiles = ((g.out_channels + gemm::FBM - 1) / gemm::FBM) * ((taps(g) + gemm::FBN - 1) / gemm::FBN);
  const int64_t want = (4 * static_cast<int64_t>(sm_count) + tiles - 1) / tiles;
  int64_t most = k / kMinSplitK;
  if (most > 65535) most = 65535;
  const int64_t splits = want < most ? want : most;
  if (splits <= 1) return {1, k};
  const int64_t step = gemm::WBK;  // a multiple of both k-steps
  const int64_t chunk = ((k + splits - 1) / splits + step - 1) / step * step;
  return {(k + chunk - 1) / chunk, chunk};
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
  GradInputProblem<T> p;
  p.M = g.batch * pixels_in(g), p.N = g.channels, p.K = g.out_channels * g.kernel_h * g.kernel_w;
  p.m2_lo = n_lo * pixels_in(g), p.second = second;
  p.a = col2im<T>(g, grad_c, 0);
  p.b.w = weight, p.b.per_out = taps(g), p.b.taps = g.kernel_h * g.kernel_w;
  p.b.khw = Divmod(g.kernel_h * g.kernel_w);
  p.a2 = col2im<T>(g, grad_r, n_lo);
  p.epi = conv_store<T>(d_c, second ? d_r : nullptr, g.channels, pixels_in(g), n_lo);
  gemm::run(p, mode, stream);
}

int64_t conv_grad_weight_splits(const ConvGeometry& g, int sm_count) { return wgrad_split(g, sm_count).splits; }

template <typename T, typename A>
void interval_conv2d_grad_weight_cuda(const ConvGeometry& g, int64_t radius_rows, const T* grad_c, const T* grad_r,
                                      const T* c, const T* r, const T* weight, T* d_w, A* workspace, int sm_count,
                                      MathMode mode, cudaStream_t stream) {
  static_assert(std::is_same_v<A, typename Acc<T>::type>, "the workspace is in the compute type");
  const int64_t n_lo = g.batch - radius_rows, image = g.channels * pixels_in(g);
  const SplitK split = wgrad_split(g, sm_count);
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
