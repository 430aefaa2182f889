// Shared by the CPU and CUDA kernels: argument checks and the window geometry.
#pragma once
#include <ATen/ATen.h>

namespace sparse_ops {

// Shape and dtype invariants of the row ops. The Python wrappers raise friendlier
// errors first; these keep direct torch.ops calls from reading or writing out of bounds.
inline void check_rows_args(const at::Tensor& rows, const at::Tensor& x, int64_t num_cols) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong,
              "sparse_ops: rows must be a 1-D int64 tensor, got ", rows.dim(), "-D ", rows.scalar_type());
  TORCH_CHECK(rows.device() == x.device(), "sparse_ops: rows is on ", rows.device(), " but data on ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == num_cols,
              "sparse_ops: expected a 2-D tensor with ", num_cols, " columns, got shape ", x.sizes());
}

inline void check_scatter_args(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& base) {
  check_rows_args(rows, base, base.size(-1));
  check_rows_args(rows, y, base.size(1));
  TORCH_CHECK(y.size(0) == rows.size(0), "sparse_ops: y has ", y.size(0), " rows but rows has ", rows.size(0));
  TORCH_CHECK(y.scalar_type() == base.scalar_type(), "sparse_ops: y is ", y.scalar_type(), " but base is ",
              base.scalar_type());
}

inline void check_scatter_add_args(const at::Tensor& y, const at::Tensor& rows, int64_t num_rows) {
  check_rows_args(rows, y, y.size(-1));
  TORCH_CHECK(y.size(0) == rows.size(0), "sparse_ops: y has ", y.size(0), " rows but rows has ", rows.size(0));
  TORCH_CHECK(num_rows >= 0, "sparse_ops: num_rows must be >= 0, got ", num_rows);
}

// The frame of timm's (shifted) window partition: the image rolled by -shift, then
// zero-padded at the bottom/right to multiples of the window.
struct WindowFrame {
  int64_t height, width;   // image size
  int64_t wh, ww;          // window size
  int64_t sh, sw;          // shift
  int64_t grid_h, grid_w;  // windows per column / row of the padded frame

  C10_HOST_DEVICE int64_t num_windows() const { return grid_h * grid_w; }
  C10_HOST_DEVICE int64_t area() const { return wh * ww; }

  // Offset y * width + x in the original (unrolled) image of token p of window w,
  // or -1 where that token is padding.
  C10_HOST_DEVICE int64_t token_offset(int64_t w, int64_t p) const {
    const int64_t py = (w / grid_w) * wh + p / ww;
    const int64_t px = (w % grid_w) * ww + p % ww;
    if (py >= height || px >= width) return -1;
    return ((py + sh) % height) * width + (px + sw) % width;
  }
};

inline WindowFrame make_window_frame(int64_t height, int64_t width, at::IntArrayRef window_size,
                                     at::IntArrayRef shift_size) {
  TORCH_CHECK(height >= 1 && width >= 1, "sparse_ops: height and width must be >= 1, got ", height, "x", width);
  TORCH_CHECK(window_size.size() == 2 && window_size[0] >= 1 && window_size[1] >= 1,
              "sparse_ops: window_size must be two ints >= 1, got ", window_size);
  TORCH_CHECK(shift_size.size() == 2 && shift_size[0] >= 0 && shift_size[0] < window_size[0] &&
                  shift_size[1] >= 0 && shift_size[1] < window_size[1],
              "sparse_ops: shift_size must be two ints in [0, window_size), got ", shift_size);
  const int64_t grid_h = (height + window_size[0] - 1) / window_size[0];
  const int64_t grid_w = (width + window_size[1] - 1) / window_size[1];
  return {height, width, window_size[0], window_size[1], shift_size[0], shift_size[1], grid_h, grid_w};
}

inline void check_windows_arg(const at::Tensor& windows) {
  TORCH_CHECK(windows.dim() == 2 && windows.scalar_type() == at::kLong,
              "sparse_ops: windows must be a [B, K] int64 tensor, got ", windows.dim(), "-D ",
              windows.scalar_type());
}

inline void check_window_scores_arg(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.size(3) >= 1, "sparse_ops: x must be [B, H, W, C] with C >= 1, got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "sparse_ops: x must be floating point, got ", x.scalar_type());
}

// Scores are float32 (float64 for float64 input): ties in half precision would make
// the window selection depend on rounding.
inline at::ScalarType score_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace sparse_ops
