"""What the sparse ViT and Swin blocks share: the unchecked op calls (the blocks build their
own indices, so the boundary's value checks, which synchronise on CUDA, are skipped),
stochastic depth over packed rows, a cache for values made from parameters alone, and the
blocks' plain Linears on packed weights in CPU inference (sparse_ops._packed_linear)."""
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .._backend import kernel
from .. import _packed_linear, fused
from .._export import exporting


def norm_linear(x: Tensor, rows: Optional[Tensor], norm: nn.LayerNorm, linear: nn.Linear, as_timm: bool = False) -> Tensor:
    """linear(norm(x[rows])) through the fused GEMM prologue; as_timm (no rows): through the
    modules themselves, as timm calls them, bit for bit (the packed GEMM rounds otherwise)."""
    if as_timm and rows is None:
        return linear(norm(x))
    if x.stride(1) != 1:
        x = x.contiguous()
    return fused.layernorm_linear(x, rows, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


def linear_scatter(h: Tensor, linear: nn.Linear, base: Tensor, rows: Tensor, residual: Tensor, inplace: bool) -> Tensor:
    """base with base[rows] = residual + linear(h) through the fused GEMM epilogue; inplace
    (the caller owns base and needs no gradient) writes into base."""
    if not inplace:
        return fused.linear_scatter(h, linear.weight, linear.bias, residual, base, rows)
    fused.linear_scatter_(h, linear.weight, linear.bias, residual, base, rows)
    return base


def linear(x: Tensor, module: nn.Module, as_timm: bool = False) -> Tensor:
    """module(x): for a plain nn.Linear that no forward hook watches, through
    _packed_linear.linear (a packed weight in CPU inference) unless as_timm."""
    if as_timm or type(module) is not nn.Linear or hooked(module):
        return module(x)
    return _packed_linear.linear(x, module.weight, module.bias)


def hooked(module: nn.Module) -> bool:
    """Whether a forward hook can see module's input or output (its own or a global one)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _global_forward_hooks
                or _global_forward_pre_hooks)


class InferenceCache(dict):
    """A module's inference_cached values, never part of what is saved or copied: it pickles
    (torch.save too) and deep-copies as an empty cache. It holds storages and inference
    tensors, which torch.save and pickle cannot write, and values that a copy would have to
    make again from its own parameters anyway."""

    def __reduce__(self):
        return type(self), ()

    def __deepcopy__(self, memo):
        return type(self)()


def inference_cached(module: nn.Module, name: str, compute: Callable[[], Tensor], *sources: Tensor) -> Tensor:
    """compute(), a value made from the tensors `sources` alone (a Swin block's relative-position
    bias from its table and index), kept on module under `name` between calls that record no
    gradient for it: recomputed where autograd would record it, under torch.compile (the graph
    and export hold the computation), and once a source is another tensor, has other memory or was
    written in place (version counter). The cache holds the sources' memory, so that no new
    tensor can take its address while kept, in an InferenceCache: never saved or copied with
    the module. Not cached in a process group (FSDP2 rewrites parameters unversioned, see
    _packed_linear.distributed). timm recomputes such values at every call: a few small ops a block."""
    if (torch.compiler.is_compiling() or exporting() or _packed_linear.distributed()
            or (torch.is_grad_enabled() and any(s.requires_grad for s in sources))):
        return compute()
    # a value made in inference mode is an inference tensor: reused only there
    key = (torch.is_inference_mode_enabled(), *((s.data_ptr(), s._version) for s in sources))
    cache = module.__dict__.get("_inference_cache")
    if not isinstance(cache, InferenceCache):  # (a module pickled with a plain dict here)
        cache = module.__dict__["_inference_cache"] = InferenceCache()
    hit = cache.get(name)
    if hit is not None and hit[0] == key and all(a is b for a, b in zip(hit[1], sources, strict=True)):
        return hit[3]
    value = compute()
    cache[name] = (key, sources, [s.untyped_storage() for s in sources], value)
    return value


def gather(x: Tensor, rows: Optional[Tensor]) -> Tensor:
    return x if rows is None else kernel("gather_rows", x.device.type)(x, rows)


def drop_path(module: nn.Module, x: Tensor, sample_of_row: Tensor, batch_size: int) -> Tensor:
    """timm's DropPath (one draw per image) applied to packed rows; sample_of_row [R] says
    which image each row belongs to."""
    p = getattr(module, "drop_prob", 0.0)
    if isinstance(module, nn.Identity) or not module.training or p == 0.0:
        return x
    keep = x.new_empty(batch_size).bernoulli_(1.0 - p)
    if getattr(module, "scale_by_keep", True):
        keep = keep / (1.0 - p)
    return x * keep[sample_of_row].unsqueeze(1)
