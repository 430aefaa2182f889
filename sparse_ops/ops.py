"""Public functional ops: input checks, dispatch (compiled kernel or reference), and the
autograd and fake (meta) implementations of the compiled ops."""
import math

import torch

from . import _autocast, _checks as check
from . import reference
from ._backend import extension, kernel
from .layout import Pair, TokenIndex, to_pair, window_grid


# ------------------------------------------------------------------- row primitives
def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[R, C] -> [T, C]: ``out[t] = x[rows[t]]``, zeros where ``rows[t] == -1``."""
    check.tensor(x, "x", 2, "[R, C]")
    check.index(rows, "rows", 1, "[T]")
    check.same_device(x=x, rows=rows)
    check.in_range(rows, "rows", -1, x.shape[0])
    return kernel("gather_rows", x.device.type)(x, rows)


def scatter_rows(y: torch.Tensor, rows: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """A copy of base [R, C] with ``out[rows[t]] = y[t]``; rows of -1 are skipped, the others
    must be unique."""
    check.tensor(base, "base", 2, "[R, C]")
    check.tensor(y, "y", 2, "[T, C]")
    check.index(rows, "rows", 1, "[T]")
    check.same_device(base=base, y=y, rows=rows)
    if y.shape != (rows.shape[0], base.shape[1]):
        raise ValueError(f"y must have shape [{rows.shape[0]}, {base.shape[1]}] (rows, base's C), got {list(y.shape)}")
    if y.dtype != base.dtype:
        raise TypeError(f"y must have base's dtype {base.dtype}, got {y.dtype}")
    check.in_range(rows, "rows", -1, base.shape[0])
    check.unique_rows(rows, "rows")
    return kernel("scatter_rows", base.device.type)(y, rows, base)


def scatter_add_rows(y: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Zeros [num_rows, C] with ``out[rows[t]] += y[t]``: repeated rows add up, -1 is skipped.
    (The backward of gather_rows.)"""
    check.tensor(y, "y", 2, "[T, C]")
    check.index(rows, "rows", 1, "[T]")
    check.same_device(y=y, rows=rows)
    check.integer(num_rows, "num_rows")
    if y.shape[0] != rows.shape[0]:
        raise ValueError(f"y must have one row per entry of rows ({rows.shape[0]}), got {y.shape[0]}")
    check.in_range(rows, "rows", -1, num_rows)
    return kernel("scatter_add_rows", y.device.type)(y, rows, num_rows)


# -------------------------------------------------------------------------- windows
def _window_args(height: int, width: int, window_size: Pair, shift_size: Pair):
    wh, ww = to_pair(window_size, "window_size")
    sh, sw = to_pair(shift_size, "shift_size")
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size!r}")
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"shift_size must be in [0, window_size) = [0, {(wh, ww)}), got {shift_size!r}")
    if height < 1 or width < 1:
        raise ValueError(f"the image must be at least 1x1, got {height}x{width}")
    return [wh, ww], [sh, sw]


def _check_windows(windows: torch.Tensor, height: int, width: int, window_size, batch=None, **same_device_as) -> None:
    """windows' type, shape and ids; same_device_as: the image tensor (checked before ids are read)."""
    check.index(windows, "windows", 2, "[B, K] window ids")
    if batch is not None and windows.shape[0] != batch:
        raise ValueError(f"windows must have one row per image ({batch}), got shape {list(windows.shape)}")
    check.same_device(**same_device_as, windows=windows)
    gh, gw = window_grid(height, width, window_size)
    check.in_range(windows, "windows", 0, gh * gw)


def window_rows(windows: torch.Tensor, height: int, width: int, window_size: Pair, shift_size: Pair = 0) -> torch.Tensor:
    """[B, K] window ids -> int64 [B*K*wh*ww]: the flat row ``b*H*W + y*W + x`` of every token
    of each window in timm's frame (roll by -shift, pad to window multiples); -1 = padding."""
    check.integer(height, "height", 1)
    check.integer(width, "width", 1)
    ws, ss = _window_args(height, width, window_size, shift_size)
    _check_windows(windows, height, width, ws)
    return kernel("window_rows", windows.device.type)(windows, height, width, ws, ss)


def window_scores(x: torch.Tensor, window_size: Pair, shift_size: Pair = 0) -> torch.Tensor:
    """[B, H, W, C] -> float32 [B, nW] (float64 for float64 x): per token m = mean_c |x|, in
    the rolled then zero-padded frame; a window's score is the L2 norm of m over it."""
    check.tensor(x, "x", 4, "[B, H, W, C]")
    if x.shape[3] < 1:
        raise ValueError(f"x must have at least one channel, got shape {list(x.shape)}")
    ws, ss = _window_args(x.shape[1], x.shape[2], window_size, shift_size)
    return kernel("window_scores", x.device.type)(x, ws, ss)


def gather_windows(x: torch.Tensor, windows: torch.Tensor, window_size: Pair, shift_size: Pair = 0) -> torch.Tensor:
    """[B, H, W, C] -> [B*K, wh*ww, C]: timm's roll(-shift) -> pad -> window_partition, keeping
    windows[b] of image b. Padding tokens are zeros."""
    check.tensor(x, "x", 4, "[B, H, W, C]")
    B, H, W, C = x.shape
    ws, ss = _window_args(H, W, window_size, shift_size)
    _check_windows(windows, H, W, ws, batch=B, x=x)
    rows = kernel("window_rows", x.device.type)(windows, H, W, ws, ss)
    out = kernel("gather_rows", x.device.type)(x.reshape(-1, C), rows)
    return out.view(B * windows.shape[1], ws[0] * ws[1], C)


def scatter_windows(y: torch.Tensor, base: torch.Tensor, windows: torch.Tensor, window_size: Pair,
                    shift_size: Pair = 0) -> torch.Tensor:
    """base [B, H, W, C] with the real (unpadded) tokens of windows[b] replaced by y
    [B*K, wh*ww, C] (or [B*K, wh, ww, C]), put back at their original, unrolled positions."""
    check.tensor(base, "base", 4, "[B, H, W, C]")
    B, H, W, C = base.shape
    ws, ss = _window_args(H, W, window_size, shift_size)
    _check_windows(windows, H, W, ws, batch=B, base=base)
    check.unique_windows(windows, "windows")
    check.tensor(y, "y", 4 if isinstance(y, torch.Tensor) and y.dim() == 4 else 3, "[B*K, wh*ww, C]")
    expected = (B * windows.shape[1], ws[0] * ws[1], C)
    if y.shape[0] != expected[0] or y.shape[-1] != C or math.prod(y.shape[1:-1]) != expected[1]:
        raise ValueError(f"y must have shape {list(expected)}, got {list(y.shape)}")
    if y.dtype != base.dtype:
        raise TypeError(f"y must have base's dtype {base.dtype}, got {y.dtype}")
    check.same_device(base=base, y=y, windows=windows)
    rows = kernel("window_rows", base.device.type)(windows, H, W, ws, ss)
    out = kernel("scatter_rows", base.device.type)(y.reshape(-1, C), rows, base.reshape(-1, C))
    return out.view(B, H, W, C)


# --------------------------------------------------------------------------- tokens
def _check_token_index(idx: TokenIndex, x: torch.Tensor, name: str) -> None:
    if not isinstance(idx, TokenIndex):
        raise TypeError(f"idx must be a TokenIndex, got {type(idx).__name__}")
    if tuple(x.shape[:2]) != (idx.batch_size, idx.seq_len):
        raise ValueError(
            f"{name} must be [B, N, C] with B, N = {idx.batch_size}, {idx.seq_len} (from idx), got {list(x.shape)}"
        )
    check.same_device(**{name: x, "idx.index": idx.index})
    check.in_range(idx.index, "idx.index", 0, idx.batch_size * idx.seq_len)


def gather_tokens(x: torch.Tensor, idx: TokenIndex) -> torch.Tensor:
    """[B, N, C] -> [T, C]: the kept tokens, packed image after image."""
    check.tensor(x, "x", 3, "[B, N, C]")
    _check_token_index(idx, x, "x")
    return kernel("gather_rows", x.device.type)(x.reshape(-1, x.shape[2]), idx.index)


def scatter_tokens(y: torch.Tensor, idx: TokenIndex, base: torch.Tensor) -> torch.Tensor:
    """base [B, N, C] with the kept positions replaced by y [T, C]."""
    check.tensor(base, "base", 3, "[B, N, C]")
    _check_token_index(idx, base, "base")
    check.tensor(y, "y", 2, "[T, C]")
    if y.shape != (idx.num_tokens, base.shape[2]):
        raise ValueError(f"y must have shape [{idx.num_tokens}, {base.shape[2]}] (idx's T, base's C), got {list(y.shape)}")
    if y.dtype != base.dtype:
        raise TypeError(f"y must have base's dtype {base.dtype}, got {y.dtype}")
    check.same_device(base=base, y=y)
    check.unique_rows(idx.index, "idx.index")
    out = kernel("scatter_rows", base.device.type)(y, idx.index, base.reshape(-1, base.shape[2]))
    return out.view(base.shape)


def package_tokens(x: torch.Tensor, scores: torch.Tensor, idx: TokenIndex) -> torch.Tensor:
    """[B, N, C] -> [B, C]: per image, the mean of the pruned tokens (those not in idx)
    weighted by their non-negative scores (zeros where nothing was pruned): the SaiT/EViT
    package token."""
    check.tensor(x, "x", 3, "[B, N, C]")
    check.tensor(scores, "scores", 2, "[B, N]")
    _check_token_index(idx, x, "x")
    if scores.shape != x.shape[:2]:
        raise ValueError(f"scores must have shape {list(x.shape[:2])} (x's B, N), got {list(scores.shape)}")
    check.same_device(x=x, scores=scores)
    if check.checking_values() and scores.numel() and bool((scores < 0).any()):
        raise ValueError("scores must be non-negative (they weight the pruned tokens)")
    acc = torch.float64 if scores.dtype == torch.float64 or x.dtype == torch.float64 else torch.float32
    w = scores.to(acc) * ~idx.keep_mask()
    total = w.sum(1, keepdim=True)
    # an image with no pruned score mass (its weights all zero) gets zeros, and zero gradients
    # (dividing by a clamped total gave NaN or ~1e307 ones there)
    w = w / torch.where(total > 0, total, 1)
    # the weighted sum in acc too: weights rounded to fp16/bf16 erred several times the output's
    # rounding (so autocast, which would run bmm in them, is off)
    with _autocast.off(x.device.type):
        return torch.bmm(w.unsqueeze(1), x.to(acc)).squeeze(1).to(x.dtype)


# ------------------------------------------------- autograd and fake implementations
def _register_compiled_ops() -> None:
    def gather_fake(x, rows):
        return x.new_empty(rows.shape[0], x.shape[1])

    def gather_setup(ctx, inputs, output):
        x, rows = inputs
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]

    def gather_backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return kernel("scatter_add_rows", grad.device.type)(grad, rows, ctx.num_rows), None

    def scatter_fake(y, rows, base):
        return torch.empty_like(base, memory_format=torch.contiguous_format)

    def scatter_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def scatter_backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        grad_y = grad_base = None
        if ctx.needs_input_grad[0]:
            grad_y = kernel("gather_rows", grad.device.type)(grad, rows)
        if ctx.needs_input_grad[2]:  # the replaced rows of base get no gradient
            zeros = grad.new_zeros(rows.shape[0], grad.shape[1])
            grad_base = kernel("scatter_rows", grad.device.type)(zeros, rows, grad)
        return grad_y, None, grad_base

    def scatter_add_fake(y, rows, num_rows):
        return y.new_empty(num_rows, y.shape[1])

    def scatter_add_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def scatter_add_backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return kernel("gather_rows", grad.device.type)(grad, rows), None, None

    def window_rows_fake(windows, height, width, window_size, shift_size):
        return windows.new_empty(windows.numel() * window_size[0] * window_size[1])

    def window_scores_fake(x, window_size, shift_size):
        gh, gw = window_grid(x.shape[1], x.shape[2], window_size)
        return x.new_empty(x.shape[0], gh * gw, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    def window_scores_setup(ctx, inputs, output):
        x, ctx.window_size, ctx.shift_size = inputs
        ctx.save_for_backward(x, output)

    def window_scores_backward(ctx, grad):
        # d score / d x = sum over the token's window of (m / score) * sign(x) / C.
        x, scores = ctx.saved_tensors
        B, H, W, C = x.shape
        window_of_token = _window_of_token(H, W, ctx.window_size, ctx.shift_size, x.device)
        coef = torch.where(scores > 0, grad / torch.where(scores > 0, scores, 1), 0)  # 0 at a zero norm, as torch's
        m = x.to(scores.dtype).abs().mean(-1)
        g = coef[:, window_of_token].view(B, H, W) * m / C
        return (g.unsqueeze(-1) * x.sgn()).to(x.dtype), None, None

    for name, fake, setup, backward in (
        ("gather_rows", gather_fake, gather_setup, gather_backward),
        ("scatter_rows", scatter_fake, scatter_setup, scatter_backward),
        ("scatter_add_rows", scatter_add_fake, scatter_add_setup, scatter_add_backward),
        ("window_rows", window_rows_fake, None, None),
        ("window_scores", window_scores_fake, window_scores_setup, window_scores_backward),
    ):
        torch.library.register_fake(f"sparse_ops::{name}", fake)
        if backward is not None:
            torch.library.register_autograd(f"sparse_ops::{name}", backward, setup_context=setup)


def _window_of_token(height: int, width: int, window_size, shift_size, device) -> torch.Tensor:
    """int64 [H*W]: the window (in the shifted frame) that each token of the image falls in."""
    gh, gw = window_grid(height, width, window_size)
    area = window_size[0] * window_size[1]
    all_windows = torch.arange(gh * gw, device=device).view(1, -1)
    rows = kernel("window_rows", device.type)(all_windows, height, width, window_size, shift_size)
    ids = torch.arange(gh * gw, device=device).repeat_interleave(area)
    # Padding rows (-1) land in an extra slot that is dropped.
    target = reference._padded_rows(rows, height * width)
    return torch.zeros(height * width + 1, dtype=torch.long, device=device).scatter_(0, target, ids)[:-1]


if extension is not None:
    _register_compiled_ops()
