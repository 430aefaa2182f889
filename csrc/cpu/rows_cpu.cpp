// gather_rows / scatter_rows / scatter_add_rows on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../sparse_ops.h"

namespace sparse_ops {
namespace {

// Rows are checked before any write so a bad index raises instead of corrupting memory.
void check_row_values(const int64_t* rows, int64_t n, int64_t num_rows) {
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(rows[t] >= -1 && rows[t] < num_rows, "sparse_ops: rows[", t, "] = ", rows[t],
                " is out of range [-1, ", num_rows, ")");
  }
}

// Rows are plain byte copies, so gather and scatter need no dtype dispatch.
at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& rows) {
  check_rows_args(rows, x, x.size(-1));
  const at::Tensor src = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor idx = rows.contiguous();
  const int64_t n = idx.numel(), num_src = src.size(0);
  const int64_t row_bytes = src.size(1) * src.element_size();
  const int64_t src_stride = src.stride(0) * src.element_size();
  at::Tensor out = at::empty({n, src.size(1)}, src.options());
  const int64_t* r = idx.data_ptr<int64_t>();
  check_row_values(r, n, num_src);
  const char* in = static_cast<const char*>(src.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n, at::internal::GRAIN_SIZE / std::max<int64_t>(row_bytes, 1) + 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      if (r[t] < 0) {
        std::memset(o + t * row_bytes, 0, row_bytes);
      } else {
        std::memcpy(o + t * row_bytes, in + r[t] * src_stride, row_bytes);
      }
    }
  });
  return out;
}

// One pass over the output, each row written once: from y where rows points at it, else
// from base (a clone of base and then the copies of y would write the kept rows twice).
at::Tensor scatter_rows_cpu(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& base) {
  check_scatter_args(y, rows, base);
  const at::Tensor src = y.contiguous();
  const at::Tensor idx = rows.contiguous();
  const at::Tensor dense = base.stride(1) == 1 ? base : base.contiguous();
  const int64_t n = idx.numel(), num_rows = dense.size(0);
  const int64_t row_bytes = dense.size(1) * dense.element_size();
  const int64_t base_stride = dense.stride(0) * dense.element_size();
  const int64_t* r = idx.data_ptr<int64_t>();
  check_row_values(r, n, num_rows);
  std::vector<int64_t> source(num_rows, -1);  // the row of y that replaces each row of base
  for (int64_t t = 0; t < n; ++t) {
    if (r[t] >= 0) source[r[t]] = t;
  }
  at::Tensor out = at::empty({num_rows, dense.size(1)}, dense.options());
  const char* from_y = static_cast<const char*>(src.data_ptr());
  const char* from_base = static_cast<const char*>(dense.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, num_rows, at::internal::GRAIN_SIZE / std::max<int64_t>(row_bytes, 1) + 1,
                   [&](int64_t b, int64_t e) {
                     for (int64_t i = b; i < e; ++i) {
                       const char* row = source[i] >= 0 ? from_y + source[i] * row_bytes : from_base + i * base_stride;
                       std::memcpy(o + i * row_bytes, row, row_bytes);
                     }
                   });
  return out;
}

at::Tensor scatter_add_rows_cpu(const at::Tensor& y, const at::Tensor& rows, int64_t num_rows) {
  check_scatter_add_args(y, rows, num_rows);
  const at::Tensor src = y.contiguous();
  const at::Tensor idx = rows.contiguous();
  const int64_t n = idx.numel(), cols = src.size(1);
  const int64_t* r = idx.data_ptr<int64_t>();
  check_row_values(r, n, num_rows);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scatter_add_rows_cpu", [&] {
    // Half and bfloat16 sum in float: repeated rows would otherwise lose precision.
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor acc = at::zeros({num_rows, cols}, src.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* in = src.data_ptr<scalar_t>();
    acc_t* o = acc.data_ptr<acc_t>();
    // Each thread owns a column range, so repeated rows never race.
    at::parallel_for(0, cols, std::max<int64_t>(at::internal::GRAIN_SIZE / std::max<int64_t>(n, 1), 1),
                     [&](int64_t cb, int64_t ce) {
                       for (int64_t t = 0; t < n; ++t) {
                         if (r[t] < 0) continue;
                         for (int64_t c = cb; c < ce; ++c) o[r[t] * cols + c] += static_cast<acc_t>(in[t * cols + c]);
                       }
                     });
    out = acc.scalar_type() == src.scalar_type() ? acc : acc.to(src.scalar_type());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CPU, m) {
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("scatter_add_rows", &scatter_add_rows_cpu);
}

}  // namespace sparse_ops
