"""What the Triton kernels share: interpreter handling, autotune configs, base-2 softmax
constants, tile loads and stores, launch helpers.

Environment:
- SPARSE_OPS_AUTOTUNE=0 (read once, at import): every autotuned kernel runs its first config
  only, one known to fit sm_90, with no benchmarking: for test runs, where timing every config
  of every shape would only cost compile time. Unset or 1: the kernels autotune.
- TRITON_INTERPRET=1: the kernels run on CPU tensors through Triton's interpreter, each with
  one small fixed config (the interpreter cannot autotune).
"""
import math
import os

import torch
import triton
import triton.language as tl

# The interpreter computes bf16 arithmetic and bf16 dots wrongly: tiles are upcast to fp32
# there (UPCAST). On a GPU the dots take the inputs' dtype and accumulate in fp32.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("SPARSE_OPS_AUTOTUNE", "1") != "0"
LOG2E = math.log2(math.e)
LOG2E_CONST = tl.constexpr(LOG2E)  # the same, usable inside kernels


def autotune_configs(configs: list, interpreted: triton.Config) -> list:
    """A kernel's autotune candidates: configs on a GPU (only the first, which must fit sm_90,
    where SPARSE_OPS_AUTOTUNE=0), the one config interpreted under the interpreter."""
    if INTERPRET:
        return [interpreted]
    return configs if AUTOTUNE else configs[:1]


def tuned(kernel):
    """An autotuned kernel, to launch as tuned(kernel)[grid](...). Under torch's deterministic
    mode it runs its first config without benchmarking: the timed choice may differ from one
    process to the next, and with the config the order in which a program sums (key blocks,
    K chunks), so results would too."""
    if not torch.are_deterministic_algorithms_enabled():
        return kernel
    return _FirstConfig(kernel)


class _FirstConfig:
    def __init__(self, autotuner):
        self.autotuner = autotuner

    def __getitem__(self, grid):
        config = self.autotuner.configs[0].all_kwargs()
        return lambda *args, **kwargs: self.autotuner.fn[grid](*args, **kwargs, **config)


def bucket(n: int) -> int:
    """A coarse power-of-two bucket of a size, for autotune keys: configs are chosen per regime
    (a kernel's key holds the bucket, passed as an int argument the kernel ignores) without
    tuning again at every size a pruning decision gives."""
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def load_tile(base, rows, num_rows, stride_row, cols, num_cols, stride_col, UPCAST: tl.constexpr):
    """[len(rows), len(cols)] tile of a [num_rows, num_cols] strided slice; zeros outside."""
    inside = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    # int64: a view's row or column stride times the index may pass 2**31
    offsets = rows[:, None].to(tl.int64) * stride_row + cols[None, :].to(tl.int64) * stride_col
    tile = tl.load(base + offsets, mask=inside, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def store_tile(base, rows, num_rows, stride_row, cols, num_cols, tile):
    """Writes the rows < num_rows and columns < num_cols of tile (unit column stride), in
    base's dtype."""
    inside = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    offsets = rows[:, None].to(tl.int64) * stride_row + cols[None, :]
    tl.store(base + offsets, tile.to(base.dtype.element_ty), mask=inside)


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of q's shape for a kernel to write. The interpreter
    truncates (does not round) when it casts float32 to bf16: there the kernels write float32,
    and the caller's .to(q.dtype) rounds."""
    dtype = torch.float32 if INTERPRET and q.dtype == torch.bfloat16 else q.dtype
    return torch.empty(q.shape, dtype=dtype, device=q.device)


def dot_precision(dtype: torch.dtype) -> str:
    """The dots' input precision, decided at each launch (it is a constexpr): float32 inputs
    follow torch's setting for CUDA matmuls, float32 products (torch's default) or TF32;
    the others take their own dtype, which "tf32" leaves alone."""
    return "tf32" if dtype != torch.float32 or torch_matmul_allows_tf32() else "ieee"


def torch_matmul_allows_tf32() -> bool:
    """Whether torch lets float32 CUDA matmuls run in TF32: torch 2.9+ says it in
    backends.cuda.matmul.fp32_precision (which reflects the global setting and the legacy
    flag; reading allow_tf32 there raises once both APIs were used), older torch in allow_tf32."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


def on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (a no-op for CPU tensors)."""
    return torch.cuda.device(t.device.index if t.is_cuda else -1)


def strides(*tensors: torch.Tensor) -> list:
    return [s for t in tensors for s in t.stride()]
