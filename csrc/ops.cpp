// Every op's schema, in one place: the op surface of sparse_ops at a glance.
// Kernels live in cpu/ and cuda/; autograd and fake (meta) implementations are
// registered from Python (sparse_ops/ops.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(sparse_ops, m) {
  // x [R, C] -> [T, C]: out[t] = x[rows[t]], or zeros where rows[t] == -1.
  m.def("gather_rows(Tensor x, Tensor rows) -> Tensor");
  // Copy of base [R, C] with out[rows[t]] = y[t] where rows[t] >= 0 (rows unique).
  m.def("scatter_rows(Tensor y, Tensor rows, Tensor base) -> Tensor");
  // Zeros [num_rows, C] with out[rows[t]] += y[t] where rows[t] >= 0 (repeats add up).
  m.def("scatter_add_rows(Tensor y, Tensor rows, int num_rows) -> Tensor");
  // windows [B, K] window ids -> [B*K*wh*ww] flat rows b*H*W + y*W + x of each window's
  // tokens in timm's frame (roll by -shift, then pad to window multiples); -1 = padding.
  m.def("window_rows(Tensor windows, int height, int width, int[2] window_size, int[2] shift_size) -> Tensor");
  // x [B, H, W, C] -> float32 [B, nW]: L2 norm over each window of the tokens' mean |x|.
  m.def("window_scores(Tensor x, int[2] window_size, int[2] shift_size) -> Tensor");
}

// Importing sparse_ops._C loads this library, which runs the registrations above.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
