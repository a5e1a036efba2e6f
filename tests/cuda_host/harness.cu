// The conv and linear problems of csrc/ on the host emulation of their kernels (emulate.h), as a
// shared library for tests/test_cuda_host_emulation.py, which builds it with
//   nvcc -std=c++17 -x cu -shared -Xcompiler -fPIC -DCURE_FAST_HOST_EMULATION -I csrc harness.cu
// Every tensor is float64 and contiguous. Each entry point returns 0, or 1 after an error, whose
// message cure_emu_error() then gives (out-of-bounds access, unwritten tile element, or an
// exception of the sources).
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "emulate.h"
// The sources under test, in this translation unit.
#include "interval_conv.cu"
#include "interval_linear.cu"

using namespace cure_fast;

namespace {

std::string last_error;

template <class F> int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown exception";
  }
  return 1;
}

// geometry: batch, channels, height, width, out_channels, out_height, out_width, kernel_h,
// kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w.
ConvGeometry geometry(const long long* v) {
  ConvGeometry g;
  g.batch = v[0], g.channels = v[1], g.height = v[2], g.width = v[3];
  g.out_channels = v[4], g.out_height = v[5], g.out_width = v[6];
  g.kernel_h = v[7], g.kernel_w = v[8];
  g.stride_h = v[9], g.stride_w = v[10], g.pad_h = v[11], g.pad_w = v[12], g.dil_h = v[13], g.dil_w = v[14];
  return g;
}

// The SM count the split-K rules of the linear problem assume (cure_emu_set_sm_count).
int linear_sm_count = 1;

// interval_gemm_cuda as the bindings run it: with a workspace for its split-K pieces, NaN-filled
// and registered as a writable buffer.
void run_linear_gemm(const GemmParams<double>& p) {
  const int64_t splits = interval_gemm_splits(p.M, p.N, p.K, linear_sm_count);
  std::vector<double> workspace(splits > 1 ? 2 * splits * p.M * p.N : 0, std::numeric_limits<double>::quiet_NaN());
  if (!workspace.empty()) {
    const char* begin = reinterpret_cast<const char*>(workspace.data());
    host_emulation::buffers.push_back({begin, begin + workspace.size() * sizeof(double), true});
  }
  interval_gemm_cuda<double>(p, workspace.data(), linear_sm_count, MathMode::kFma, nullptr);
}

}  // namespace

extern "C" {

const char* cure_emu_error() { return last_error.c_str(); }

// 0: the schedule of the kernel that the math mode selects (always FMA here: float64), 1: FMA,
// 2: WMMA.
void cure_emu_set_schedule(int s) { host_emulation::schedule = static_cast<host_emulation::Schedule>(s); }

// The buffers that loads (and, writable, stores) may touch; cleared before each problem.
void cure_emu_clear_buffers() { host_emulation::buffers.clear(); }
void cure_emu_add_buffer(const void* p, long long bytes, int writable) {
  const char* c = static_cast<const char*>(p);
  host_emulation::buffers.push_back({c, c + bytes, writable != 0});
}

// launches, blocks, k-steps, k-steps with the second product, grid x / y / z of the last launch.
void cure_emu_counters(long long* out) {
  const host_emulation::Counters& c = host_emulation::counters;
  const long long v[7] = {c.launches, c.blocks, c.ksteps, c.ksteps2, c.grid_x, c.grid_y, c.grid_z};
  for (int i = 0; i < 7; ++i) out[i] = v[i];
}
void cure_emu_reset_counters() { host_emulation::counters = {}; }

int cure_emu_conv_forward(const long long* geom, long long radius_rows, const double* c, const double* r,
                          const double* w, const double* bias, const double* scale, const double* shift, int relu,
                          double* out_c, double* out_r, double* pre_c, double* pre_r) {
  return guarded([&] {
    interval_conv2d_forward_cuda<double>(geometry(geom), radius_rows, c, r, w, bias, scale, shift, relu != 0, out_c,
                                         out_r, pre_c, pre_r, MathMode::kFma, nullptr);
  });
}

int cure_emu_l2_forward(const long long* geom, long long radius_rows, const double* x, const double* s2,
                        int s2_shared, const double* w, const double* bias, const double* eps, double* centre,
                        double* radius) {
  return guarded([&] {
    l2_conv2d_forward_cuda<double>(geometry(geom), radius_rows, x, s2, s2_shared != 0, w, bias, eps, centre, radius,
                                   MathMode::kFma, nullptr);
  });
}

int cure_emu_conv_grad_input(const long long* geom, long long radius_rows, const double* grad_c,
                             const double* grad_r, const double* w, double* d_c, double* d_r) {
  return guarded([&] {
    interval_conv2d_grad_input_cuda<double>(geometry(geom), radius_rows, grad_c, grad_r, w, d_c, d_r,
                                            MathMode::kFma, nullptr);
  });
}

long long cure_emu_conv_grad_weight_splits(const long long* geom, int sm_count) {
  return conv_grad_weight_splits(geometry(geom), sm_count);
}

int cure_emu_conv_grad_weight(const long long* geom, long long radius_rows, const double* grad_c,
                              const double* grad_r, const double* c, const double* r, const double* w, double* d_w,
                              double* workspace, int sm_count) {
  return guarded([&] {
    interval_conv2d_grad_weight_cuda<double, double>(geometry(geom), radius_rows, grad_c, grad_r, c, r, w, d_w,
                                                     workspace, sm_count, MathMode::kFma, nullptr);
  });
}

void cure_emu_set_sm_count(int sm_count) { linear_sm_count = sm_count; }
long long cure_emu_linear_splits(long long M, long long N, long long K, int sm_count) {
  return interval_gemm_splits(M, N, K, sm_count);
}

// interval_gemm_cuda as the bindings call it for interval_linear: c (n, k), the radii r of the
// last m rows (m, k), weight (o, k).
//   forward:      out_c = epilogue(c W^T), out_r = epilogue(r |W|^T); pre_c / pre_r optional
int cure_emu_linear_forward(long long n, long long m, long long k, long long o, const double* c, const double* r,
                            const double* w, const double* bias, const double* scale, const double* shift, int relu,
                            double* out_c, double* out_r, double* pre_c, double* pre_r) {
  return guarded([&] {
    GemmParams<double> p;
    p.M = n, p.N = o, p.K = k;
    p.a = c, p.sa_m = k, p.sa_k = 1;
    p.b = w, p.sb_k = 1, p.sb_n = k;
    if (m > 0) p.a2 = r, p.sa2_m = k, p.sa2_k = 1, p.out2 = out_r, p.pre2 = pre_r;
    p.m2_lo = n - m;
    p.bias = bias, p.scale = scale, p.shift = shift, p.relu = relu != 0;
    p.out1 = out_c, p.pre1 = pre_c;
    run_linear_gemm(p);
  });
}

//   input gradient: d_c = g_c W (n, k), d_r = g_r |W| (m, k); g_c (n, o), g_r (m, o)
int cure_emu_linear_grad_input(long long n, long long m, long long o, long long k, const double* grad_c,
                               const double* grad_r, const double* w, double* d_c, double* d_r) {
  return guarded([&] {
    GemmParams<double> p;
    p.M = n, p.N = k, p.K = o;
    p.a = grad_c, p.sa_m = o, p.sa_k = 1;
    p.b = w, p.sb_k = k, p.sb_n = 1;
    if (m > 0) p.a2 = grad_r, p.sa2_m = o, p.sa2_k = 1, p.out2 = d_r;
    p.m2_lo = n - m;
    p.out1 = d_c;
    run_linear_gemm(p);
  });
}

//   weight gradient: d_w = g_c^T c + sign(W) (g_r^T r) (o, k)
int cure_emu_linear_grad_weight(long long n, long long m, long long k, long long o, const double* grad_c,
                                const double* grad_r, const double* c, const double* r, const double* w,
                                double* d_w) {
  return guarded([&] {
    GemmParams<double> p;
    p.M = o, p.N = k, p.K = n;
    p.a = grad_c, p.sa_m = 1, p.sa_k = o;
    p.b = c, p.sb_k = k, p.sb_n = 1;
    if (m > 0) {
      p.a2 = grad_r, p.sa2_m = 1, p.sa2_k = o;
      p.b2 = r, p.sb2_k = k, p.sb2_n = 1;
    }
    p.k2_lo = n - m;
    p.sign_of = w;
    p.out1 = d_w;
    run_linear_gemm(p);
  });
}

}  // extern "C"
