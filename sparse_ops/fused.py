"""The GEMMs of a pruned block with their gather and scatter fused in (the prologue and
epilogue of the block's first and last Linear), so that pruned rows cost no memory traffic:

- ``gather_layernorm_linear``: ``LN(x[rows]) @ W.T + b``; the gathered, normalised rows never
  exist in memory (the kernel normalises its tiles as it loads them). A padding row (-1) is
  zero after the norm, as timm pads after norm1, so its output is the bias.
- ``linear_residual_scatter``: ``out[rows] = residual + h @ W.T + b`` written straight to the
  dense positions; the other rows of out are base's. In place (out is base) when asked and no
  gradient is needed; a new tensor otherwise.

Dispatch, inside the custom ops (torch.compile sees one opaque op): the Triton kernels of
sparse_ops.kernels.fused_linear on CUDA tensors and under TRITON_INTERPRET=1; plain PyTorch
(float32 statistics, stock matmuls) for other CPU tensors and for float64. In eager CPU
inference (see _dispatch.calls_directly) the callers skip the custom op and call what it would
run.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _autocast, _checks as check
from . import _packed_linear, reference
from ._export import exporting
from ._backend import kernel
from .attention._dispatch import calls_directly, implementation, op_or_direct


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather(x: Tensor, rows: Optional[Tensor]) -> Tensor:
    return x if rows is None else kernel("gather_rows", x.device.type)(x, rows)


def layernorm_linear(x: Tensor, rows: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                     eps: float, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Unchecked ``LN(x[rows]) @ weight.T + bias`` (see gather_layernorm_linear): the custom op,
    or where _dispatch.calls_directly its implementation. Under autocast the Linear runs in
    autocast's dtype, the LayerNorm on x as given (see sparse_ops._autocast)."""
    if exporting():  # standard ops only (sparse_ops._export), which torch's autocast casts itself
        return reference.gather_layernorm_linear(x, rows, ln_weight, ln_bias, weight, bias, eps)
    low = _autocast.dtype(x)
    if low is not None:
        weight, bias = _autocast.cast(low, weight, bias)
        with _autocast.off(x.device.type):
            return layernorm_linear(x, rows, ln_weight, ln_bias, eps, weight, bias)
    run = op_or_direct(_ln_linear_op, "fused_linear", "ln_linear_forward", _ln_linear_forward_torch,
                       x, ln_weight, ln_bias, weight, bias)
    return run(x, rows, ln_weight, ln_bias, eps, weight, bias)[0]


def linear_scatter(h: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], base: Tensor,
                   rows: Optional[Tensor]) -> Tensor:
    """Unchecked: a copy of base with ``out[rows] = residual + h @ weight.T + bias``: the custom
    op, or where _dispatch.calls_directly what it runs. Under autocast the Linear runs in
    autocast's dtype; residual, base and out keep theirs."""
    if exporting():  # standard ops only (sparse_ops._export)
        return reference.linear_residual_scatter(h, weight, bias, base, rows, residual)
    low = _autocast.dtype(h)
    if low is not None:
        h, weight, bias = _autocast.cast(low, h, weight, bias)
        with _autocast.off(h.device.type):
            return linear_scatter(h, weight, bias, residual, base, rows)
    run = _linear_scatter_copy if calls_directly(h, weight, bias, residual, base) else _linear_scatter_op
    return run(h, weight, bias, residual, base, rows)


def linear_scatter_(h: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], out: Tensor,
                    rows: Optional[Tensor]) -> None:
    """Unchecked in-place ``out[rows] = residual + h @ weight.T + bias`` (autograd off for these
    tensors): the custom op, or where _dispatch.calls_directly its implementation. Autocast
    as linear_scatter."""
    if exporting():  # standard ops only (sparse_ops._export)
        out.copy_(reference.linear_residual_scatter(h, weight, bias, out, rows, residual))
        return
    low = _autocast.dtype(h)
    if low is not None:
        h, weight, bias = _autocast.cast(low, h, weight, bias)
        with _autocast.off(h.device.type):
            return linear_scatter_(h, weight, bias, residual, out, rows)
    run = op_or_direct(_linear_scatter_inplace_op, "fused_linear", "linear_scatter_", _linear_scatter_torch,
                       h, weight, bias, residual, out)
    run(h, weight, bias, residual, out, rows)


# ------------------------------------------------------------------------ PyTorch path
def _has_padding(rows: Optional[Tensor]) -> bool:
    """Whether rows holds a padding row (-1). Asked only where it saves a pass over the rows'
    data (most window grids have no padding); a host sync, so on the CPU only: elsewhere
    (float64 on CUDA) the padding is assumed."""
    if rows is None or rows.numel() == 0:
        return False
    return rows.device.type != "cpu" or rows.min().item() < 0


def _ln_linear_forward_torch(x, rows, ln_weight, ln_bias, eps, weight, bias):
    xg = _gather(x, rows)
    stat = _stat_dtype(x.dtype)
    if ln_weight is None:
        mean, rstd = x.new_empty(0, dtype=stat), x.new_empty(0, dtype=stat)
        xn = xg
    else:
        xn, mean, rstd = torch.native_layer_norm(xg, [xg.shape[1]], ln_weight, ln_bias, eps)
        mean, rstd = mean.view(-1).to(stat), rstd.view(-1).to(stat)
        if _has_padding(rows):  # padding rows are zero after the norm (xn is ours to write)
            xn.masked_fill_((rows < 0).unsqueeze(1), 0)
    # the GEMM in weight's dtype: x's, or under autocast the Linear's (x stays float32);
    # x requiring grad: autograd records this op (a training step), no packed weight
    return _packed_linear.linear(xn.to(weight.dtype), weight, bias, recorded=x.requires_grad), mean, rstd


def _ln_linear_backward_torch(dout, x, rows, ln_weight, ln_bias, mean, rstd, weight, needs_input_grads):
    need_x, need_lnw, need_lnb, need_w, need_b = needs_input_grads
    stat = _stat_dtype(x.dtype)
    xg = _gather(x, rows).to(stat)
    g = dout.to(stat)
    db = g.sum(0).to(weight.dtype) if need_b else None  # a padding row's output is the bias
    dxn = g @ weight.to(stat)
    padding = _has_padding(rows)
    if padding:
        dxn.masked_fill_((rows < 0).unsqueeze(1), 0)  # padding rows are zero after the norm
    if ln_weight is None:
        xn, dxg, dlnw, dlnb = xg, dxn, None, None
    else:
        xhat = (xg - mean.unsqueeze(1)) * rstd.unsqueeze(1)
        xn = xhat * ln_weight.to(stat) + ln_bias.to(stat)
        if padding:
            xn.masked_fill_((rows < 0).unsqueeze(1), 0)
        dlnw = (dxn * xhat).sum(0).to(ln_weight.dtype) if need_lnw else None
        dlnb = dxn.sum(0).to(ln_bias.dtype) if need_lnb else None
        dxhat = dxn * ln_weight.to(stat)
        dxg = rstd.unsqueeze(1) * (dxhat - dxhat.mean(1, keepdim=True) - xhat * (dxhat * xhat).mean(1, keepdim=True))
    dx = None
    if need_x:
        dxg = dxg.to(x.dtype)
        dx = dxg if rows is None else kernel("scatter_add_rows", x.device.type)(dxg, rows, x.shape[0])
    dw = (g.t() @ xn).to(weight.dtype) if need_w else None
    return dx, dlnw, dlnb, dw, db


def _linear_scatter_torch(h, weight, bias, residual, out, rows):
    acc = _stat_dtype(h.dtype)  # one rounding at the end, as the kernel does
    res = (residual if residual is not None else _gather(out, rows)).to(acc)
    recorded = h.requires_grad or res.requires_grad  # autograd records this op: no packed weight
    y = _packed_linear.linear(h.to(acc), weight.to(acc), None if bias is None else bias.to(acc), res,
                              recorded=recorded).to(out.dtype)
    if rows is None:
        out.copy_(y)
    elif _has_padding(rows):
        keep = rows >= 0
        out.index_copy_(0, rows[keep], y[keep])
    else:
        out.index_copy_(0, rows, y)


# -------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sparse_ops::layernorm_linear_fwd", mutates_args=())
def _ln_linear_op(x: Tensor, rows: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                  eps: float, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """-> out [R, N] in weight's dtype (x's, except under autocast), and each gathered row's
    mean and rstd (float32 [R]; empty without a norm)."""
    forward = implementation("fused_linear", x, "ln_linear_forward", _ln_linear_forward_torch)
    return forward(x, rows, ln_weight, ln_bias, eps, weight, bias)


@_ln_linear_op.register_fake
def _ln_linear_fake(x, rows, ln_weight, ln_bias, eps, weight, bias):
    R = x.shape[0] if rows is None else rows.shape[0]
    stat = _stat_dtype(x.dtype)
    n_stat = 0 if ln_weight is None else R
    return (x.new_empty(R, weight.shape[0], dtype=weight.dtype), x.new_empty(n_stat, dtype=stat),
            x.new_empty(n_stat, dtype=stat))


@torch.library.custom_op("sparse_ops::layernorm_linear_bwd", mutates_args=())
def _ln_linear_backward_op(dout: Tensor, x: Tensor, rows: Optional[Tensor], ln_weight: Optional[Tensor],
                           ln_bias: Optional[Tensor], mean: Tensor, rstd: Tensor, weight: Tensor,
                           needs_input_grads: Sequence[bool]) -> list[Tensor]:
    """-> [dx, dln_weight, dln_bias, dweight, dbias]; an empty tensor where not needed."""
    backward = implementation("fused_linear", x, "ln_linear_backward", _ln_linear_backward_torch)
    grads = backward(dout, x, rows, ln_weight, ln_bias, mean, rstd, weight, tuple(needs_input_grads))
    return [x.new_empty(0) if g is None else g for g in grads]


@_ln_linear_backward_op.register_fake
def _ln_linear_backward_fake(dout, x, rows, ln_weight, ln_bias, mean, rstd, weight, needs_input_grads):
    like = (x, ln_weight, ln_bias, weight, weight.new_empty(weight.shape[0]))
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip(like, needs_input_grads)]


def _ln_linear_setup(ctx, inputs, output):
    x, rows, ln_weight, ln_bias, ctx.eps, weight, bias = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, rows, ln_weight, ln_bias, mean, rstd, weight)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.has_bias = bias is not None


def _ln_linear_backward(ctx, dout, _dmean, _drstd):
    x, rows, ln_weight, ln_bias, mean, rstd, weight = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[3], n[5], n[6] and ctx.has_bias]
    grads = _ln_linear_backward_op(dout, x, rows, ln_weight, ln_bias, mean, rstd, weight, needs)
    dx, dlnw, dlnb, dw, db = (g if need else None for g, need in zip(grads, needs))
    return dx, None, dlnw, dlnb, None, dw, db


_ln_linear_op.register_autograd(_ln_linear_backward, setup_context=_ln_linear_setup)


@torch.library.custom_op("sparse_ops::linear_scatter_", mutates_args=("out",))
def _linear_scatter_inplace_op(h: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                               out: Tensor, rows: Optional[Tensor]) -> None:
    """out[rows] = (residual or out[rows]) + h @ weight.T + bias, in place."""
    scatter = implementation("fused_linear", h, "linear_scatter_", _linear_scatter_torch)
    scatter(h, weight, bias, residual, out, rows)


@_linear_scatter_inplace_op.register_fake
def _linear_scatter_inplace_fake(h, weight, bias, residual, out, rows):
    return None


@torch.library.custom_op("sparse_ops::linear_scatter", mutates_args=())
def _linear_scatter_op(h: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], base: Tensor,
                       rows: Optional[Tensor]) -> Tensor:
    """A copy of base with out[rows] = (residual or base[rows]) + h @ weight.T + bias."""
    return _linear_scatter_copy(h, weight, bias, residual, base, rows)


def _linear_scatter_copy(h, weight, bias, residual, base, rows):
    out = base.clone(memory_format=torch.contiguous_format)
    scatter = implementation("fused_linear", h, "linear_scatter_", _linear_scatter_torch)
    scatter(h, weight, bias, residual, out, rows)
    return out


@_linear_scatter_op.register_fake
def _linear_scatter_fake(h, weight, bias, residual, base, rows):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


def _linear_scatter_setup(ctx, inputs, output):
    h, weight, bias, residual, base, rows = inputs
    ctx.save_for_backward(h, weight, rows)
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _linear_scatter_backward(ctx, grad):
    h, weight, rows = ctx.saved_tensors
    n = ctx.needs_input_grad
    g = _gather(grad, rows)  # the gradient of the written rows (zeros for padding rows)
    dh = dweight = dbias = dresidual = dbase = None
    if n[0]:  # grad[rows] @ W: the gather fused into the GEMM's load
        dh = _ln_linear_op(grad, rows, None, None, 0.0, weight.t(), None)[0]
    if n[1]:  # (under autocast g has base's dtype, h the Linear's: the GEMM in h's, as autocast's)
        dweight = (g.to(h.dtype).t() @ h).to(weight.dtype)
    if n[2] and ctx.has_bias:
        dbias = g.sum(0).to(weight.dtype)
    if n[3] and ctx.has_residual:
        dresidual = g
    if n[4]:  # with a residual, base's written rows are overwritten: they get no gradient
        if not ctx.has_residual:
            dbase = grad
        elif rows is None:
            dbase = torch.zeros_like(grad)
        else:
            dbase = kernel("scatter_rows", grad.device.type)(g.new_zeros(g.shape), rows, grad)
    return dh, dweight, dbias, dresidual, dbase, None


_linear_scatter_op.register_autograd(_linear_scatter_backward, setup_context=_linear_scatter_setup)


# ------------------------------------------------------------------------ public ops
def _check_rows(rows, name: str, num_rows: int, unique: bool) -> None:
    if rows is None:
        return
    check.index(rows, name, 1, "[R]")
    check.in_range(rows, name, -1, num_rows)
    if unique:
        check.unique_rows(rows, name)


def _check_linear(weight, bias, in_features: int, dtype, name_in: str) -> None:
    check.tensor(weight, "weight", 2, "[N, K]")
    if weight.shape[1] != in_features:
        raise ValueError(f"weight must have {name_in}'s {in_features} input features, got shape {list(weight.shape)}")
    if weight.dtype != dtype:
        raise TypeError(f"weight must have {name_in}'s dtype {dtype}, got {weight.dtype}")
    if bias is not None:
        check.tensor(bias, "bias", 1, "[N]", dtypes=(dtype,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (weight's N), got {list(bias.shape)}")


def gather_layernorm_linear(x: Tensor, rows: Optional[Tensor], norm_weight: Optional[Tensor],
                            norm_bias: Optional[Tensor], weight: Tensor, bias: Optional[Tensor] = None,
                            eps: float = 1e-5) -> Tensor:
    """``LayerNorm(x[rows]) @ weight.T + bias`` -> [R, N] in x's dtype, without writing the
    gathered or normalised rows. Under torch.autocast: the Linear in autocast's dtype (so is
    the output), the LayerNorm in float32 on x as given (its parameters may be float32).

    x: [R0, C] (rows of a dense activation, unit column stride); rows: int64 [R], -1 for a
    padding row (zero after the norm, so its output is the bias), or None for every row of x
    (rows may repeat: their gradients add up). norm_weight, norm_bias: the LayerNorm's [C]
    affine parameters (both None: no norm, a gathered Linear). weight [N, C], bias [N] or None.
    """
    check.tensor(x, "x", 2, "[R, C]")
    low = _autocast.dtype(x)
    weight, bias = _autocast.cast(low, weight, bias)  # as F.linear under autocast
    _check_linear(weight, bias, x.shape[1], low or x.dtype, "autocast" if low else "x")
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("pass both norm_weight and norm_bias, or neither")
    if norm_weight is not None:
        for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
            check.tensor(t, name, 1, "[C]", dtypes=(x.dtype,) if low is None else (x.dtype, torch.float32))
            if t.shape[0] != x.shape[1]:
                raise ValueError(f"{name} must have shape [{x.shape[1]}] (x's C), got {list(t.shape)}")
    check.same_device(x=x, weight=weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias, rows=rows)
    _check_rows(rows, "rows", x.shape[0], unique=False)
    if x.stride(1) != 1:
        x = x.contiguous()
    return layernorm_linear(x, rows, norm_weight, norm_bias, float(eps), weight, bias)


def linear_residual_scatter(h: Tensor, weight: Tensor, bias: Optional[Tensor], base: Tensor, rows: Optional[Tensor],
                            residual: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
    """base [R0, N] with ``out[rows[r]] = residual[r] + h[r] @ weight.T + bias`` (residual
    defaults to base[rows]), written straight to those rows; rows of -1 are skipped, the
    others must be unique; rows=None means every row (R = R0).

    inplace=True writes into base and returns it (no other memory is touched: pruned rows
    cost nothing); it needs autograd off for these tensors. Otherwise a new tensor.
    Under torch.autocast h, weight and bias are cast to autocast's dtype (the GEMM's);
    residual, base and the output keep base's dtype, as timm's ``x + linear(h)``.
    """
    check.tensor(h, "h", 2, "[R, K]")
    check.tensor(base, "base", 2, "[R0, N]")
    low = _autocast.dtype(h)
    h, weight, bias = _autocast.cast(low, h, weight, bias)  # as F.linear under autocast
    _check_linear(weight, bias, h.shape[1], h.dtype, "h")
    if weight.shape[0] != base.shape[1]:
        raise ValueError(f"weight must have base's {base.shape[1]} output features, got shape {list(weight.shape)}")
    R = base.shape[0] if rows is None else rows.shape[0]
    if h.shape[0] != R:
        raise ValueError(f"h must have one row per entry of rows ({R}), got {h.shape[0]}")
    if h.dtype != base.dtype and low is None:  # under autocast base keeps its dtype
        raise TypeError(f"h must have base's dtype {base.dtype}, got {h.dtype}")
    if residual is not None:
        check.tensor(residual, "residual", 2, "[R, N]")
        if residual.shape != (R, base.shape[1]):
            raise ValueError(f"residual must have shape [{R}, {base.shape[1]}], got {list(residual.shape)}")
        if residual.dtype != base.dtype:
            raise TypeError(f"residual must have base's dtype {base.dtype}, got {residual.dtype}")
    check.same_device(base=base, h=h, weight=weight, bias=bias, residual=residual, rows=rows)
    _check_rows(rows, "rows", base.shape[0], unique=True)
    if h.stride(1) != 1:
        h = h.contiguous()
    if not inplace:
        return linear_scatter(h, weight, bias, residual, base, rows)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias, residual, base)):
        raise ValueError("inplace=True needs autograd off for h, weight, bias, residual and base "
                         "(use torch.no_grad() or inplace=False)")
    if not base.is_contiguous():
        raise ValueError("inplace=True needs a contiguous base")
    linear_scatter_(h, weight, bias, residual, base, rows)
    return base
