// The operators of the extension cure_fast._C, torch.ops.cure_fast_C.*: every schema in this one
// TORCH_LIBRARY block; each op family's file of csrc/ops/ registers its CUDA kernels for them
// (TORCH_LIBRARY_IMPL), next to their input checks. Rows: c has N rows, r has M <= N rows, the
// radii of the LAST M rows of c. The Python side (cure_fast/cuda/) wraps them in torch.library
// custom ops with fake implementations and autograd.
#include <Python.h>

#include "glue.h"

TORCH_LIBRARY(cure_fast_C, m) {
  // interval_relu.cpp: the interval ReLU, c (N, *), r (M, *) -> (c_out, r_out), and its gradients.
  m.def("interval_relu_forward(Tensor c, Tensor r) -> (Tensor, Tensor)");
  m.def("interval_relu_backward(Tensor c, Tensor r, Tensor grad_c_out, Tensor grad_r_out) -> (Tensor, Tensor)");

  // interval_linear.cpp: the fused interval linear layer ((c W^T + bias) * scale + shift, r |W|^T * |scale|,
  // interval ReLU if relu) -> (c_out, r_out, pre_c, pre_r); its input gradients (grad_c W, grad_r |W|);
  // its weight gradient grad_c^T c + sign(W) ⊙ grad_r^T r.
  m.def("interval_linear_forward(Tensor c, Tensor r, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, "
        "bool relu, str precision, bool save_pre) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("interval_linear_grad_input(Tensor grad_c, Tensor grad_r, Tensor weight, str precision) -> (Tensor, Tensor)");
  m.def("interval_linear_grad_weight(Tensor grad_c, Tensor grad_r, Tensor c, Tensor r, Tensor weight, "
        "str precision) -> Tensor");

  // interval_conv.cpp: interval conv2d as one implicit GEMM (same epilogue) -> (c_out, r_out, pre_c, pre_r);
  // its input gradients (conv_transpose(grad_c, W), conv_transpose(grad_r, |W|)); its split-K weight
  // gradient; the first conv layer under an l2 ellipsoid (conv(x, W) + bias, eps * sqrt(conv(s2, W^2))).
  m.def("interval_conv2d_forward(Tensor c, Tensor r, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, "
        "bool relu, int[] stride, int[] padding, int[] dilation, str precision, bool save_pre) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("interval_conv2d_grad_input(Tensor grad_c, Tensor grad_r, Tensor weight, int[] input_size, int[] stride, "
        "int[] padding, int[] dilation, str precision) -> (Tensor, Tensor)");
  m.def("interval_conv2d_grad_weight(Tensor grad_c, Tensor grad_r, Tensor c, Tensor r, Tensor weight, int[] stride, "
        "int[] padding, int[] dilation, str precision) -> Tensor");
  m.def("l2_conv2d_forward(Tensor x, Tensor s2, Tensor weight, Tensor? bias, Tensor? eps, int[] stride, "
        "int[] padding, int[] dilation, str precision) -> (Tensor, Tensor)");

  // channel.cpp: per-channel (x + bias) * scale + shift, r * |scale|, interval ReLU if relu, on (N, C, *)
  // tensors; its backward -> (grad_xc, grad_xr, sums (2, C)); the mean and biased variance of the first rows.
  m.def("channel_epilogue_forward(Tensor xc, Tensor xr, Tensor? bias, Tensor? scale, Tensor? shift, bool relu) "
        "-> (Tensor, Tensor)");
  m.def("channel_epilogue_backward(Tensor xc, Tensor xr, Tensor? bias, Tensor? scale, Tensor? shift, bool relu, "
        "Tensor grad_c_out, Tensor grad_r_out) -> (Tensor, Tensor, Tensor)");
  m.def("channel_moments(Tensor x, int rows) -> (Tensor, Tensor)");

  // margins.cpp: the margins z_y - z_j of a last linear layer (interval or l2 input); sqrt(sum_i W[o, i]^2 s2[i]).
  m.def("margins_linear(Tensor c, Tensor r, Tensor weight, Tensor? bias, Tensor labels, Tensor? eps, bool l2) "
        "-> Tensor");
  m.def("l2_row_norms(Tensor weight, Tensor? s2) -> Tensor");

  // Test hook: while on, every output starts as NaN (an element a kernel does not write shows up).
  m.def("set_poison(bool on) -> ()", [](bool on) { cure_fast::glue::g_poison = on; });
}

// The Python module cure_fast._C: importing it loads this library, which registers the operators.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "cure_fast CUDA kernels: the operators torch.ops.cure_fast_C.*", -1, nullptr};
  return PyModule_Create(&module);
}
