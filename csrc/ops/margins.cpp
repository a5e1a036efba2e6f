// Margins of the last linear layer and the l2 first-layer radius (csrc/margins.cu) as CUDA kernels
// of the cure_fast_C operators.
#include "glue.h"

namespace {

using namespace cure_fast::glue;

// Interval (l2 == false): c (N, F), r (M, F) radii of the last M rows; eps must be None.
// l2 (l2 == true): c = x (N, F), r = the squared scale (1 or N rows), eps None or (N,).
// weight (K, F), bias (K,) or None, labels (N,) int64 -> (N, K).
at::Tensor margins_linear(const at::Tensor& c, const at::Tensor& r, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                          const std::optional<at::Tensor>& eps, bool l2) {
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
at::Tensor l2_row_norms(const at::Tensor& weight, const std::optional<at::Tensor>& s2) {
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

TORCH_LIBRARY_IMPL(cure_fast_C, CUDA, m) {
  m.impl("margins_linear", &margins_linear);
  m.impl("l2_row_norms", &l2_row_norms);
}
