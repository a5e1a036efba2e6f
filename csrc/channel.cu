// Per-channel kernels on tensors viewed as (rows, channels, inner), contiguous: the fused
// epilogue of the interval affine layers (bias, BatchNorm-style scale / shift, interval ReLU),
// its backward with the per-channel parameter-gradient sums, and the channel moments of the
// natural rows (train-mode BatchNorm statistics). As everywhere, xr / r hold the radii of the
// LAST m_rows rows; the first n_rows - m_rows rows are points.
#include "common.h"

namespace cure_fast {
namespace {

// Channel reductions: block = 256 threads = TC channels x LANES lanes (TC = 32 when inner == 1,
// so that consecutive threads read consecutive channels; TC = 1 otherwise, so that they read
// consecutive inner positions). grid = (ceil(channels / TC), chunks); each block reduces its
// channels over a strided share of the rows * inner positions and writes one partial per chunk.
constexpr int kReduceThreads = 256;

struct ReduceShape {
  int tc, lanes;
};

__host__ __device__ inline ReduceShape reduce_shape(int64_t inner) {
  return inner == 1 ? ReduceShape{32, kReduceThreads / 32} : ReduceShape{1, kReduceThreads};
}

// Sums (s0, s1) over the lanes of the block and writes partial[blockIdx.y, {0, 1}, ch].
template <typename A>
__device__ __forceinline__ void reduce_lanes(A s0, A s1, A* partial, int tc, int lanes, int64_t ch,
                                             int64_t channels) {
  __shared__ A sm0[kReduceThreads], sm1[kReduceThreads];
  const int t = threadIdx.x, lane = t / tc;
  sm0[t] = s0;
  sm1[t] = s1;
  __syncthreads();
  for (int s = lanes / 2; s > 0; s >>= 1) {  // lanes is a power of two
    if (lane < s) {
      sm0[t] += sm0[t + s * tc];
      sm1[t] += sm1[t + s * tc];
    }
    __syncthreads();
  }
  if (lane == 0 && ch < channels) {
    partial[(static_cast<int64_t>(blockIdx.y) * 2 + 0) * channels + ch] = sm0[t];
    partial[(static_cast<int64_t>(blockIdx.y) * 2 + 1) * channels + ch] = sm1[t];
  }
}

template <typename T>
__global__ void epilogue_forward_kernel(const T* __restrict__ xc, const T* __restrict__ xr,
                                        const T* __restrict__ bias, const T* __restrict__ scale,
                                        const T* __restrict__ shift, bool relu, T* __restrict__ out_c,
                                        T* __restrict__ out_r, int64_t n, int64_t n_points, int64_t channels,
                                        int64_t inner, int64_t xc_row_stride, int64_t xr_row_stride) {
  using A = typename Acc<T>::type;
  const int64_t row_size = channels * inner;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t ch = (i / inner) % channels;
    A zc = load(xc + (i / row_size) * xc_row_stride + i % row_size);
    if (bias != nullptr) zc += A(load(bias + ch));
    const A s = scale != nullptr ? A(load(scale + ch)) : A(1);
    zc *= s;
    if (shift != nullptr) zc += A(load(shift + ch));
    if (i < n_points) {
      store(out_c + i, relu ? cure_fast::relu(zc) : zc);
      continue;
    }
    const int64_t j = i - n_points;
    A zr = A(load(xr + (j / row_size) * xr_row_stride + j % row_size)) * absval(s);
    if (relu) {
      const A l = cure_fast::relu(zc - zr), u = cure_fast::relu(zc + zr);
      zc = (u + l) / A(2);
      zr = (u - l) / A(2);
    }
    store(out_c + i, zc);
    store(out_r + j, zr);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kReduceThreads)
    epilogue_backward_kernel(const T* __restrict__ xc, const T* __restrict__ xr, const T* __restrict__ bias,
                             const T* __restrict__ scale, const T* __restrict__ shift, bool relu,
                             const T* __restrict__ gco, const T* __restrict__ gro, T* __restrict__ gxc,
                             T* __restrict__ gxr, A* __restrict__ partial, int64_t n_rows, int64_t m_rows,
                             int64_t channels, int64_t inner, int64_t xc_row_stride, int64_t xr_row_stride) {
  const ReduceShape rs = reduce_shape(inner);
  const int lane = threadIdx.x / rs.tc;
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * rs.tc + threadIdx.x % rs.tc;
  const int64_t p_rows = n_rows - m_rows;
  const int64_t positions = n_rows * inner, r_offset = p_rows * channels * inner;
  A s0 = 0, s1 = 0;
  if (ch < channels) {
    const A b = bias != nullptr ? A(load(bias + ch)) : A(0);
    const A s = scale != nullptr ? A(load(scale + ch)) : A(1);
    const A sh = shift != nullptr ? A(load(shift + ch)) : A(0);
    const A abs_s = absval(s), sgn_s = sign(s);
    const int64_t step = static_cast<int64_t>(gridDim.y) * rs.lanes;
    for (int64_t q = static_cast<int64_t>(blockIdx.y) * rs.lanes + lane; q < positions; q += step) {
      const int64_t row = q / inner, in_row = ch * inner + q % inner, idx = row * channels * inner + in_row;
      const A c1 = A(load(xc + row * xc_row_stride + in_row)) + b;  // before the scale
      const A zc = c1 * s + sh;
      const A gc = load(gco + idx);
      if (row < p_rows) {  // a point
        const A g_zc = relu && !(zc > A(0)) ? A(0) : gc;
        store(gxc + idx, g_zc * s);
        s0 += g_zc;
        s1 += g_zc * c1;
        continue;
      }
      const int64_t jdx = idx - r_offset;
      const A r1 = load(xr + (row - p_rows) * xr_row_stride + in_row), zr = r1 * abs_s, gr = load(gro + jdx);
      A g_zc = gc, g_zr = gr;
      if (relu) {
        const A gl = zc - zr > A(0) ? (gc - gr) / A(2) : A(0);
        const A gu = zc + zr > A(0) ? (gc + gr) / A(2) : A(0);
        g_zc = gl + gu;
        g_zr = gu - gl;
      }
      store(gxc + idx, g_zc * s);
      store(gxr + jdx, g_zr * abs_s);
      s0 += g_zc;
      s1 += g_zc * c1 + g_zr * r1 * sgn_s;
    }
  }
  reduce_lanes(s0, s1, partial, rs.tc, rs.lanes, ch, channels);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kReduceThreads)
    moments_kernel(const T* __restrict__ x, const A* __restrict__ mean, A* __restrict__ partial, int64_t rows,
                   int64_t channels, int64_t inner) {
  const ReduceShape rs = reduce_shape(inner);
  const int lane = threadIdx.x / rs.tc;
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * rs.tc + threadIdx.x % rs.tc;
  const int64_t positions = rows * inner;
  A s0 = 0, s1 = 0;
  if (ch < channels) {
    const A mu = mean != nullptr ? mean[ch] : A(0);
    const int64_t step = static_cast<int64_t>(gridDim.y) * rs.lanes;
    for (int64_t q = static_cast<int64_t>(blockIdx.y) * rs.lanes + lane; q < positions; q += step) {
      const int64_t idx = ((q / inner) * channels + ch) * inner + q % inner;
      const A v = load(x + idx);
      s0 += v;
      s1 += (v - mu) * (v - mu);
    }
  }
  reduce_lanes(s0, s1, partial, rs.tc, rs.lanes, ch, channels);
}

dim3 reduce_grid(int64_t rows, int64_t channels, int64_t inner) {
  const ReduceShape rs = reduce_shape(inner);
  return dim3(static_cast<unsigned int>((channels + rs.tc - 1) / rs.tc),
              static_cast<unsigned int>(channel_reduce_chunks(rows, channels, inner)));
}

}  // namespace

int64_t channel_reduce_chunks(int64_t rows, int64_t channels, int64_t inner) {
  const ReduceShape rs = reduce_shape(inner);
  const int64_t blocks_x = (channels + rs.tc - 1) / rs.tc;
  const int64_t per_chunk = static_cast<int64_t>(rs.lanes) * 8;  // at least 8 positions per thread
  int64_t chunks = (rows * inner + per_chunk - 1) / per_chunk;
  const int64_t fill = blocks_x >= 1024 ? 1 : 1024 / (blocks_x > 0 ? blocks_x : 1);  // ~1024 blocks in all
  if (chunks > fill) chunks = fill;
  if (chunks > 65535) chunks = 65535;
  return chunks < 1 ? 1 : chunks;
}

template <typename T>
void channel_epilogue_forward_cuda(const T* xc, const T* xr, const T* bias, const T* scale, const T* shift,
                                   bool relu, T* out_c, T* out_r, int64_t n_rows, int64_t m_rows, int64_t channels,
                                   int64_t inner, int64_t xc_row_stride, int64_t xr_row_stride, cudaStream_t stream) {
  const int64_t n = n_rows * channels * inner;
  if (n == 0) return;
  epilogue_forward_kernel<T><<<grid_size(n), kThreads, 0, stream>>>(
      xc, xr, bias, scale, shift, relu, out_c, out_r, n, (n_rows - m_rows) * channels * inner, channels, inner,
      xc_row_stride, xr_row_stride);
  CURE_CUDA_CHECK(cudaGetLastError());
}

template <typename T, typename A>
void channel_epilogue_backward_cuda(const T* xc, const T* xr, const T* bias, const T* scale, const T* shift,
                                    bool relu, const T* grad_c_out, const T* grad_r_out, T* grad_xc, T* grad_xr,
                                    A* partial, int64_t n_rows, int64_t m_rows, int64_t channels, int64_t inner,
                                    int64_t xc_row_stride, int64_t xr_row_stride, cudaStream_t stream) {
  if (channels == 0) return;
  epilogue_backward_kernel<T, A><<<reduce_grid(n_rows, channels, inner), kReduceThreads, 0, stream>>>(
      xc, xr, bias, scale, shift, relu, grad_c_out, grad_r_out, grad_xc, grad_xr, partial, n_rows, m_rows, channels,
      inner, xc_row_stride, xr_row_stride);
  CURE_CUDA_CHECK(cudaGetLastError());
}

template <typename T, typename A>
void channel_moments_cuda(const T* x, const A* mean, A* partial, int64_t rows, int64_t channels, int64_t inner,
                          cudaStream_t stream) {
  if (channels == 0) return;
  moments_kernel<T, A><<<reduce_grid(rows, channels, inner), kReduceThreads, 0, stream>>>(x, mean, partial, rows,
                                                                                           channels, inner);
  CURE_CUDA_CHECK(cudaGetLastError());
}

#define CURE_INSTANTIATE(T, A)                                                                                    \
  template void channel_epilogue_forward_cuda<T>(const T*, const T*, const T*, const T*, const T*, bool, T*, T*, \
                                                 int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,           \
                                                 cudaStream_t);                                                  \
  template void channel_epilogue_backward_cuda<T, A>(const T*, const T*, const T*, const T*, const T*, bool,     \
                                                     const T*, const T*, T*, T*, A*, int64_t, int64_t, int64_t,  \
                                                     int64_t, int64_t, int64_t, cudaStream_t);                   \
  template void channel_moments_cuda<T, A>(const T*, const A*, A*, int64_t, int64_t, int64_t, cudaStream_t);
CURE_INSTANTIATE(float, float)
CURE_INSTANTIATE(double, double)
CURE_INSTANTIATE(__half, float)
CURE_INSTANTIATE(__nv_bfloat16, float)
#undef CURE_INSTANTIATE

}  // namespace cure_fast
