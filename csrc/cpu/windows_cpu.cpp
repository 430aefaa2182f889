// window_rows / window_scores on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../sparse_ops.h"

namespace sparse_ops {
namespace {

at::Tensor window_rows_cpu(const at::Tensor& windows, int64_t height, int64_t width, at::IntArrayRef window_size,
                           at::IntArrayRef shift_size) {
  check_windows_arg(windows);
  const WindowFrame f = make_window_frame(height, width, window_size, shift_size);
  const at::Tensor ids = windows.contiguous();
  const int64_t batch = ids.size(0), keep = ids.size(1), area = f.area();
  const int64_t* w = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch * keep; ++i) {
    TORCH_CHECK(w[i] >= 0 && w[i] < f.num_windows(), "sparse_ops: window id ", w[i], " is out of range [0, ",
                f.num_windows(), ")");
  }
  at::Tensor rows = at::empty({batch * keep * area}, ids.options());
  int64_t* out = rows.data_ptr<int64_t>();
  at::parallel_for(0, batch * keep, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t image = (i / keep) * height * width;
      for (int64_t p = 0; p < area; ++p) {
        const int64_t off = f.token_offset(w[i], p);
        out[i * area + p] = off < 0 ? -1 : image + off;
      }
    }
  });
  return rows;
}

at::Tensor window_scores_cpu(const at::Tensor& x, at::IntArrayRef window_size, at::IntArrayRef shift_size) {
  check_window_scores_arg(x);
  const at::Tensor src = x.contiguous();
  const int64_t batch = src.size(0), cols = src.size(3);
  const WindowFrame f = make_window_frame(src.size(1), src.size(2), window_size, shift_size);
  const int64_t nw = f.num_windows(), image = f.height * f.width;
  at::Tensor scores = at::empty({batch, nw}, src.options().dtype(score_dtype(src.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "window_scores_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // the score dtype
    const scalar_t* in = src.data_ptr<scalar_t>();
    acc_t* out = scores.data_ptr<acc_t>();
    at::parallel_for(0, batch * nw, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        acc_t sum_sq = 0;
        for (int64_t p = 0; p < f.area(); ++p) {
          const int64_t off = f.token_offset(i % nw, p);
          if (off < 0) continue;  // padding tokens are zeros
          const scalar_t* row = in + ((i / nw) * image + off) * cols;
          // Independent partial sums: one serial sum is bound by the add latency and cannot
          // vectorise (float addition does not reassociate).
          constexpr int kLanes = 8;
          acc_t partial[kLanes] = {};
          int64_t c = 0;
          for (; c + kLanes <= cols; c += kLanes) {
            for (int l = 0; l < kLanes; ++l) partial[l] += std::abs(static_cast<acc_t>(row[c + l]));
          }
          for (; c < cols; ++c) partial[0] += std::abs(static_cast<acc_t>(row[c]));
          acc_t m = 0;
          for (int l = 0; l < kLanes; ++l) m += partial[l];
          m /= cols;
          sum_sq += m * m;
        }
        out[i] = std::sqrt(sum_sq);
      }
    });
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CPU, m) {
  m.impl("window_rows", &window_rows_cpu);
  m.impl("window_scores", &window_scores_cpu);
}

}  // namespace sparse_ops
