"""window_attention: softmax attention within each of a batch of windows (the window path of a
pruned Swin block), with the relative-position bias and the shift mask looked up per window.

Dispatch, inside the custom ops (so torch.compile sees one opaque op either way):
- CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 (how the tests run the kernels):
  the Triton kernels of sparse_ops.kernels.window_attention;
- other CPU tensors, float64 on any device (the kernels accumulate in float32), and CUDA
  tensors where triton is not installed (with a warning): plain PyTorch, batched matmuls and a
  fused softmax in float32 over all windows at once.
Both recompute the probabilities in the backward: nothing but the inputs is saved.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _checks as check
from ._dispatch import implementation


# ------------------------------------------------------------------------ PyTorch path
def _probabilities(q, k, window_ids, bias, mask, scale):
    """softmax(q k^T * scale + bias + mask[window_ids]) [M, H, n, n] in float32 (float64 for
    float64 inputs), and the inputs in that dtype."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(acc), k.to(acc)
    scores = (q * scale) @ k.transpose(-1, -2)
    if bias is not None:
        scores += bias.to(acc)
    if mask is not None:
        scores += mask[window_ids].unsqueeze(1).to(acc)
    return torch.softmax(scores, dim=-1), q, k


def _forward_torch(q, k, v, window_ids, bias, mask, scale):
    p, _, _ = _probabilities(q, k, window_ids, bias, mask, scale)
    return (p @ v.to(p.dtype)).to(q.dtype)


def _backward_torch(dout, q, k, v, window_ids, bias, mask, scale, bias_grad):
    p, q_acc, k_acc = _probabilities(q, k, window_ids, bias, mask, scale)
    dout, v = dout.to(p.dtype), v.to(p.dtype)
    dp = dout @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # the gradient of the scores
    dq = (ds @ k_acc) * scale
    dk = (ds.transpose(-1, -2) @ q_acc) * scale
    dv = p.transpose(-1, -2) @ dout
    dbias = ds.sum(0).to(bias.dtype) if bias_grad else q.new_empty(0)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dbias


# -------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sparse_ops::window_attention_fwd", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, window_ids: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                scale: float) -> Tensor:
    """-> out [M, H, n, D]."""
    forward = implementation("window_attention", q, "forward", _forward_torch)
    return forward(q, k, v, window_ids, bias, mask, scale)


@_forward_op.register_fake
def _forward_fake(q, k, v, window_ids, bias, mask, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("sparse_ops::window_attention_bwd", mutates_args=())
def _backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, window_ids: Tensor, bias: Optional[Tensor],
                 mask: Optional[Tensor], scale: float, bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv [M, H, n, D] and dbias [H, n, n] (empty unless bias_grad)."""
    backward = implementation("window_attention", q, "backward", _backward_torch)
    return backward(dout, q, k, v, window_ids, bias, mask, scale, bias_grad)


@_backward_op.register_fake
def _backward_fake(dout, q, k, v, window_ids, bias, mask, scale, bias_grad):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, window_ids, bias, mask, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, window_ids, bias, mask)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[4]


def _backward(ctx, dout):
    q, k, v, window_ids, bias, mask = ctx.saved_tensors
    dq, dk, dv, dbias = _backward_op(dout, q, k, v, window_ids, bias, mask, ctx.scale, ctx.bias_grad)
    return dq, dk, dv, None, dbias if ctx.bias_grad else None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------ public op
def window_attention(q: Tensor, k: Tensor, v: Tensor, window_ids: Tensor, bias: Optional[Tensor] = None,
                     mask: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale + bias[h] + mask[window_ids[m]]) v within each window.

    q, k, v: [M, H, n, D] (M windows of n tokens, H heads), any strides, e.g. the views that
    ``qkv.reshape(M, n, 3, H, D).permute(2, 0, 3, 1, 4)`` gives. bias: the relative-position
    bias [H, n, n] in q's dtype or float32 (differentiable). mask: timm's shift mask [nW, n, n]
    (0 / -100, any float dtype; not differentiable), window m uses mask[window_ids[m]]; window_ids
    int64 [M]. scale defaults to D**-0.5. Returns out [M, H, n, D] in q's dtype.
    """
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
    return _forward_op(q, k, v, window_ids, bias, mask, check.scale(scale, D))
