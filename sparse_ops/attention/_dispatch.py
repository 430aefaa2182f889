"""Which path an attention op takes: the Triton kernels of sparse_ops.kernels on CUDA tensors and
on CPU tensors under TRITON_INTERPRET=1 (how the tests run the kernels), plain PyTorch for other
CPU tensors, for float64 (the kernels accumulate in float32) and where triton is not installed."""
import functools
import importlib
import os
import warnings

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

