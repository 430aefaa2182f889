"""varlen_attention: softmax attention within each sequence of a packed batch (the token path of
a pruned ViT), optionally with the class-attention row that drives the next pruning decision.

Dispatch, inside the custom ops (so torch.compile sees one opaque op either way):
- CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 (how the tests run the kernels):
  the Triton kernels of sparse_ops.kernels.varlen_attention;
- other CPU tensors, float64 on any device (the kernels accumulate in float32), and CUDA
  tensors where triton is not installed (with a warning): plain PyTorch, one sequence at a
  time in float32 (matmul + fused softmax, about as fast as SDPA per sequence on a CPU).
Both paths save the same logsumexp (natural log, [H, T]) for their backward.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _checks as check
from ._dispatch import implementation


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the logsumexp and of cls_attn."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sequences(cu_seqlens: Tensor):
    bounds = cu_seqlens.tolist()
    return [(start, end) for start, end in zip(bounds[:-1], bounds[1:]) if end > start]


# ------------------------------------------------------------------------ PyTorch path
def _forward_torch(q, k, v, cu_seqlens, max_seqlen, scale, return_cls_attn):
    """One sequence at a time, in float32 (float64 for float64 inputs) like the kernels."""
    T, H, D = q.shape
    stat = _stat_dtype(q.dtype)
    out = q.new_empty(T, H, D)
    lse = q.new_empty(H, T, dtype=stat)
    cls_attn = q.new_empty(T if return_cls_attn else 0, dtype=stat)
    for start, end in _sequences(cu_seqlens):
        qs, ks, vs = (t[start:end].transpose(0, 1).to(stat) for t in (q, k, v))  # [H, L, D]
        scores = (qs * scale) @ ks.transpose(1, 2)
        p = torch.softmax(scores, dim=-1)
        out[start:end] = (p @ vs).transpose(0, 1)
        lse[:, start:end] = scores.logsumexp(-1)
        if return_cls_attn:
            cls_attn[start:end] = p[:, 0].mean(0)
    return out, lse, cls_attn


def _backward_torch(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    """Recomputes p from the saved logsumexp, in the forward's precision."""
    dq, dk, dv = (q.new_empty(q.shape) for _ in range(3))
    for start, end in _sequences(cu_seqlens):
        qs, ks, vs, dos, os_ = (t[start:end].transpose(0, 1).to(lse.dtype) for t in (q, k, v, dout, out))
        p = ((qs * scale) @ ks.transpose(1, 2) - lse[:, start:end, None]).exp()
        delta = (dos * os_).sum(-1, keepdim=True)
        ds = p * (dos @ vs.transpose(1, 2) - delta)
        dv[start:end] = (p.transpose(1, 2) @ dos).transpose(0, 1)
        dq[start:end] = ((ds @ ks) * scale).transpose(0, 1)
        dk[start:end] = ((ds.transpose(1, 2) @ qs) * scale).transpose(0, 1)
    return dq, dk, dv


# -------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sparse_ops::varlen_attention_fwd", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float,
                return_cls_attn: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> out [T, H, D], logsumexp [H, T], cls_attn [T] (empty unless return_cls_attn)."""
    forward = implementation("varlen_attention", q, "forward", _forward_torch)
    return forward(q, k, v, cu_seqlens, max_seqlen, scale, return_cls_attn)


@_forward_op.register_fake
def _forward_fake(q, k, v, cu_seqlens, max_seqlen, scale, return_cls_attn):
    T, H, D = q.shape
    stat = _stat_dtype(q.dtype)
    return q.new_empty(T, H, D), q.new_empty(H, T, dtype=stat), q.new_empty(T if return_cls_attn else 0, dtype=stat)


@torch.library.custom_op("sparse_ops::varlen_attention_bwd", mutates_args=())
def _backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                 max_seqlen: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv [T, H, D]."""
    backward = implementation("varlen_attention", q, "backward", _backward_torch)
    return backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)


@_backward_op.register_fake
def _backward_fake(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, ctx.max_seqlen, ctx.scale, _ = inputs
    out, lse, cls_attn = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.mark_non_differentiable(lse, cls_attn)


def _backward(ctx, dout, _dlse, _dcls_attn):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------ public op
def _check_cu_seqlens(cu_seqlens: Tensor, num_tokens: int, max_seqlen: int) -> None:
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must have B+1 >= 1 entries, got none")
    if not check.checking_values():
        return
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != num_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {num_tokens}, got {bounds[0]} ... {bounds[-1]}")
    if lengths and min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is less than the longest sequence ({max(lengths)})")


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     scale: Optional[float] = None, return_cls_attn: bool = False):
    """softmax(q k^T * scale) v within each sequence of a packed batch.

    q, k, v: [T, H, D], any strides (e.g. slices of a packed qkv [T, 3, H, D]); sequence b is
    rows cu_seqlens[b]:cu_seqlens[b+1] (cu_seqlens int32 [B+1], flash-attention's varlen
    convention) and max_seqlen >= its longest sequence. scale defaults to D**-0.5.
    Returns out [T, H, D] and, with return_cls_attn, also cls_attn float32 [T] (float64 for
    float64 inputs; not differentiable): for token t at key position j of its sequence, the
    softmax probability of that sequence's first query row at key j, averaged over heads.
    """
    check.qkv(q, k, v, "[T, H, D]")
    check.tensor(cu_seqlens, "cu_seqlens", 1, "[B+1]", dtypes=(torch.int32,))
    check.same_device(q=q, cu_seqlens=cu_seqlens)
    if not isinstance(max_seqlen, torch.SymInt):
        check.integer(max_seqlen, "max_seqlen")
    _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    scale = check.scale(scale, q.shape[2])
    if not isinstance(return_cls_attn, bool):
        raise TypeError(f"return_cls_attn must be a bool, got {type(return_cls_attn).__name__}")
    out, _, cls_attn = _forward_op(q, k, v, cu_seqlens, max_seqlen, scale, return_cls_attn)
    return (out, cls_attn) if return_cls_attn else out
