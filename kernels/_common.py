"""What the attention kernels share: interpreter handling, base-2 softmax constants, tile
loads and stores, launch helpers."""
import math
import os

import torch
import triton
import triton.language as tl

# The interpreter computes bf16 arithmetic and bf16 dots wrongly: tiles are upcast to fp32
# there (UPCAST). On a GPU the dots take the inputs' dtype and accumulate in fp32.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = math.log2(math.e)
LOG2E_CONST = tl.constexpr(LOG2E)  # the same, usable inside kernels


@triton.jit
def load_tile(base, rows, num_rows, stride_row, cols, num_cols, stride_col, UPCAST: tl.constexpr):
    """[len(rows), len(cols)] tile of a [num_rows, num_cols] strided slice; zeros outside."""
    inside = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    tile = tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=inside, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def store_tile(base, rows, num_rows, stride_row, cols, num_cols, tile):
    """Writes the rows < num_rows and columns < num_cols of tile (unit column stride), in
    base's dtype."""
    inside = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    tl.store(base + rows[:, None] * stride_row + cols[None, :], tile.to(base.dtype.element_ty), mask=inside)


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of q's shape for a kernel to write. The interpreter
    truncates (does not round) when it casts float32 to bf16: there the kernels write float32,
    and the caller's .to(q.dtype) rounds."""
    dtype = torch.float32 if INTERPRET and q.dtype == torch.bfloat16 else q.dtype
    return torch.empty(q.shape, dtype=dtype, device=q.device)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get float32 products, as torch.matmul gives them by default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (a no-op for CPU tensors)."""
    return torch.cuda.device(t.device.index if t.is_cuda else -1)


def strides(*tensors: torch.Tensor) -> list:
    return [s for t in tensors for s in t.stride()]
