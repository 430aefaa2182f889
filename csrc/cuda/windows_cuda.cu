// window_rows / window_scores on CUDA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../sparse_ops.h"

namespace sparse_ops {
namespace {

constexpr int kThreads = 256;

// A window id out of range yields padding rows (-1) and trips a device assert.
__global__ void window_rows_kernel(const int64_t* __restrict__ windows, WindowFrame f, int64_t keep, int64_t total,
                                   int64_t* __restrict__ rows) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t area = f.area();
  const int64_t bk = i / area;
  const int64_t w = windows[bk];
  CUDA_KERNEL_ASSERT(w >= 0 && w < f.num_windows());
  const int64_t off = (w >= 0 && w < f.num_windows()) ? f.token_offset(w, i - bk * area) : -1;
  rows[i] = off < 0 ? -1 : (bk / keep) * f.height * f.width + off;
}

at::Tensor window_rows_cuda(const at::Tensor& windows, int64_t height, int64_t width, at::IntArrayRef window_size,
                            at::IntArrayRef shift_size) {
  check_windows_arg(windows);
  const WindowFrame f = make_window_frame(height, width, window_size, shift_size);
  const c10::cuda::CUDAGuard guard(windows.device());
  const at::Tensor ids = windows.contiguous();
  const int64_t total = ids.numel() * f.area();
  at::Tensor rows = at::empty({total}, ids.options());
  if (total == 0) return rows;
  window_rows_kernel<<<(total + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      ids.data_ptr<int64_t>(), f, ids.size(1), total, rows.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rows;
}

// One block per (image, window): each warp reduces a token's |x| over channels, the
// block sums the squared token means.
template <typename scalar_t, typename acc_t>
__global__ void window_scores_kernel(const scalar_t* __restrict__ x, WindowFrame f, int64_t cols,
                                     acc_t* __restrict__ scores) {
  const int64_t nw = f.num_windows();
  const int64_t b = blockIdx.x / nw, w = blockIdx.x % nw;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  acc_t sum_sq = 0;
  for (int64_t p = warp; p < f.area(); p += warps) {
    const int64_t off = f.token_offset(w, p);
    if (off < 0) continue;  // padding tokens are zeros; uniform across the warp
    const scalar_t* row = x + (b * f.height * f.width + off) * cols;
    acc_t m = 0;
    for (int64_t c = lane; c < cols; c += 32) {
      const acc_t v = static_cast<acc_t>(row[c]);
      m += v < 0 ? -v : v;
    }
    for (int s = 16; s > 0; s /= 2) m += __shfl_xor_sync(0xffffffffu, m, s);
    m /= cols;
    sum_sq += m * m;
  }
  __shared__ acc_t partial[kThreads / 32];
  if (lane == 0) partial[warp] = sum_sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
    for (int i = 0; i < warps; ++i) total += partial[i];
    scores[blockIdx.x] = sqrt(total);  // float or double overload
  }
}

at::Tensor window_scores_cuda(const at::Tensor& x, at::IntArrayRef window_size, at::IntArrayRef shift_size) {
  check_window_scores_arg(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor src = x.contiguous();
  const WindowFrame f = make_window_frame(src.size(1), src.size(2), window_size, shift_size);
  at::Tensor scores = at::empty({src.size(0), f.num_windows()}, src.options().dtype(score_dtype(src.scalar_type())));
  if (scores.numel() == 0) return scores;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "window_scores_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // the score dtype
    window_scores_kernel<scalar_t, acc_t><<<scores.numel(), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        src.data_ptr<scalar_t>(), f, src.size(3), scores.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ops, CUDA, m) {
  m.impl("window_rows", &window_rows_cuda);
  m.impl("window_scores", &window_scores_cuda);
}

}  // namespace sparse_ops
