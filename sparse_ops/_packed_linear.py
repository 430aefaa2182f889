"""Linear layers of pruned blocks in CPU inference, on weights packed once for oneDNN.

A pruned block multiplies few rows by each weight (49 for a Swin block that keeps one window),
and a model's weights do not fit in the cache (Swin-T: 112 MB), so MKL's sgemm, which repacks
the weight it reads at every call, is bound by that traffic. oneDNN's GEMM on a weight packed
once into its blocked layout is not: [49, 384] x [384, 1536] took 0.60 instead of 0.88 ms
with the weights out of cache (one core of a 2-core EPYC, 2026-12-06), and it was no slower
at any row count measured (49 to 3136).

The packed copy is kept beside its weight (one more copy of each weight a pruned block uses)
and packed again when the weight is written in place or replaced. It is used only where
nothing can need a gradient through it, on float32 CPU tensors, in eager mode, and for model
weights (Parameters): not for the transposed weight of a backward pass, and never while a
model is traced or exported (the graph must hold standard ops). Not in a process that is part
of a process group either: FSDP2 all-gathers each sharded weight into the same memory before
every forward without bumping its version counter, so a packed copy would silently go stale
(it did: dense_sparse_step under fully_shard drifted from one process by up to 4e-3).
``torch.backends.mkldnn.enabled = False`` turns it off (with the rest of oneDNN).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ._export import exporting

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_packed = WeakIdKeyDictionary()  # weight -> (its data_ptr and version, its storage, packed copy)


def distributed() -> bool:
    """Whether this process is part of a process group, where (data_ptr, version) does not
    identify a weight's values (FSDP2 rewrites them in place unversioned): nothing is cached
    on parameters there."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _packs(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], recorded: bool) -> bool:
    if not (_AVAILABLE and torch.backends.mkldnn.enabled) or torch.compiler.is_compiling() or exporting():
        return False
    if recorded or distributed():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):  # F.linear then runs in autocast's dtype, as timm's
        return False
    if not isinstance(weight, nn.Parameter) or weight.is_inference():
        return False
    if any(t is not None and t.dtype != torch.float32 for t in (bias, residual)):
        return False
    return not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual))


def _packed_weight(weight: Tensor) -> Tensor:
    key = (weight.data_ptr(), weight._version)
    hit = _packed.get(weight)
    if hit is not None and hit[0] == key:
        return hit[2]
    with torch.inference_mode(False), torch.no_grad():  # usable in and out of inference mode
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    # holding the storage keeps another tensor from taking its address while the entry lives
    _packed[weight] = (key, weight.untyped_storage(), packed)
    return packed


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor] = None,
           recorded: bool = False) -> Tensor:
    """F.linear(x, weight, bias) + residual (optional, [R, N]), x [R, K]: one GEMM with
    the residual as its accumulator. recorded: the call is inside the forward of an op that
    autograd records (grad mode is off there, so only the op knows): never packed, as in
    any training step."""
    if not _packs(x, weight, bias, residual, recorded):
        if residual is None:
            return F.linear(x, weight, bias)
        return torch.addmm(residual if bias is None else residual + bias, x, weight.t())
    packed = _packed_weight(weight)
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
