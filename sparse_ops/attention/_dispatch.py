"""Which path an attention op takes: the Triton kernels of sparse_ops.kernels on CUDA tensors and
on CPU tensors under TRITON_INTERPRET=1 (how the tests run the kernels), plain PyTorch for other
CPU tensors, for float64 (the kernels accumulate in float32) and where triton is not installed."""
import functools
import importlib
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_kernels(name: str):
    """The module sparse_ops.kernels.<name>, or None where triton is not installed."""
    try:
        return importlib.import_module(f"sparse_ops.kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        return None


def use_triton(name: str, q: Tensor) -> bool:
    if q.dtype == torch.float64 or not (q.is_cuda or INTERPRET):
        return False
    if triton_kernels(name) is None:
        if q.is_cuda:
            warnings.warn(f"sparse_ops.{name}: triton is not installed; CUDA tensors take the "
                          "plain-PyTorch path (slow)", RuntimeWarning, stacklevel=3)
        return False
    return True


def implementation(name: str, q: Tensor, direction: str, torch_path):
    """kernels.<name>.<direction> where the Triton path applies, else torch_path."""
    return getattr(triton_kernels(name), direction) if use_triton(name, q) else torch_path


def calls_directly(*tensors: Optional[Tensor]) -> bool:
    """Whether a caller may run a custom op's implementation itself instead of through the op:
    in eager mode (under torch.compile the op is what the graph records), on the CPU, when
    autograd has nothing to record (grad mode off, or no input requires grad). The op adds only
    its dispatch, which on the CPU cost 0.25 ms per fused Linear inside a DeiT-S block at batch
    1 (4 % of the block; 2026-12-03). tensors: the op's inputs, the first one on its device."""
    if torch.compiler.is_compiling() or tensors[0].device.type != "cpu":
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def op_or_direct(op, name: str, direction: str, torch_path, *inputs: Optional[Tensor]):
    """op, or where calls_directly(*inputs) what op would run (implementation(name, inputs[0],
    direction, torch_path)): a callable taking op's arguments."""
    return implementation(name, inputs[0], direction, torch_path) if calls_directly(*inputs) else op
