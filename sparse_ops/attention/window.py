"""window_attention: softmax attention within each of a batch of windows (the window path of a
pruned Swin block), with the relative-position bias and the shift mask looked up per window,
a scale that is one number or one per head (Swin V2's learned logit scale), and SAM's
decomposed relative position (rel_h, rel_w: per query row, one term per key row and one per key
column of the window), added inside the kernels instead of as a materialised [M, H, n, n] mask.

Dispatch, inside the custom ops (so torch.compile sees one opaque op either way):
- CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 (how the tests run the kernels):
  the Triton kernels of sparse_ops.kernels.window_attention;
- other CPU tensors, float64 on any device (the kernels accumulate in float32), and CUDA
  tensors where triton is not installed (with a warning): plain PyTorch in float32 over all
  windows at once. On the CPU torch's flash kernel, forward and backward (the backward from
  the forward's output and logsumexp), the relative-position bias and the shift mask as one
  additive mask (with rel_h and rel_w expanded into it); elsewhere, and on the CPU where the
  bias or rel_h and rel_w need their gradient (the flash backward gives none), batched matmuls
  and a fused softmax.
The kernels recompute the probabilities in the backward from the inputs alone; the CPU flash
path also saves its output and logsumexp (the logsumexp output is empty elsewhere). In eager
mode on the CPU the blocks and the public op skip the custom ops: without autograd they call
the PyTorch path itself, with autograd the same math in torch's differentiable ops (see
_forward_autograd).
"""
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _autocast, _checks as check, reference
from .._export import exporting
from . import _dispatch


# ------------------------------------------------------------------------ PyTorch path
def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the arithmetic and of the logsumexp: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _full_scale(scale, head_scale, acc):
    """The scale as a number or a [1, H, 1, 1] tensor in dtype acc."""
    return scale if head_scale is None else scale * head_scale.to(acc).view(1, -1, 1, 1)


def _rel_scores(rel_h, rel_w, acc):
    """SAM's relative position as scores [M, H, n, n] in dtype acc: rel_h [M, H, n, wh] at each
    key's row plus rel_w [M, H, n, ww] at its column (keys row-major in the window)."""
    return (_to(rel_h, acc)[..., :, None] + _to(rel_w, acc)[..., None, :]).flatten(-2)


def _probabilities(q, k, window_ids, bias, mask, scale, head_scale, rel_h=None, rel_w=None):
    """softmax(q k^T * scale * head_scale[h] + bias + mask[window_ids] + rel) [M, H, n, n] in
    float32 (float64 for float64 inputs), and the inputs in that dtype."""
    acc = _stat_dtype(q.dtype)
    q, k = q.to(acc), k.to(acc)
    scores = (q * _full_scale(scale, head_scale, acc)) @ k.transpose(-1, -2)
    if bias is not None:
        scores += bias.to(acc)
    if mask is not None:
        scores += mask[window_ids].unsqueeze(1).to(acc)
    if rel_h is not None:
        scores += _rel_scores(rel_h, rel_w, acc)
    return torch.softmax(scores, dim=-1), q, k


def _cpu_flash(q: Tensor) -> bool:
    """Whether the PyTorch path of q's op runs torch's CPU flash kernel."""
    return q.device.type == "cpu" and not _dispatch.use_triton("window_attention", q)


def _heads_inner(t: Tensor) -> Tensor:
    """t [M, H, n, ...] with its memory in [M, n, H, ...] order (a copy only where it is not):
    the layout torch's CPU flash kernel gives for timm's qkv views, in which out.transpose(1, 2)
    is already the [M, n, H * D] rows the proj GEMM reads, and the one the fake functions
    promise for this path."""
    swapped = t.transpose(1, 2)
    return t if swapped.is_contiguous() else swapped.contiguous().transpose(1, 2)


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _forward_torch(q, k, v, window_ids, bias, mask, scale, head_scale=None, rel_h=None, rel_w=None):
    """-> out, logsumexp [M, H, n] (empty off the CPU)."""
    if q.device.type == "cpu":
        return _forward_cpu_flash(q, k, v, window_ids, bias, mask, scale, head_scale, rel_h, rel_w)
    p, _, _ = _probabilities(q, k, window_ids, bias, mask, scale, head_scale, rel_h, rel_w)
    return (p @ v.to(p.dtype)).to(q.dtype), q.new_empty(0, dtype=p.dtype)


def _additive_mask(window_ids, bias, mask, acc, rel_h=None, rel_w=None):
    """bias + mask[window_ids] + rel as one additive mask in dtype acc, broadcast ([1, H, n, n]
    or [M, 1, n, n]) where only bias or only mask is given; None without any."""
    terms = [] if bias is None else [_to(bias, acc).unsqueeze(0)]  # [1, H, n, n]
    if mask is not None:
        terms.append(_to(mask[window_ids], acc).unsqueeze(1))  # [M, 1, n, n]
    if rel_h is not None:
        terms.append(_rel_scores(rel_h, rel_w, acc))  # [M, H, n, n]
    return sum(terms[1:], terms[0]) if terms else None


def _flash_inputs(q, k, v, head_scale):
    """q, k, v in the arithmetic's dtype, the per-head scale folded into q."""
    acc = _stat_dtype(q.dtype)
    q, k, v = _to(q, acc), _to(k, acc), _to(v, acc)
    if head_scale is not None:
        q = q * head_scale.to(acc).view(1, -1, 1, 1)
    return q, k, v


def _forward_cpu_flash(q, k, v, window_ids, bias, mask, scale, head_scale, rel_h=None, rel_w=None):
    """The forward on the CPU: torch's flash kernel (what SDPA runs there, reading q, k, v
    through their strides, no score matrix in memory) with bias + mask[window_ids] + rel as one
    additive mask; the per-head scale folded into q."""
    dtype = q.dtype
    q, k, v = _flash_inputs(q, k, v, head_scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
        q, k, v, 0.0, False, attn_mask=_additive_mask(window_ids, bias, mask, q.dtype, rel_h, rel_w), scale=scale)
    return _heads_inner(_to(out, dtype)), _heads_inner(lse)


def _backward_cpu_flash(dout, q, k, v, out, lse, window_ids, bias, mask, scale, head_scale):
    """The backward on the CPU without a bias or rel gradient: torch's flash backward from the
    forward's output and logsumexp. With a per-head scale folded into q (q' = q * s[h]):
    dq = dq' * s[h], and d/ds[h] = sum(dq' * q) over that head."""
    dtype = q.dtype
    q_in = q
    q, k, v = _flash_inputs(q, k, v, head_scale)
    acc = q.dtype
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
        _to(dout, acc), q, k, v, _to(out, acc), lse, 0.0, False,
        attn_mask=_additive_mask(window_ids, bias, mask, acc), scale=scale)
    dhead_scale = q.new_empty(0, dtype=torch.float32)
    if head_scale is not None:
        dhead_scale = (dq * q_in.to(acc)).sum((0, 2, 3)).to(head_scale.dtype)
        dq = dq * head_scale.to(acc).view(1, -1, 1, 1)
    return (*(_heads_inner(_to(g, dtype)) for g in (dq, dk, dv)), q.new_empty(0), dhead_scale, q.new_empty(0),
            q.new_empty(0))


def _backward_torch(dout, q, k, v, out, lse, window_ids, bias, mask, scale, bias_grad, head_scale=None, rel_h=None,
                    rel_w=None):
    if q.device.type == "cpu" and not bias_grad and rel_h is None:
        return _backward_cpu_flash(dout, q, k, v, out, lse, window_ids, bias, mask, scale, head_scale)
    p, q_acc, k_acc = _probabilities(q, k, window_ids, bias, mask, scale, head_scale, rel_h, rel_w)
    dout, v = dout.to(p.dtype), v.to(p.dtype)
    dp = dout @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # the gradient of the scores
    ds_k = ds @ k_acc
    full = _full_scale(scale, head_scale, p.dtype)
    dq = ds_k * full
    dk = (ds.transpose(-1, -2) @ q_acc) * full
    dv = p.transpose(-1, -2) @ dout
    dbias = ds.sum(0).to(bias.dtype) if bias_grad else q.new_empty(0)
    # d(scores)/d(head_scale[h]) = scale * q k^T, so the gradient is scale * sum(q * (dS k))
    dhead_scale = q.new_empty(0, dtype=torch.float32) if head_scale is None else \
        ((q_acc * ds_k).sum((0, 2, 3)) * scale).to(head_scale.dtype)
    drel_h, drel_w = q.new_empty(0), q.new_empty(0)
    if rel_h is not None:  # the sums of dS over the keys of each window row and column
        ds_grid = ds.unflatten(-1, (rel_h.shape[-1], rel_w.shape[-1]))  # [M, H, n, wh, ww]
        drel_h, drel_w = ds_grid.sum(-1).to(rel_h.dtype), ds_grid.sum(-2).to(rel_w.dtype)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dbias, dhead_scale, drel_h, drel_w


# -------------------------------------------------------------------------- custom ops
def _triton_forward(forward):
    """A kernel forward with the op's (out, logsumexp) result: the kernels save nothing."""
    def run(q, *args):
        return forward(q, *args), q.new_empty(0, dtype=_stat_dtype(q.dtype))
    return run


@torch.library.custom_op("sparse_ops::window_attention_fwd", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, window_ids: Tensor, bias: Optional[Tensor],
                  mask: Optional[Tensor], scale: float, head_scale: Optional[Tensor] = None,
                  rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """-> out [M, H, n, D] and the logsumexp [M, H, n] the CPU flash backward reads (float32;
    float64 for float64 inputs; empty off the CPU's PyTorch path). head_scale: [H]
    multiplying scale (in the logsumexp's dtype), or None. rel_h [M, H, n, wh], rel_w
    [M, H, n, ww]: SAM's decomposed relative position (both or neither), or None."""
    return _forward_function(q)(q, k, v, window_ids, bias, mask, scale, head_scale, rel_h, rel_w)


def _forward_function(q: Tensor):
    """What the forward op runs for q: the Triton kernel or the PyTorch path."""
    if _dispatch.use_triton("window_attention", q):
        return _triton_forward(_dispatch.triton_kernels("window_attention").forward)
    return _forward_torch


def _like_q(q: Tensor, heads_inner: bool, *tail: int, dtype=None) -> Tensor:
    """An empty [M, H, n, *tail] in q's dtype (or dtype), its memory in [M, n, H, *tail]
    order where heads_inner (see _heads_inner), else contiguous."""
    M, H, n, _ = q.shape
    if heads_inner:
        return q.new_empty(M, n, H, *tail, dtype=dtype).transpose(1, 2)
    return q.new_empty(M, H, n, *tail, dtype=dtype)


@_attention_op.register_fake
def _forward_fake(q, k, v, window_ids, bias, mask, scale, head_scale=None, rel_h=None, rel_w=None):
    stat = _stat_dtype(q.dtype)
    if _cpu_flash(q):
        return _like_q(q, True, q.shape[3]), _like_q(q, True, dtype=stat)
    return q.new_empty(q.shape), q.new_empty(0, dtype=stat)


@torch.library.custom_op("sparse_ops::window_attention_bwd", mutates_args=())
def _backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, window_ids: Tensor,
                 bias: Optional[Tensor], mask: Optional[Tensor], scale: float, bias_grad: bool,
                 head_scale: Optional[Tensor] = None, rel_h: Optional[Tensor] = None,
                 rel_w: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv [M, H, n, D], dbias [H, n, n] (empty unless bias_grad), dhead_scale [H]
    in head_scale's dtype (empty without head_scale), drel_h and drel_w in rel_h's and rel_w's
    shapes and dtypes (empty without them). out, lse: the forward's results (read by the CPU
    flash backward only; empty tensors may stand for them elsewhere)."""
    if _dispatch.use_triton("window_attention", q):
        return _dispatch.triton_kernels("window_attention").backward(dout, q, k, v, window_ids, bias, mask, scale,
                                                                     bias_grad, head_scale, rel_h, rel_w)
    return _backward_torch(dout, q, k, v, out, lse, window_ids, bias, mask, scale, bias_grad, head_scale, rel_h,
                           rel_w)


@_backward_op.register_fake
def _backward_fake(dout, q, k, v, out, lse, window_ids, bias, mask, scale, bias_grad, head_scale=None, rel_h=None,
                   rel_w=None):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    dhead_scale = q.new_empty(0, dtype=torch.float32) if head_scale is None else head_scale.new_empty(head_scale.shape)
    drel_h, drel_w = (q.new_empty(0) if t is None else t.new_empty(t.shape) for t in (rel_h, rel_w))
    heads_inner = _cpu_flash(q) and not bias_grad and rel_h is None
    return (*(_like_q(q, heads_inner, q.shape[3]) for _ in range(3)), dbias, dhead_scale, drel_h, drel_w)


def _setup_context(ctx, inputs, output):
    q, k, v, window_ids, bias, mask, ctx.scale, head_scale, rel_h, rel_w = inputs
    out, lse = output
    # the output is kept only for the CPU flash backward (the kernels and matmuls recompute)
    ctx.save_for_backward(q, k, v, out if _cpu_flash(q) else lse, lse, window_ids, bias, mask, head_scale, rel_h,
                          rel_w)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[4]
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, window_ids, bias, mask, head_scale, rel_h, rel_w = ctx.saved_tensors
    dq, dk, dv, dbias, dhead_scale, drel_h, drel_w = _backward_op(
        dout, q, k, v, out, lse, window_ids, bias, mask, ctx.scale, ctx.bias_grad, head_scale, rel_h, rel_w)
    dhead_scale = dhead_scale if head_scale is not None and ctx.needs_input_grad[7] else None
    # (needs_input_grad covers only the arguments given: check rel_h and rel_w are)
    drel_h = drel_h if rel_h is not None and ctx.needs_input_grad[8] else None
    drel_w = drel_w if rel_w is not None and ctx.needs_input_grad[9] else None
    return dq, dk, dv, None, dbias if ctx.bias_grad else None, None, None, dhead_scale, drel_h, drel_w


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _forward_autograd(q, k, v, window_ids, bias, mask, scale, head_scale, rel_h=None, rel_w=None):
    """The CPU PyTorch path for eager mode with autograd, built from torch's differentiable ops
    so that its own C++ autograd runs the backward: SDPA's flash kernel, or its math path where
    the bias or rel_h and rel_w need a gradient. Per call this saves the custom op's dispatch and a Python
    autograd Function, ~0.3 ms of a Swin-T stage-2 window attention's 1.3 ms forward and
    backward at batch 1. In exchange autograd keeps the additive mask [M, H, n, n] for the
    backward, as timm's WindowAttention does, where the op would build it again."""
    dtype = q.dtype
    q, k, v = _flash_inputs(q, k, v, head_scale)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_additive_mask(window_ids, bias, mask, q.dtype, rel_h,
                                                                           rel_w), scale=scale)
    return _to(out, dtype)


def _forward_op(q: Tensor, k: Tensor, v: Tensor, window_ids: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                scale: float, head_scale: Optional[Tensor] = None, rel_h: Optional[Tensor] = None,
                rel_w: Optional[Tensor] = None) -> Tensor:
    """The op's output [M, H, n, D], unchecked (for the sparse blocks, whose inputs are valid
    by construction). Where _dispatch.calls_directly, what the custom op would run; in eager
    mode on the CPU's PyTorch path with autograd, the same math in torch's differentiable ops
    (_forward_autograd); else the custom op. Under autocast q, k, v in autocast's dtype (as
    SDPA's), bias, mask, head_scale, rel_h and rel_w as given."""
    low = _autocast.dtype(q)
    if low is not None:
        with _autocast.off(q.device.type):
            return _forward_op(*_autocast.cast(low, q, k, v), window_ids, bias, mask, scale, head_scale, rel_h, rel_w)
    if exporting():  # standard ops only (sparse_ops._export), in float32 as the kernels
        stat = _stat_dtype(q.dtype)
        full_scale = scale if head_scale is None else head_scale.to(stat) * scale
        rel = [None if t is None else t.to(stat) for t in (rel_h, rel_w)]
        return reference.window_attention(q.to(stat), k.to(stat), v.to(stat), window_ids, bias, mask,
                                          full_scale, *rel).to(q.dtype)
    args = (q, k, v, window_ids, bias, mask, scale, head_scale, rel_h, rel_w)
    if _dispatch.calls_directly(q, k, v, bias, head_scale, rel_h, rel_w):
        return _forward_function(q)(*args)[0]
    # (M == 0: SDPA gives an empty batch no gradient path to the mask, hence the bias)
    if torch.compiler.is_compiling() or not _cpu_flash(q) or q.shape[0] == 0:
        return _attention_op(*args)[0]
    return _forward_autograd(*args)


# ------------------------------------------------------------ SAM's relative position
def decomposed_rel_pos(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, window: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """SAM's decomposed relative position of q [M, H, n, D] (any strides) in windows of
    window = (wh, ww) tokens, n = wh * ww in row-major order, from timm's tables rel_pos_h
    [Lh, D] and rel_pos_w [Lw, D] (linearly resized to 2 * w - 1 entries where their length
    differs, as timm's get_rel_pos): rel_h [M, H, n, wh] = q_i . Rh[row of i, a] and rel_w
    [M, H, n, ww] = q_i . Rw[column of i, b], in q's dtype, differentiable in q and the tables.
    window_attention(..., rel_pos=(rel_h, rel_w)) adds rel_h[i, j // ww] + rel_w[i, j % ww]
    to the logits, not scaled, as timm's get_decomposed_rel_pos_bias does."""
    wh, ww = window
    Rh, Rw = (reference.rel_pos_table(size, table).to(q.dtype) for size, table in ((wh, rel_pos_h), (ww, rel_pos_w)))
    grid = q.unflatten(2, (wh, ww))  # [M, H, wh, ww, D], a view at any strides
    rel_h = torch.einsum("mhyxd,yad->mhyxa", grid, Rh)
    rel_w = torch.einsum("mhyxd,xbd->mhyxb", grid, Rw)
    return rel_h.flatten(2, 3), rel_w.flatten(2, 3)


def _check_rel_pos(rel_pos, q: Tensor) -> tuple[Tensor, Tensor]:
    """rel_pos = (rel_h [M, H, n, wh], rel_w [M, H, n, ww]) with wh * ww = n, checked against q."""
    if not isinstance(rel_pos, (tuple, list)) or len(rel_pos) != 2:
        raise TypeError(f"rel_pos must be a pair (rel_h, rel_w), got {type(rel_pos).__name__}")
    M, H, n, _ = q.shape
    rel_h, rel_w = rel_pos
    for name, t, what in (("rel_pos[0] (rel_h)", rel_h, "[M, H, n, wh]"), ("rel_pos[1] (rel_w)", rel_w, "[M, H, n, ww]")):
        check.tensor(t, name, 4, what, dtypes=(q.dtype, torch.float32))
        if t.shape[:3] != (M, H, n):
            raise ValueError(f"{name} must have shape {what} with [M, H, n] = [{M}, {H}, {n}], got {list(t.shape)}")
    if rel_h.shape[3] * rel_w.shape[3] != n:
        raise ValueError(f"rel_pos must cover windows of wh x ww = n = {n} tokens, got rel_h's wh = {rel_h.shape[3]} "
                         f"and rel_w's ww = {rel_w.shape[3]}")
    check.same_device(q=q, rel_h=rel_h, rel_w=rel_w)
    return rel_h, rel_w


# ------------------------------------------------------------------------ public op
def window_attention(q: Tensor, k: Tensor, v: Tensor, window_ids: Tensor, bias: Optional[Tensor] = None,
                     mask: Optional[Tensor] = None, scale: Union[None, float, Tensor] = None,
                     rel_pos: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """softmax(q k^T * scale + bias[h] + mask[window_ids[m]] + rel) v within each window.

    q, k, v: [M, H, n, D] (M windows of n tokens, H heads), any strides, e.g. the views that
    ``qkv.reshape(M, n, 3, H, D).permute(2, 0, 3, 1, 4)`` gives. bias: the relative-position
    bias [H, n, n] in q's dtype or float32 (differentiable). mask: timm's shift mask [nW, n, n]
    (0 / -100, any float dtype; not differentiable), window m uses mask[window_ids[m]]; window_ids
    int64 [M]. scale: a number (default D**-0.5) or a tensor [H], one per head (Swin V2's
    clamped exp(logit_scale), differentiable; computed in float32). rel_pos: SAM's decomposed
    relative position (rel_h [M, H, n, wh], rel_w [M, H, n, ww]) of windows of wh x ww tokens
    (row-major, wh * ww = n), in q's dtype or float32, any strides, differentiable, as
    decomposed_rel_pos gives it: rel[m, h, i, j] = rel_h[m, h, i, j // ww] + rel_w[m, h, i, j % ww],
    not scaled, added inside the kernel (nothing [M, H, n, n] in memory on CUDA). Returns out
    [M, H, n, D] in q's dtype. Under torch.autocast q, k, v are cast to autocast's dtype (out's),
    as for SDPA.
    """
    q, k, v = _autocast.cast(_autocast.dtype(q), q, k, v)
    check.qkv(q, k, v, "[M, H, n, D]")
    M, H, n, D = q.shape
    check.index(window_ids, "window_ids", 1, "[M]")
    if window_ids.shape[0] != M:
        raise ValueError(f"window_ids must have one entry per window (M = {M}), got {window_ids.shape[0]}")
    check.same_device(q=q, window_ids=window_ids)
    if bias is not None:
        check.tensor(bias, "bias", 3, "[H, n, n]", dtypes=(q.dtype, torch.float32))
        if bias.shape != (H, n, n):
            raise ValueError(f"bias must have shape [H, n, n] = [{H}, {n}, {n}], got {list(bias.shape)}")
        check.same_device(q=q, bias=bias)
    if mask is not None:
        check.tensor(mask, "mask", 3, "[nW, n, n]")
        if mask.shape[1:] != (n, n):
            raise ValueError(f"mask must have shape [nW, n, n] = [nW, {n}, {n}], got {list(mask.shape)}")
        check.same_device(q=q, mask=mask)
        check.in_range(window_ids, "window_ids", 0, mask.shape[0])
    rel_h, rel_w = (None, None) if rel_pos is None else _check_rel_pos(rel_pos, q)
    if isinstance(scale, Tensor):
        check.tensor(scale, "scale", 1, "[H]")
        if scale.shape[0] != H:
            raise ValueError(f"scale must be a number or have one entry per head ([H] = [{H}]), got {list(scale.shape)}")
        check.same_device(q=q, scale=scale)
        stat = torch.float64 if q.dtype == torch.float64 else torch.float32
        return _forward_op(q, k, v, window_ids, bias, mask, 1.0, scale.to(stat), rel_h, rel_w)
    return _forward_op(q, k, v, window_ids, bias, mask, check.scale(scale, D), None, rel_h, rel_w)
