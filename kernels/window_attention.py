"""Attention within fixed windows (q, k, v [M, H, n, D], any strides), with a relative-position
bias [H, n, n] and a shift mask [nW, n, n] looked up per window (mask[window_ids[m]]).

A window is small (n = 49 for Swin's 7x7 windows, 144 for 12x12), so a program holds all of a
window's keys at once (n padded to a power of two, KEYS) and walks its queries in blocks of
BLOCK_M: every score row is complete in registers, so the softmax needs no running max and the
backward recomputes the probabilities exactly, needing neither the forward's output nor a
logsumexp (delta = rowsum(P * dP) equals rowsum(dO * O)). One program per (head, group of
WINDOWS consecutive windows): the forward is one kernel, the backward is one kernel that writes
dq, dk, dv and adds dbias = sum over windows of dS into a float32 buffer with atomics: once per
program when a window is one query block (the program sums its windows first, so contention
drops by WINDOWS), else once per window and query block.

Scores are kept in base 2: log2(e) is folded into the scale and into the bias and mask.

A per-head scale (Swin V2's clamped, exponentiated logit scale) multiplies the scalar one: a
program loads its head's entry, and the backward adds d(head_scale)[h] = scale * sum(dS * q k^T)
= scale * sum(q * (dS k)) from tiles it already holds, one atomic per program.
"""
import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, LOG2E, LOG2E_CONST, dot_precision, empty_output, load_tile, on_device_of,
                      store_tile, strides)


def _configs(*candidates):
    """Autotune candidates (WINDOWS, num_warps) for CUDA; one fixed config under the
    interpreter (which cannot autotune), with a window count that does not divide the tests' M."""
    if INTERPRET:
        return [triton.Config({"WINDOWS": 3}, num_warps=4)]
    return [triton.Config({"WINDOWS": w}, num_warps=nw) for w, nw in candidates]


# Tuned per window size and head dim (the autotuner adds the dtypes), not per number of
# windows, which changes with every pruning decision.
_KEY = ["SEQ", "HEAD_DIM", "HAS_BIAS", "HAS_MASK", "HEAD_SCALE"]


@triton.jit
def _probabilities(q_tile, k_tile, bias_head, mask_window, rows, keys, qk_scale, SEQ: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """softmax(q k^T * scale + bias + mask) for a block of query rows against all keys,
    float32 [len(rows), len(keys)]; zero at padding keys."""
    s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * qk_scale
    pairs = rows[:, None] * SEQ + keys[None, :]
    inside = (rows[:, None] < SEQ) & (keys[None, :] < SEQ)
    if HAS_BIAS:
        s += tl.load(bias_head + pairs, mask=inside, other=0.0).to(tl.float32) * LOG2E_CONST
    if HAS_MASK:
        s += tl.load(mask_window + pairs, mask=inside, other=0.0).to(tl.float32) * LOG2E_CONST
    s = tl.where(keys[None, :] < SEQ, s, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    return p * (1.0 / tl.sum(p, 1))[:, None]


@triton.jit
def _window_mask(mask, window_ids, window, num_masks, SEQ: tl.constexpr, HAS_MASK: tl.constexpr):
    """Pointer to this window's [SEQ, SEQ] mask (mask itself when there is none). An id out of
    range (unchecked under no_index_checks) fails the assert in debug mode and is clamped
    otherwise, so that no read leaves the mask."""
    if HAS_MASK:
        mask_id = tl.load(window_ids + window)
        tl.device_assert((mask_id >= 0) & (mask_id < num_masks), "window_ids out of range")
        mask += tl.minimum(tl.maximum(mask_id, 0), num_masks - 1) * (SEQ * SEQ)
    return mask


@triton.autotune(_configs((1, 4), (1, 8), (2, 4), (4, 4), (2, 8), (4, 8)), key=_KEY)
@triton.jit
def _forward_kernel(
    q, k, v, window_ids, bias, mask, num_masks, head_scale, out, num_windows, qk_scale,
    stride_qm, stride_qh, stride_qn, stride_qd, stride_km, stride_kh, stride_kn, stride_kd,
    stride_vm, stride_vh, stride_vn, stride_vd,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    first = tl.program_id(0).to(tl.int64) * WINDOWS  # int64: offsets of late windows pass 2**31
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    keys = tl.arange(0, KEYS)
    cols = tl.arange(0, BLOCK_D)
    bias_head = bias + head * (SEQ * SEQ)
    if HEAD_SCALE:
        qk_scale *= tl.load(head_scale + head).to(tl.float32)
    for window in range(first, tl.minimum(first + WINDOWS, num_windows)):
        mask_window = _window_mask(mask, window_ids, window, num_masks, SEQ, HAS_MASK)
        k_tile = load_tile(k + window * stride_km + head * stride_kh, keys, SEQ, stride_kn, cols, HEAD_DIM, stride_kd,
                            UPCAST)
        v_tile = load_tile(v + window * stride_vm + head * stride_vh, keys, SEQ, stride_vn, cols, HEAD_DIM, stride_vd,
                            UPCAST)
        q_base = q + window * stride_qm + head * stride_qh
        out_base = out + (window * num_heads + head) * (SEQ * HEAD_DIM)
        for m0 in range(0, SEQ, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            q_tile = load_tile(q_base, rows, SEQ, stride_qn, cols, HEAD_DIM, stride_qd, UPCAST)
            p = _probabilities(q_tile, k_tile, bias_head, mask_window, rows, keys, qk_scale, SEQ, HAS_BIAS, HAS_MASK,
                               DOT_PRECISION)
            o = tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
            store_tile(out_base, rows, SEQ, HEAD_DIM, cols, HEAD_DIM, o)


@triton.autotune(_configs((1, 4), (1, 8), (2, 8), (4, 8), (8, 8)), key=_KEY + ["BIAS_GRAD"],
                 reset_to_zero=["dbias", "dhead_scale"])
@triton.jit
def _backward_kernel(
    q, k, v, dout, window_ids, bias, mask, num_masks, head_scale, dq, dk, dv, dbias, dhead_scale, num_windows,
    qk_scale, scale,
    stride_qm, stride_qh, stride_qn, stride_qd, stride_km, stride_kh, stride_kn, stride_kd,
    stride_vm, stride_vh, stride_vn, stride_vd, stride_dom, stride_doh, stride_don, stride_dod,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_SCALE: tl.constexpr,
    BIAS_GRAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    first = tl.program_id(0).to(tl.int64) * WINDOWS  # int64: offsets of late windows pass 2**31
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    keys = tl.arange(0, KEYS)
    cols = tl.arange(0, BLOCK_D)
    bias_head = bias + head * (SEQ * SEQ)
    dbias_head = dbias + head * (SEQ * SEQ)
    ONE_BLOCK: tl.constexpr = BLOCK_M >= SEQ
    dbias_acc = tl.zeros([BLOCK_M, KEYS], tl.float32)  # this program's windows, when ONE_BLOCK
    grad_scale = scale  # d(scores) / d(q k^T) without log2(e): the scalar scale, times the head's
    if HEAD_SCALE:
        head_factor = tl.load(head_scale + head).to(tl.float32)
        qk_scale *= head_factor
        grad_scale *= head_factor
    dscale_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # q * (dS k), summed at the end
    for window in range(first, tl.minimum(first + WINDOWS, num_windows)):
        mask_window = _window_mask(mask, window_ids, window, num_masks, SEQ, HAS_MASK)
        k_tile = load_tile(k + window * stride_km + head * stride_kh, keys, SEQ, stride_kn, cols, HEAD_DIM, stride_kd,
                            UPCAST)
        v_tile = load_tile(v + window * stride_vm + head * stride_vh, keys, SEQ, stride_vn, cols, HEAD_DIM, stride_vd,
                            UPCAST)
        q_base = q + window * stride_qm + head * stride_qh
        do_base = dout + window * stride_dom + head * stride_doh
        offset = (window * num_heads + head) * (SEQ * HEAD_DIM)  # dq, dk, dv: contiguous [M, H, n, D]
        dk_acc = tl.zeros([KEYS, BLOCK_D], tl.float32)
        dv_acc = tl.zeros([KEYS, BLOCK_D], tl.float32)
        for m0 in range(0, SEQ, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            q_tile = load_tile(q_base, rows, SEQ, stride_qn, cols, HEAD_DIM, stride_qd, UPCAST)
            do_tile = load_tile(do_base, rows, SEQ, stride_don, cols, HEAD_DIM, stride_dod, UPCAST)
            p = _probabilities(q_tile, k_tile, bias_head, mask_window, rows, keys, qk_scale, SEQ, HAS_BIAS, HAS_MASK,
                               DOT_PRECISION)
            dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
            # The gradient of the natural-log scores. Padding rows read q = dO = 0, so their
            # dS is 0 and they add nothing to dK, dV or dbias.
            ds = p * (dp - tl.sum(p * dp, 1)[:, None])
            dv_acc += tl.dot(tl.trans(p).to(do_tile.dtype), do_tile, input_precision=DOT_PRECISION)
            dk_acc += tl.dot(tl.trans(ds).to(q_tile.dtype), q_tile, input_precision=DOT_PRECISION)
            ds_k = tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=DOT_PRECISION)
            if HEAD_SCALE:
                dscale_acc += q_tile.to(tl.float32) * ds_k
            dq_tile = ds_k * grad_scale
            store_tile(dq + offset, rows, SEQ, HEAD_DIM, cols, HEAD_DIM, dq_tile)
            if BIAS_GRAD:
                if ONE_BLOCK:
                    dbias_acc += ds
                else:
                    inside = (rows[:, None] < SEQ) & (keys[None, :] < SEQ)
                    tl.atomic_add(dbias_head + rows[:, None] * SEQ + keys[None, :], ds, mask=inside, sem="relaxed")
        store_tile(dk + offset, keys, SEQ, HEAD_DIM, cols, HEAD_DIM, dk_acc * grad_scale)
        store_tile(dv + offset, keys, SEQ, HEAD_DIM, cols, HEAD_DIM, dv_acc)
    if BIAS_GRAD:
        if ONE_BLOCK:
            rows = tl.arange(0, BLOCK_M)
            inside = (rows[:, None] < SEQ) & (keys[None, :] < SEQ)
            tl.atomic_add(dbias_head + rows[:, None] * SEQ + keys[None, :], dbias_acc, mask=inside, sem="relaxed")
    if HEAD_SCALE:
        tl.atomic_add(dhead_scale + head, tl.sum(tl.sum(dscale_acc, 1), 0) * scale, sem="relaxed")


def _constexprs(q, bias, mask, head_scale=None):
    """Tile sizes and flags shared by both kernels."""
    n, D = q.shape[2:]
    keys = max(16, triton.next_power_of_2(n))
    # A window of up to 64 tokens is one query block on a GPU; larger ones are walked in blocks
    # of 16 rows, which keeps the backward's [BLOCK_M, KEYS] tiles and its dK, dV accumulators
    # in registers (n = 144 with 32 rows spills on sm_90). Under the interpreter blocks of 32
    # rows, so that the tests cover both one and several query blocks.
    block_m = min(keys, 32) if INTERPRET else keys if keys <= 64 else 16
    return dict(
        SEQ=n, HEAD_DIM=D, KEYS=keys, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(D)),
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, HEAD_SCALE=head_scale is not None, UPCAST=INTERPRET, DOT_PRECISION=dot_precision(q.dtype),
    )


def _bias_and_mask(q, bias, mask):
    """bias, mask (contiguous; q stands in for an absent one, never read) and the number of masks."""
    return [q if t is None else t.contiguous() for t in (bias, mask)] + [1 if mask is None else mask.shape[0]]


def _grid(num_windows, num_heads):
    return lambda meta: (triton.cdiv(num_windows, meta["WINDOWS"]), num_heads)


def forward(q, k, v, window_ids, bias, mask, scale: float, head_scale=None):
    """-> out [M, H, n, D] (contiguous). bias [H, n, n], mask [nW, n, n] and head_scale [H]
    (float32, multiplies scale) may be None."""
    M, H = q.shape[:2]
    out = empty_output(q)
    if M:
        with on_device_of(q):
            _forward_kernel[_grid(M, H)](
                q, k, v, window_ids.contiguous(), *_bias_and_mask(q, bias, mask),
                q if head_scale is None else head_scale.contiguous(), out, M, scale * LOG2E,
                *strides(q, k, v), **_constexprs(q, bias, mask, head_scale),
            )
    return out.to(q.dtype)


def backward(dout, q, k, v, window_ids, bias, mask, scale: float, bias_grad: bool, head_scale=None):
    """-> dq, dk, dv [M, H, n, D] (contiguous), dbias [H, n, n] in bias's dtype (empty unless
    bias_grad) and dhead_scale [H] float32 (empty without head_scale)."""
    M, H, n, _ = q.shape
    dq, dk, dv = (empty_output(q) for _ in range(3))
    dbias = torch.zeros(H, n, n, dtype=torch.float32, device=q.device) if bias_grad else q.new_empty(0)
    dhead_scale = q.new_zeros(0 if head_scale is None else H, dtype=torch.float32)
    if M:
        with on_device_of(q):
            _backward_kernel[_grid(M, H)](
                q, k, v, dout, window_ids.contiguous(), *_bias_and_mask(q, bias, mask),
                q if head_scale is None else head_scale.contiguous(), dq, dk, dv, dbias, dhead_scale, M,
                scale * LOG2E, scale, *strides(q, k, v, dout), BIAS_GRAD=bias_grad,
                **_constexprs(q, bias, mask, head_scale),
            )
    dbias = dbias.to(bias.dtype) if bias_grad else dbias
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dbias, dhead_scale
