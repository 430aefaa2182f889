// gather_rows / scatter_rows / scatter_add_rows on CUDA. Memory-bound copies: rows move
// as the widest vectors (up to 16 bytes) that their size, stride and alignment allow.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../sparse_ops.h"

namespace sparse_ops {
namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t work) {
  const int64_t resident = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 2048 / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, resident * 4));
}

// Out-of-range rows are never read or written; they trip a device assert.
template <typename V>
__global__ void gather_rows_kernel(const char* __restrict__ x, int64_t x_stride, int64_t num_src,
                                   const int64_t* __restrict__ rows, V* __restrict__ out, int64_t n,
                                   int64_t vecs_per_row) {
  const int64_t total = n * vecs_per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / vecs_per_row;
    const int64_t r = rows[t];
    CUDA_KERNEL_ASSERT(r >= -1 && r < num_src);
    V v{};
    if (r >= 0 && r < num_src) v = reinterpret_cast<const V*>(x + r * x_stride)[i - t * vecs_per_row];
    out[i] = v;
  }
}

template <typename V>
__global__ void scatter_rows_kernel(const V* __restrict__ y, const int64_t* __restrict__ rows, V* __restrict__ out,
                                    int64_t num_dst, int64_t n, int64_t vecs_per_row) {
  const int64_t total = n * vecs_per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / vecs_per_row;
    const int64_t r = rows[t];
    CUDA_KERNEL_ASSERT(r >= -1 && r < num_dst);
    if (r >= 0 && r < num_dst) out[r * vecs_per_row + (i - t * vecs_per_row)] = y[i];
  }
}

// Calls f(V{}) with the widest vector type whose size divides every given byte count
// and pointer address.
template <typename F>
void with_vector_type(std::initializer_list<int64_t> sizes, F&& f) {
  int64_t g = 16;
  for (int64_t s : sizes) {
    while (s % g != 0) g /= 2;
  }
  switch (g) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: f(uint8_t{}); break;
  }
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& rows) {
  check_rows_args(rows, x, x.size(-1));
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor src = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor idx = rows.contiguous();
  const int64_t n = idx.numel();
  at::Tensor out = at::empty({n, src.size(1)}, src.options());
  const int64_t row_bytes = src.size(1) * src.element_size();
  const int64_t stride = src.stride(0) * src.element_size();
  if (out.numel() == 0) return out;
  with_vector_type({row_bytes, stride, int64_t(reinterpret_cast<uintptr_t>(src.data_ptr()))}, [&](auto v) {
    using V = decltype(v);
    const int64_t vecs = row_bytes / int64_t(sizeof(V));
    gather_rows_kernel<V><<<num_blocks(n * vecs), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const char*>(src.data_ptr()), stride, src.size(0), idx.data_ptr<int64_t>(),
        static_cast<V*>(out.data_ptr()), n, vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& base) {
  check_scatter_args(y, rows, base);
  const c10::cuda::CUDAGuard guard(base.device());
  const at::Tensor src = y.contiguous();
  const at::Tensor idx = rows.contiguous();
  at::Tensor out = base.clone(at::MemoryFormat::Contiguous);
  const int64_t n = idx.numel();
  const int64_t row_bytes = out.size(1) * out.element_size();
  if (n == 0 || row_bytes == 0) return out;
  with_vector_type({row_bytes, int64_t(reinterpret_cast<uintptr_t>(src.data_ptr()))}, [&](auto v) {
    using V = decltype(v);
    const int64_t vecs = row_bytes / int64_t(sizeof(V));
    scatter_rows_kernel<V><<<num_blocks(n * vecs), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const V*>(src.data_ptr()), idx.data_ptr<int64_t>(), static_cast<V*>(out.data_ptr()),
        out.size(0), n, vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t, typename acc_t>
__global__ void scatter_add_rows_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ rows,
                                        acc_t* __restrict__ out, int64_t num_dst, int64_t n, int64_t cols) {
  const int64_t total = n * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / cols;
    const int64_t r = rows[t];
    CUDA_KERNEL_ASSERT(r >= -1 && r < num_dst);
    if (r >= 0 && r < num_dst) atomicAdd(out + r * cols + (i - t * cols), static_cast<acc_t>(y[i]));
  }
}

at::Tensor scatter_add_rows_cuda(const at::Tensor& y, const at::Tensor& rows, int64_t num_rows) {
  check_scatter_add_args(y, rows, num_rows);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor src = y.contiguous();
  const at::Tensor idx = rows.contiguous();
  const int64_t n = idx.numel(), cols = src.size(1);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scatter_add_rows_cuda", [&] {
    // Half and bfloat16 accumulate in float: repeated rows add up without losing precision,
    // and float/double atomicAdd are native.
    using acc_t = at::opmath_type<scalar_t>;
    // Atomics add repeated rows in a varying order. Under torch.use_deterministic_algorithms,
    // index_put_ with accumulate instead, which torch makes deterministic (it sorts the rows);
    // its padding rows (-1) add into one extra row, dropped.
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    const auto acc_options = src.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor acc = at::zeros({num_rows + (deterministic ? 1 : 0), cols}, acc_options);
    if (n * cols > 0 && deterministic) {
      c10::List<std::optional<at::Tensor>> target;
      target.push_back(idx.masked_fill(idx.lt(0), num_rows));
      acc.index_put_(target, src.to(acc_options.dtype()), /*accumulate=*/true);
    } else if (n * cols > 0) {
      scatter_add_rows_kernel<scalar_t, acc_t><<<num_blocks(n * cols), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          src.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), acc.data_ptr<acc_t>(), num_rows, n, cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    acc = acc.narrow(0, 0, num_rows);
    out = acc.scalar_type() == src.scalar_type() ? acc : acc.to(src.scalar_type());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("scatter_add_rows", &scatter_add_rows_cuda);
}

}  // namespace sparse_ops
