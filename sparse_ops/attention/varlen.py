"""varlen_attention: softmax attention within each sequence of a packed batch (the token path of
a pruned ViT), optionally with the class-attention row that drives the next pruning decision,
or with the attention each token receives (the score of ViTs without a class token).

Dispatch, inside the custom ops (so torch.compile sees one opaque op either way):
- CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 (how the tests run the kernels):
  the Triton kernels of sparse_ops.kernels.varlen_attention;
- other CPU tensors, float64 on any device (the kernels accumulate in float32), and CUDA
  tensors where triton is not installed (with a warning): plain PyTorch in float32, one
  call per run of consecutive sequences of equal length (on the CPU torch's flash kernel).
Both paths save the same logsumexp (natural log, [H, T]) for their backward. In eager CPU
inference (_dispatch.calls_directly) forward / forward_received skip the custom ops and call
what they would run.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _autocast, _checks as check
from .._export import equal_length_attention, exporting
from ._dispatch import implementation, op_or_direct


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the logsumexp and of cls_attn."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _runs(cu_seqlens: Tensor, num_rows: int):
    """(first row, number of sequences, length) of each run of adjacent non-empty sequences
    of one length: a run is a dense [n, L] batch of the packed rows (a fixed keep rate makes
    the whole batch one run). Each sequence is clamped to the num_rows rows (cu_seqlens is
    unchecked under no_index_checks)."""
    bounds = cu_seqlens.tolist()
    runs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        start = min(max(start, 0), num_rows)
        length = min(max(end, start), num_rows) - start
        if length == 0:
            continue
        if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == start:
            runs[-1][1] += 1
        else:
            runs.append([start, 1, length])
    return runs


def _as_batch(t: Tensor, start: int, n: int, length: int, dtype: torch.dtype) -> Tensor:
    """Rows start:start+n*length of a packed [T, H, D] as a [n, H, L, D] view (a copy only to
    change dtype)."""
    return t[start:start + n * length].to(dtype).unflatten(0, (n, length)).transpose(1, 2)


# ------------------------------------------------------------------------ PyTorch path
def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float):
    """[n, H, L, D] -> out [n, H, L, D], logsumexp [n, H, L]. On the CPU torch's flash kernel
    (what SDPA runs there; called directly because it also returns the logsumexp), whose
    output memory is in the packed [n, L, H, D] order; elsewhere (float64 on CUDA) matmuls."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return _attend_matmul(q, k, v, scale)


def _attend_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float):
    """-> dq, dk, dv [n, H, L, D], the probabilities recomputed from the logsumexp."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.contiguous(), 0.0, False, scale=scale)
    return _attend_backward_matmul(dout, q, k, v, out, lse, scale)


def _attend_matmul(q, k, v, scale):
    scores = (q * scale) @ k.transpose(-1, -2)
    lse = scores.logsumexp(-1)
    return (scores - lse.unsqueeze(-1)).exp() @ v, lse


def _attend_backward_matmul(dout, q, k, v, out, lse, scale):
    p = ((q * scale) @ k.transpose(-1, -2) - lse.unsqueeze(-1)).exp()
    ds = p * (dout @ v.transpose(-1, -2) - (dout * out).sum(-1, keepdim=True))
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, p.transpose(-1, -2) @ dout


def _forward_torch(q, k, v, cu_seqlens, max_seqlen, scale, return_cls_attn):
    """One run of equal lengths at a time, in float32 (float64 for float64 inputs) like the
    kernels."""
    T, H, D = q.shape
    stat = _stat_dtype(q.dtype)
    out = q.new_empty(T, H, D)
    lse = q.new_empty(H, T, dtype=stat)
    cls_attn = q.new_empty(T if return_cls_attn else 0, dtype=stat)
    for start, n, length in _runs(cu_seqlens, q.shape[0]):
        end = start + n * length
        qs, ks, vs = (_as_batch(t, start, n, length, stat) for t in (q, k, v))
        o, lse_run = _attend(qs, ks, vs, scale)
        out[start:end] = o.transpose(1, 2).flatten(0, 1)
        lse[:, start:end] = lse_run.transpose(0, 1).flatten(1)
        if return_cls_attn:  # each sequence's first query row [n, H, 1, L], mean over heads
            first = (qs[:, :, :1] @ ks.transpose(-1, -2)) * scale
            cls_attn[start:end] = first.softmax(-1).mean(1).flatten()
    return out, lse, cls_attn


def _backward_torch(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    """In the forward's precision."""
    dq, dk, dv = (q.new_empty(q.shape) for _ in range(3))
    for start, n, length in _runs(cu_seqlens, q.shape[0]):
        end = start + n * length
        run = [_as_batch(t, start, n, length, lse.dtype) for t in (dout, q, k, v, out)]
        lse_run = lse[:, start:end].unflatten(1, (n, length)).transpose(0, 1)  # [n, H, L]
        for packed, g in zip((dq, dk, dv), _attend_backward(*run, lse_run, scale)):
            packed[start:end] = g.transpose(1, 2).flatten(0, 1)
    return dq, dk, dv


def _forward_received_torch(q, k, v, cu_seqlens, max_seqlen, scale):
    """Explicit probabilities, one run of equal lengths at a time, in float32 (float64 for
    float64): the output, logsumexp and column means all from the same ones."""
    T, H, D = q.shape
    stat = _stat_dtype(q.dtype)
    out = q.new_empty(T, H, D)
    lse = q.new_empty(H, T, dtype=stat)
    received = q.new_empty(T, dtype=stat)
    for start, n, length in _runs(cu_seqlens, T):
        end = start + n * length
        qs, ks, vs = (_as_batch(t, start, n, length, stat) for t in (q, k, v))
        scores = (qs * scale) @ ks.transpose(-1, -2)  # [n, H, L, L]
        p = scores.softmax(-1)
        # the row maximum's probability is exp(max - lse) >= 1/L: the logsumexp without a
        # second pass of exp over the scores (a third faster than logsumexp then exp on CPU)
        lse_run = scores.amax(-1) - p.amax(-1).log()
        out[start:end] = (p @ vs).transpose(1, 2).flatten(0, 1)
        lse[:, start:end] = lse_run.transpose(0, 1).flatten(1)
        received[start:end] = p.mean(2).mean(1).flatten()
    return out, lse, received


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


@torch.library.custom_op("sparse_ops::varlen_attention_received_fwd", mutates_args=())
def _forward_received_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                         scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> out [T, H, D], logsumexp [H, T], received [T]: per token, the softmax attention it
    receives, mean over its sequence's queries and the heads (the token score of a ViT
    without a class token). Kernels: the forward, then a second pass over q and k from the
    logsumexp; PyTorch: explicit probabilities."""
    forward = implementation("varlen_attention", q, "forward_received", _forward_received_torch)
    return forward(q, k, v, cu_seqlens, max_seqlen, scale)


@_forward_received_op.register_fake
def _forward_received_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    return _forward_fake(q, k, v, cu_seqlens, max_seqlen, scale, True)


def _setup_context(ctx, inputs, output):
    """Both forward ops: inputs (q, k, v, cu_seqlens, max_seqlen, scale, ...), outputs (out,
    lse, a non-differentiable side output)."""
    q, k, v, cu_seqlens, ctx.max_seqlen, ctx.scale = inputs[:6]
    ctx.num_inputs = len(inputs)
    out, lse, side = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.mark_non_differentiable(lse, side)


def _backward(ctx, dout, _dlse, _dside):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, *[None] * (ctx.num_inputs - 3)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
_forward_received_op.register_autograd(_backward, setup_context=_setup_context)


def forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float,
            return_cls_attn: bool):
    """Unchecked forward -> (out, logsumexp, cls_attn) as _forward_op: the op, or where
    calls_directly its implementation. Under autocast q, k, v in autocast's dtype (as SDPA's)."""
    low = _autocast.dtype(q)
    if low is not None:
        with _autocast.off(q.device.type):
            return forward(*_autocast.cast(low, q, k, v), cu_seqlens, max_seqlen, scale, return_cls_attn)
    if exporting():  # standard ops only (sparse_ops._export)
        return equal_length_attention(q, k, v, cu_seqlens, max_seqlen, scale, "cls" if return_cls_attn else "")
    run = op_or_direct(_forward_op, "varlen_attention", "forward", _forward_torch, q, k, v)
    return run(q, k, v, cu_seqlens, max_seqlen, scale, return_cls_attn)


def forward_received(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float):
    """Unchecked forward -> (out, logsumexp, received) as _forward_received_op: the op, or where
    calls_directly its implementation. Autocast as forward."""
    low = _autocast.dtype(q)
    if low is not None:
        with _autocast.off(q.device.type):
            return forward_received(*_autocast.cast(low, q, k, v), cu_seqlens, max_seqlen, scale)
    if exporting():  # standard ops only (sparse_ops._export)
        return equal_length_attention(q, k, v, cu_seqlens, max_seqlen, scale, "received")
    run = op_or_direct(_forward_received_op, "varlen_attention", "forward_received", _forward_received_torch, q, k, v)
    return run(q, k, v, cu_seqlens, max_seqlen, scale)


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
    Under torch.autocast q, k, v are cast to autocast's dtype (out's), as for SDPA.
    """
    q, k, v = _autocast.cast(_autocast.dtype(q), q, k, v)
    check.qkv(q, k, v, "[T, H, D]")
    check.tensor(cu_seqlens, "cu_seqlens", 1, "[B+1]", dtypes=(torch.int32,))
    check.same_device(q=q, cu_seqlens=cu_seqlens)
    if not isinstance(max_seqlen, torch.SymInt):
        check.integer(max_seqlen, "max_seqlen")
    _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    scale = check.scale(scale, q.shape[2])
    if not isinstance(return_cls_attn, bool):
        raise TypeError(f"return_cls_attn must be a bool, got {type(return_cls_attn).__name__}")
    out, _, cls_attn = forward(q, k, v, cu_seqlens, max_seqlen, scale, return_cls_attn)
    return (out, cls_attn) if return_cls_attn else out
