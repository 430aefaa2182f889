"""Attention within fixed windows (q, k, v [M, H, n, D], any strides), with a relative-position
bias [H, n, n], a shift mask [nW, n, n] looked up per window (mask[window_ids[m]]), and SAM's
decomposed relative position: per query row, rel_h [M, H, n, WIN_H] and rel_w [M, H, n, WIN_W]
(any strides), score (i, j) += rel_h[i, j // WIN_W] + rel_w[i, j % WIN_W]: a query block's
rows of rel_h and rel_w are loaded once and spread over the keys in registers (tl.gather);
nothing [n, n] is read for it.

Two kernel sets, chosen by the window size at launch:

- One key block (n padded to a power of two, KEYS, at most MAX_ONE_BLOCK_KEYS = 256: Swin's
  7x7, 8x8, 12x12 and 16x16 windows): a program holds all of a window's keys at once and walks
  its queries in blocks of BLOCK_M. Every score row is complete in registers, so the softmax
  needs no running max and the backward recomputes the probabilities exactly from the inputs
  alone (delta = rowsum(P * dP) equals rowsum(dO * O)). Forward: one program per (group of
  WINDOWS consecutive windows, head). Backward: one kernel writing dq, dk, dv.
- Key blocks (larger windows, e.g. Swin V2's 18x18 and 24x24, whose keys would need 242-482
  KiB of shared memory at once, over sm_90's 227 KiB): flash attention within each window. The
  forward walks the keys in blocks of BLOCK_N with an online softmax, one program per (window,
  head, query block). The backward is two kernels: per query block, the forward again (for the
  logsumexp and O, hence delta = rowsum(dO * O), saved to a small float32 scratch) and then dq;
  per key block, dk and dv from the saved logsumexp and delta, looping over the queries.

dbias = sum over windows of dS, without atomics (deterministic run to run, no contention): the
backward programs that see dS (one-block kernel; key-block dk/dv kernel) each own a slot of a
float32 buffer partials [G, H, n, n] and sum their windows into it; torch sums the G slots
afterwards, in a fixed order. A program takes a run of consecutive windows, as many as keep
the slots under PARTIAL_ELEMENTS floats (the one-block kernel sums its windows in registers
when a window is one query block, else, as the key-block kernel does, in its own slot in
global memory). The head-scale gradient is summed the same way, from per-row partials.

drel_h[i, a] = sum of dS[i, j] over the keys j of window row a (j // WIN_W == a), drel_w over
window column b (j % WIN_W == b): row sums owned by the program that holds the row's dS for
every key (one-block kernel; key-block dq kernel, over its key blocks), written directly.

Scores are kept in base 2: log2(e) is folded into the scale and into the bias, mask and rel.

A per-head scale (Swin V2's clamped, exponentiated logit scale) multiplies the scalar one: a
program loads its head's entry, and the backward's d(head_scale)[h] = scale * sum(dS * q k^T)
= scale * sum(q * (dS k)) comes from tiles the dq computation already holds.

Offsets that can pass 2**31 elements (window and head times a stride or a size) are int64.
"""
import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, LOG2E, LOG2E_CONST, autotune_configs, bucket, dot_precision, empty_output,
                      load_tile, on_device_of, store_tile, strides, tuned)

# Largest padded window (keys) one program holds at once; larger windows take the key-block
# kernels. (n = 144 and 256: 256 keys, whose backward fits sm_90 at the configs below.)
MAX_ONE_BLOCK_KEYS = 256
# Most float32 elements of the dbias partial sums: a program sums as many windows as it takes
# to stay under this (32 MiB), so that the slots need little memory and summing them is cheap.
PARTIAL_ELEMENTS = 2**23


def _window_configs(*candidates):
    """(WINDOWS, num_warps) of the one-block kernels; under the interpreter a window count that
    does not divide the tests' M."""
    return autotune_configs([triton.Config({"WINDOWS": w}, num_warps=nw) for w, nw in candidates],
                            triton.Config({"WINDOWS": 3}, num_warps=4))


def _warps_configs(*warps):
    """num_warps of the one-block backward (its windows per program are set at launch), with
    num_stages=1: pipelining its window loop only added register spills on sm_90 (as
    tests/compile_kernels.py reports them)."""
    return autotune_configs([triton.Config({}, num_warps=w, num_stages=1) for w in warps],
                            triton.Config({}, num_warps=4))


def _block_configs(*blocks):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the key-block kernels; under the
    interpreter BLOCK_M != BLOCK_N, so that small tests cross block boundaries both ways."""
    return autotune_configs(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in blocks],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4))


# Tuned per window size, head dim and variant, and per power-of-two bucket of windows x heads
# (windows_heads: Swin-T's stages run 2304 x 3 to 36 x 24 at 672 px, and pruning changes the
# count), not per exact window count; the autotuner adds the dtypes.
_KEY = ["SEQ", "HEAD_DIM", "HAS_BIAS", "HAS_MASK", "HEAD_SCALE", "HAS_REL", "windows_heads"]


@triton.constexpr_function
def _dot_width(n):
    """n padded to a power of two of at least 16 (tl.dot's smallest dimension)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _window_rel_pos(rel_h, rel_w, window, head, stride_rhm, stride_rhh, stride_rhn, stride_rha, stride_rwm, stride_rwh,
                    stride_rwn, stride_rwb):
    """rel_h and rel_w of one window and head, with their row and column strides, as the one
    argument _rel_rows takes."""
    return (rel_h + window * stride_rhm + head * stride_rhh, rel_w + window * stride_rwm + head * stride_rwh,
            stride_rhn, stride_rha, stride_rwn, stride_rwb)


@triton.jit
def _rel_rows(rel, rows, SEQ: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr, HAS_REL: tl.constexpr):
    """rel_h and rel_w at a block of query rows, in base 2: float32 [len(rows), _dot_width(WIN_H)]
    and [len(rows), _dot_width(WIN_W)], zeros outside (and without rel_pos). Loaded once per
    query block and spread over the keys in registers (_scores): a gather load per score
    would hold a tile of 64-bit pointers per key block."""
    rel_h, rel_w, stride_rhn, stride_rha, stride_rwn, stride_rwb = rel
    valid_rows: tl.constexpr = SEQ if HAS_REL else 0
    at_rows = load_tile(rel_h, rows, valid_rows, stride_rhn, tl.arange(0, _dot_width(WIN_H)), WIN_H, stride_rha, True)
    at_columns = load_tile(rel_w, rows, valid_rows, stride_rwn, tl.arange(0, _dot_width(WIN_W)), WIN_W, stride_rwb,
                           True)
    return at_rows * LOG2E_CONST, at_columns * LOG2E_CONST


@triton.jit
def _rel_grads(ds, keys, dot_dtype: tl.constexpr, WIN_W: tl.constexpr, WIN_H_PAD: tl.constexpr,
               WIN_W_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """(sums of ds [rows, keys] over the keys of each window row a: [rows, WIN_H_PAD], and of each
    window column b: [rows, WIN_W_PAD]), as dots with one-hot matrices (key j in row a, in
    column b): no [rows, keys, groups] tile in registers. The one-hot entries are exact in any
    dtype and the sums accumulate in float32; ds is rounded to dot_dtype. Keys past the window
    have ds = 0 (p = 0 there), whatever group they fall in."""
    in_row = (keys // WIN_W)[:, None] == tl.arange(0, WIN_H_PAD)[None, :]
    in_column = (keys % WIN_W)[:, None] == tl.arange(0, WIN_W_PAD)[None, :]
    ds = ds.to(dot_dtype)
    return (tl.dot(ds, in_row.to(dot_dtype), input_precision=PRECISION),
            tl.dot(ds, in_column.to(dot_dtype), input_precision=PRECISION))


@triton.jit
def _scores(q_tile, k_tile, bias_head, mask_window, rel, rows, keys, qk_scale, SEQ: tl.constexpr, WIN_W: tl.constexpr,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """q k^T * scale + bias + mask + rel in base 2, float32 [len(rows), len(keys)]; -inf at
    padding keys. rel: _rel_rows of these rows."""
    s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * qk_scale
    pairs = rows[:, None] * SEQ + keys[None, :]
    inside = (rows[:, None] < SEQ) & (keys[None, :] < SEQ)
    if HAS_BIAS:
        s += tl.load(bias_head + pairs, mask=inside, other=0.0).to(tl.float32) * LOG2E_CONST
    if HAS_MASK:
        s += tl.load(mask_window + pairs, mask=inside, other=0.0).to(tl.float32) * LOG2E_CONST
    if HAS_REL:  # rel_h[row, key // WIN_W] + rel_w[row, key % WIN_W]
        at_rows, at_columns = rel
        # (keys past the window index inside the tiles: their scores are -inf below)
        key_row = tl.broadcast_to(tl.minimum(keys // WIN_W, at_rows.shape[1] - 1)[None, :], s.shape)
        key_column = tl.broadcast_to((keys % WIN_W)[None, :], s.shape)
        s += tl.gather(at_rows, key_row, 1) + tl.gather(at_columns, key_column, 1)
    return tl.where(keys[None, :] < SEQ, s, float("-inf"))


@triton.jit
def _probabilities(q_tile, k_tile, bias_head, mask_window, rel, rows, keys, qk_scale, SEQ: tl.constexpr,
                   WIN_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REL: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """softmax(q k^T * scale + bias + mask + rel) for a block of query rows against all keys,
    float32 [len(rows), len(keys)]; zero at padding keys."""
    s = _scores(q_tile, k_tile, bias_head, mask_window, rel, rows, keys, qk_scale, SEQ, WIN_W, HAS_BIAS, HAS_MASK,
                HAS_REL, DOT_PRECISION)
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


@triton.jit
def _add_to_partial(partial, rows, keys, SEQ: tl.constexpr, ds, accumulate):
    """partial[rows, keys] (a program's own [SEQ, SEQ] slot) += ds where accumulate, else = ds
    (a program's first window: the slot is not zeroed before)."""
    inside = (rows[:, None] < SEQ) & (keys[None, :] < SEQ)
    pointers = partial + rows[:, None] * SEQ + keys[None, :]
    # this program's threads wrote the slot for the previous window in another layout
    tl.debug_barrier()
    previous = tl.load(pointers, mask=inside & accumulate, other=0.0)
    tl.store(pointers, previous + ds, mask=inside)


@triton.autotune(_window_configs((1, 4), (1, 8), (2, 4), (4, 4), (2, 8), (4, 8)), key=_KEY)
@triton.jit
def _forward_kernel(
    q, k, v, window_ids, bias, mask, num_masks, head_scale, rel_h, rel_w, out, num_windows, qk_scale, windows_heads,
    stride_qm, stride_qh, stride_qn, stride_qd, stride_km, stride_kh, stride_kn, stride_kd,
    stride_vm, stride_vh, stride_vn, stride_vd,
    stride_rhm, stride_rhh, stride_rhn, stride_rha, stride_rwm, stride_rwh, stride_rwn, stride_rwb,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_SCALE: tl.constexpr,
    HAS_REL: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block: all of a window's keys at once, query blocks in turn."""
    first = tl.program_id(0).to(tl.int64) * WINDOWS
    head = tl.program_id(1).to(tl.int64)
    num_heads = tl.num_programs(1)
    keys = tl.arange(0, KEYS)
    cols = tl.arange(0, BLOCK_D)
    bias_head = bias + head * (SEQ * SEQ)
    if HEAD_SCALE:
        qk_scale *= tl.load(head_scale + head).to(tl.float32)
    for window in range(first, tl.minimum(first + WINDOWS, num_windows)):
        mask_window = _window_mask(mask, window_ids, window, num_masks, SEQ, HAS_MASK)
        rel_window = _window_rel_pos(rel_h, rel_w, window, head, stride_rhm, stride_rhh, stride_rhn, stride_rha,
                                     stride_rwm, stride_rwh, stride_rwn, stride_rwb)
        k_tile = load_tile(k + window * stride_km + head * stride_kh, keys, SEQ, stride_kn, cols, HEAD_DIM, stride_kd,
                           UPCAST)
        v_tile = load_tile(v + window * stride_vm + head * stride_vh, keys, SEQ, stride_vn, cols, HEAD_DIM, stride_vd,
                           UPCAST)
        q_base = q + window * stride_qm + head * stride_qh
        out_base = out + (window * num_heads + head) * (SEQ * HEAD_DIM)
        for m0 in range(0, SEQ, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            q_tile = load_tile(q_base, rows, SEQ, stride_qn, cols, HEAD_DIM, stride_qd, UPCAST)
            rel = _rel_rows(rel_window, rows, SEQ, WIN_H, WIN_W, HAS_REL)
            p = _probabilities(q_tile, k_tile, bias_head, mask_window, rel, rows, keys, qk_scale, SEQ, WIN_W, HAS_BIAS,
                               HAS_MASK, HAS_REL, DOT_PRECISION)
            o = tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
            store_tile(out_base, rows, SEQ, HEAD_DIM, cols, HEAD_DIM, o)


@triton.autotune(_warps_configs(8, 4), key=_KEY + ["BIAS_GRAD"])
@triton.jit
def _backward_kernel(
    q, k, v, dout, window_ids, bias, mask, num_masks, head_scale, rel_h, rel_w, dq, dk, dv, dbias_partials,
    dscale_rows, drel_h, drel_w, num_windows, windows_per_program, qk_scale, scale, windows_heads,
    stride_qm, stride_qh, stride_qn, stride_qd, stride_km, stride_kh, stride_kn, stride_kd,
    stride_vm, stride_vh, stride_vn, stride_vd, stride_dom, stride_doh, stride_don, stride_dod,
    stride_rhm, stride_rhh, stride_rhn, stride_rha, stride_rwm, stride_rwh, stride_rwn, stride_rwb,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_SCALE: tl.constexpr, HAS_REL: tl.constexpr,
    WIN_H: tl.constexpr, WIN_W: tl.constexpr, BIAS_GRAD: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block: dq, dk, dv of windows_per_program consecutive windows, their dS summed
    into this program's dbias slot dbias_partials[group, head] [SEQ, SEQ], per query row
    sum(q * (dS k)) into dscale_rows [M, H, SEQ] (for the head-scale gradient), and the rows'
    drel_h [M, H, SEQ, WIN_H] and drel_w [M, H, SEQ, WIN_W]."""
    group = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    num_heads = tl.num_programs(1)
    first = group * windows_per_program
    keys = tl.arange(0, KEYS)
    cols = tl.arange(0, BLOCK_D)
    bias_head = bias + head * (SEQ * SEQ)
    partial = dbias_partials + (group * num_heads + head) * (SEQ * SEQ)
    ONE_BLOCK: tl.constexpr = BLOCK_M >= SEQ
    WIN_H_PAD: tl.constexpr = _dot_width(WIN_H)
    WIN_W_PAD: tl.constexpr = _dot_width(WIN_W)
    dbias_acc = tl.zeros([BLOCK_M, KEYS], tl.float32)  # this program's windows, when ONE_BLOCK
    grad_scale = scale  # d(scores) / d(q k^T) without log2(e): the scalar scale, times the head's
    if HEAD_SCALE:
        head_factor = tl.load(head_scale + head).to(tl.float32)
        qk_scale *= head_factor
        grad_scale *= head_factor
    for window in range(first, tl.minimum(first + windows_per_program, num_windows)):
        mask_window = _window_mask(mask, window_ids, window, num_masks, SEQ, HAS_MASK)
        rel_window = _window_rel_pos(rel_h, rel_w, window, head, stride_rhm, stride_rhh, stride_rhn, stride_rha,
                                     stride_rwm, stride_rwh, stride_rwn, stride_rwb)
        k_tile = load_tile(k + window * stride_km + head * stride_kh, keys, SEQ, stride_kn, cols, HEAD_DIM, stride_kd,
                           UPCAST)
        v_tile = load_tile(v + window * stride_vm + head * stride_vh, keys, SEQ, stride_vn, cols, HEAD_DIM, stride_vd,
                           UPCAST)
        q_base = q + window * stride_qm + head * stride_qh
        do_base = dout + window * stride_dom + head * stride_doh
        row_base = (window * num_heads + head) * SEQ  # [M, H, SEQ] row index of this window's rows
        offset = row_base * HEAD_DIM  # dq, dk, dv: contiguous [M, H, n, D]
        dk_acc = tl.zeros([KEYS, BLOCK_D], tl.float32)
        dv_acc = tl.zeros([KEYS, BLOCK_D], tl.float32)
        for m0 in range(0, SEQ, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            q_tile = load_tile(q_base, rows, SEQ, stride_qn, cols, HEAD_DIM, stride_qd, UPCAST)
            do_tile = load_tile(do_base, rows, SEQ, stride_don, cols, HEAD_DIM, stride_dod, UPCAST)
            rel = _rel_rows(rel_window, rows, SEQ, WIN_H, WIN_W, HAS_REL)
            p = _probabilities(q_tile, k_tile, bias_head, mask_window, rel, rows, keys, qk_scale, SEQ, WIN_W, HAS_BIAS,
                               HAS_MASK, HAS_REL, DOT_PRECISION)
            dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
            # The gradient of the natural-log scores. Padding rows read q = dO = 0, so their
            # dS is 0 and they add nothing to dK, dV or dbias.
            ds = p * (dp - tl.sum(p * dp, 1)[:, None])
            dv_acc += tl.dot(tl.trans(p).to(do_tile.dtype), do_tile, input_precision=DOT_PRECISION)
            dk_acc += tl.dot(tl.trans(ds).to(q_tile.dtype), q_tile, input_precision=DOT_PRECISION)
            ds_k = tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=DOT_PRECISION)
            if HEAD_SCALE:
                tl.store(dscale_rows + row_base + rows, tl.sum(q_tile.to(tl.float32) * ds_k, 1), mask=rows < SEQ)
            store_tile(dq + offset, rows, SEQ, HEAD_DIM, cols, HEAD_DIM, ds_k * grad_scale)
            if HAS_REL:
                # float32 "ieee" sums, exact: on sm_90 (tests/compile_kernels.py) this kernel spills
                # no more than without rel_pos, while dots in the inputs' dtype spilled 3x more
                drel_rows, drel_columns = _rel_grads(ds, keys, tl.float32, WIN_W, WIN_H_PAD, WIN_W_PAD, "ieee")
                store_tile(drel_h + row_base * WIN_H, rows, SEQ, WIN_H, tl.arange(0, WIN_H_PAD), WIN_H, drel_rows)
                store_tile(drel_w + row_base * WIN_W, rows, SEQ, WIN_W, tl.arange(0, WIN_W_PAD), WIN_W, drel_columns)
            if BIAS_GRAD:
                if ONE_BLOCK:
                    dbias_acc += ds
                else:
                    _add_to_partial(partial, rows, keys, SEQ, ds, window > first)
        store_tile(dk + offset, keys, SEQ, HEAD_DIM, cols, HEAD_DIM, dk_acc * grad_scale)
        store_tile(dv + offset, keys, SEQ, HEAD_DIM, cols, HEAD_DIM, dv_acc)
    if BIAS_GRAD:
        if ONE_BLOCK:
            store_tile(partial, tl.arange(0, BLOCK_M), SEQ, SEQ, keys, SEQ, dbias_acc)


@triton.jit
def _attend(q_tile, k_base, v_base, bias_head, mask_window, rel, rows, qk_scale, stride_kn, stride_kd, stride_vn,
            stride_vd, SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, WIN_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
            HAS_REL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(softmax(scores) v float32 [len(rows), BLOCK_D], base-2 logsumexp [len(rows)]) of a block
    of query rows, walking the window's keys in blocks with an online softmax."""
    cols = tl.arange(0, BLOCK_D)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, SEQ, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k_tile = load_tile(k_base, keys, SEQ, stride_kn, cols, HEAD_DIM, stride_kd, UPCAST)
        v_tile = load_tile(v_base, keys, SEQ, stride_vn, cols, HEAD_DIM, stride_vd, UPCAST)
        s = _scores(q_tile, k_tile, bias_head, mask_window, rel, rows, keys, qk_scale, SEQ, WIN_W, HAS_BIAS, HAS_MASK,
                    HAS_REL, DOT_PRECISION)
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # a row whose keys so far are all masked (-inf) has nothing to rescale: 0, not NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc / row_sum[:, None], row_max + tl.log2(row_sum)


@triton.autotune(_block_configs((64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)), key=_KEY)
@triton.jit
def _forward_blocked_kernel(
    q, k, v, window_ids, bias, mask, num_masks, head_scale, rel_h, rel_w, out, qk_scale, windows_heads,
    stride_qm, stride_qh, stride_qn, stride_qd, stride_km, stride_kh, stride_kn, stride_kd,
    stride_vm, stride_vh, stride_vn, stride_vd,
    stride_rhm, stride_rhh, stride_rhn, stride_rha, stride_rwm, stride_rwh, stride_rwn, stride_rwb,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_SCALE: tl.constexpr, HAS_REL: tl.constexpr,
    WIN_H: tl.constexpr, WIN_W: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Key blocks: the output of one query block of one window and head."""
    window = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    num_heads = tl.num_programs(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    if HEAD_SCALE:
        qk_scale *= tl.load(head_scale + head).to(tl.float32)
    q_tile = load_tile(q + window * stride_qm + head * stride_qh, rows, SEQ, stride_qn, cols, HEAD_DIM, stride_qd,
                       UPCAST)
    rel = _rel_rows(_window_rel_pos(rel_h, rel_w, window, head, stride_rhm, stride_rhh, stride_rhn, stride_rha,
                                    stride_rwm, stride_rwh, stride_rwn, stride_rwb), rows, SEQ, WIN_H, WIN_W, HAS_REL)
    o, _ = _attend(q_tile, k + window * stride_km + head * stride_kh, v + window * stride_vm + head * stride_vh,
                   bias + head * (SEQ * SEQ), _window_mask(mask, window_ids, window, num_masks, SEQ, HAS_MASK), rel,
                   rows, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, SEQ, HEAD_DIM, BLOCK_M, BLOCK_N,
                   BLOCK_D, WIN_W, HAS_BIAS, HAS_MASK, HAS_REL, UPCAST, DOT_PRECISION)
    store_tile(out + (window * num_heads + head) * (SEQ * HEAD_DIM), rows, SEQ, HEAD_DIM, cols, HEAD_DIM, o)


@triton.autotune(_block_configs((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)), key=_KEY)
@triton.jit
def _backward_dq_blocked_kernel(
    q, k, v, dout, window_ids, bias, mask, num_masks, head_scale, rel_h, rel_w, dq, lse, delta, dscale_rows,
    drel_h, drel_w, qk_scale, scale, windows_heads,
    stride_qm, stride_qh, stride_qn, stride_qd, stride_km, stride_kh, stride_kn, stride_kd,
    stride_vm, stride_vh, stride_vn, stride_vd, stride_dom, stride_doh, stride_don, stride_dod,
    stride_rhm, stride_rhh, stride_rhn, stride_rha, stride_rwm, stride_rwh, stride_rwn, stride_rwb,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_SCALE: tl.constexpr, HAS_REL: tl.constexpr,
    WIN_H: tl.constexpr, WIN_W: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Key blocks, for one query block of one window and head: the forward again, for the
    base-2 logsumexp and delta = rowsum(dO * O) (saved to lse, delta [M, H, SEQ] for the dk/dv
    kernel), then dq, sum(q * (dS k)) per row into dscale_rows [M, H, SEQ], and the rows'
    drel_h [M, H, SEQ, WIN_H] and drel_w [M, H, SEQ, WIN_W], summed over the key blocks."""
    window = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    num_heads = tl.num_programs(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    grad_scale = scale
    if HEAD_SCALE:
        head_factor = tl.load(head_scale + head).to(tl.float32)
        qk_scale *= head_factor
        grad_scale *= head_factor
    k_base = k + window * stride_km + head * stride_kh
    v_base = v + window * stride_vm + head * stride_vh
    bias_head = bias + head * (SEQ * SEQ)
    mask_window = _window_mask(mask, window_ids, window, num_masks, SEQ, HAS_MASK)
    rel = _rel_rows(_window_rel_pos(rel_h, rel_w, window, head, stride_rhm, stride_rhh, stride_rhn, stride_rha,
                                    stride_rwm, stride_rwh, stride_rwn, stride_rwb), rows, SEQ, WIN_H, WIN_W, HAS_REL)
    q_tile = load_tile(q + window * stride_qm + head * stride_qh, rows, SEQ, stride_qn, cols, HEAD_DIM, stride_qd,
                       UPCAST)
    do_tile = load_tile(dout + window * stride_dom + head * stride_doh, rows, SEQ, stride_don, cols, HEAD_DIM,
                        stride_dod, UPCAST)
    o, lse2 = _attend(q_tile, k_base, v_base, bias_head, mask_window, rel, rows, qk_scale, stride_kn, stride_kd,
                      stride_vn, stride_vd, SEQ, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, WIN_W, HAS_BIAS, HAS_MASK,
                      HAS_REL, UPCAST, DOT_PRECISION)
    row_delta = tl.sum(do_tile.to(tl.float32) * o, 1)
    row_base = (window * num_heads + head) * SEQ
    tl.store(lse + row_base + rows, lse2, mask=rows < SEQ)
    tl.store(delta + row_base + rows, row_delta, mask=rows < SEQ)

    WIN_H_PAD: tl.constexpr = _dot_width(WIN_H)
    WIN_W_PAD: tl.constexpr = _dot_width(WIN_W)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    drel_rows = tl.zeros([BLOCK_M, WIN_H_PAD], tl.float32)
    drel_columns = tl.zeros([BLOCK_M, WIN_W_PAD], tl.float32)
    for n0 in range(0, SEQ, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k_tile = load_tile(k_base, keys, SEQ, stride_kn, cols, HEAD_DIM, stride_kd, UPCAST)
        v_tile = load_tile(v_base, keys, SEQ, stride_vn, cols, HEAD_DIM, stride_vd, UPCAST)
        s = _scores(q_tile, k_tile, bias_head, mask_window, rel, rows, keys, qk_scale, SEQ, WIN_W, HAS_BIAS, HAS_MASK,
                    HAS_REL, DOT_PRECISION)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
        ds = p * (dp - row_delta[:, None])
        acc += tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=DOT_PRECISION)
        if HAS_REL:
            # on the tensor cores, ds rounded as for dq = dS k just above: float32 "ieee" dots
            # (FMA) made this kernel spill ~1 KB per thread on sm_90, these none
            block_rows, block_columns = _rel_grads(ds, keys, k_tile.dtype, WIN_W, WIN_H_PAD, WIN_W_PAD,
                                                   DOT_PRECISION)
            drel_rows += block_rows
            drel_columns += block_columns
    if HEAD_SCALE:
        tl.store(dscale_rows + row_base + rows, tl.sum(q_tile.to(tl.float32) * acc, 1), mask=rows < SEQ)
    store_tile(dq + row_base * HEAD_DIM, rows, SEQ, HEAD_DIM, cols, HEAD_DIM, acc * grad_scale)
    if HAS_REL:
        store_tile(drel_h + row_base * WIN_H, rows, SEQ, WIN_H, tl.arange(0, WIN_H_PAD), WIN_H, drel_rows)
        store_tile(drel_w + row_base * WIN_W, rows, SEQ, WIN_W, tl.arange(0, WIN_W_PAD), WIN_W, drel_columns)


@triton.autotune(_block_configs((64, 64, 8, 2), (128, 64, 8, 2), (32, 128, 8, 2)), key=_KEY + ["BIAS_GRAD"])
@triton.jit
def _backward_dkdv_blocked_kernel(
    q, k, v, dout, window_ids, bias, mask, num_masks, head_scale, rel_h, rel_w, dk, dv, lse, delta, dbias_partials,
    num_windows, windows_per_program, qk_scale, scale, windows_heads,
    stride_qm, stride_qh, stride_qn, stride_qd, stride_km, stride_kh, stride_kn, stride_kd,
    stride_vm, stride_vh, stride_vn, stride_vd, stride_dom, stride_doh, stride_don, stride_dod,
    stride_rhm, stride_rhh, stride_rhn, stride_rha, stride_rwm, stride_rwh, stride_rwn, stride_rwb,
    SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_SCALE: tl.constexpr, HAS_REL: tl.constexpr,
    WIN_H: tl.constexpr, WIN_W: tl.constexpr, BIAS_GRAD: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Key blocks, for one key block (program axis 2) and head of windows_per_program
    consecutive windows: dk and dv, looping over each window's queries with the probabilities
    from the saved logsumexp, and the windows' dS summed into this program's dbias slot."""
    group = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    num_heads = tl.num_programs(1)
    first = group * windows_per_program
    keys = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    bias_head = bias + head * (SEQ * SEQ)
    partial = dbias_partials + (group * num_heads + head) * (SEQ * SEQ)
    grad_scale = scale
    if HEAD_SCALE:
        head_factor = tl.load(head_scale + head).to(tl.float32)
        qk_scale *= head_factor
        grad_scale *= head_factor
    for window in range(first, tl.minimum(first + windows_per_program, num_windows)):
        mask_window = _window_mask(mask, window_ids, window, num_masks, SEQ, HAS_MASK)
        rel_window = _window_rel_pos(rel_h, rel_w, window, head, stride_rhm, stride_rhh, stride_rhn, stride_rha,
                                     stride_rwm, stride_rwh, stride_rwn, stride_rwb)
        k_tile = load_tile(k + window * stride_km + head * stride_kh, keys, SEQ, stride_kn, cols, HEAD_DIM, stride_kd,
                           UPCAST)
        v_tile = load_tile(v + window * stride_vm + head * stride_vh, keys, SEQ, stride_vn, cols, HEAD_DIM, stride_vd,
                           UPCAST)
        q_base = q + window * stride_qm + head * stride_qh
        do_base = dout + window * stride_dom + head * stride_doh
        row_base = (window * num_heads + head) * SEQ
        dk_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for m0 in range(0, SEQ, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            q_tile = load_tile(q_base, rows, SEQ, stride_qn, cols, HEAD_DIM, stride_qd, UPCAST)
            do_tile = load_tile(do_base, rows, SEQ, stride_don, cols, HEAD_DIM, stride_dod, UPCAST)
            # Rows past the end read q = dO = 0 and delta = 0, so their dS is 0 and their p
            # meets dO = 0: they add nothing.
            lse2 = tl.load(lse + row_base + rows, mask=rows < SEQ, other=0.0)
            row_delta = tl.load(delta + row_base + rows, mask=rows < SEQ, other=0.0)
            rel = _rel_rows(rel_window, rows, SEQ, WIN_H, WIN_W, HAS_REL)
            s = _scores(q_tile, k_tile, bias_head, mask_window, rel, rows, keys, qk_scale, SEQ, WIN_W, HAS_BIAS,
                        HAS_MASK, HAS_REL, DOT_PRECISION)
            p = tl.exp2(s - lse2[:, None])
            dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
            ds = p * (dp - row_delta[:, None])
            dv_acc += tl.dot(tl.trans(p).to(do_tile.dtype), do_tile, input_precision=DOT_PRECISION)
            dk_acc += tl.dot(tl.trans(ds).to(q_tile.dtype), q_tile, input_precision=DOT_PRECISION)
            if BIAS_GRAD:
                _add_to_partial(partial, rows, keys, SEQ, ds, window > first)
        store_tile(dk + row_base * HEAD_DIM, keys, SEQ, HEAD_DIM, cols, HEAD_DIM, dk_acc * grad_scale)
        store_tile(dv + row_base * HEAD_DIM, keys, SEQ, HEAD_DIM, cols, HEAD_DIM, dv_acc)


# ------------------------------------------------------------------------------ launchers
def one_key_block(n: int) -> bool:
    """Whether a window of n tokens takes the one-block kernels (else the key-block ones)."""
    return max(16, triton.next_power_of_2(n)) <= MAX_ONE_BLOCK_KEYS


def _constexprs(q, bias, mask, head_scale=None, rel_h=None, rel_w=None):
    """Tile sizes and flags of the kernels for q's window size (the key-block kernels take
    their BLOCK_M and BLOCK_N from the autotuner). WIN_H, WIN_W: the window's rows and columns
    where rel_h and rel_w are given (else 1, one compiled variant)."""
    n, D = q.shape[2:]
    flags = dict(SEQ=n, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), HAS_BIAS=bias is not None,
                 HAS_MASK=mask is not None, HEAD_SCALE=head_scale is not None, HAS_REL=rel_h is not None,
                 WIN_H=1 if rel_h is None else rel_h.shape[3], WIN_W=1 if rel_w is None else rel_w.shape[3],
                 UPCAST=INTERPRET, DOT_PRECISION=dot_precision(q.dtype))
    if not one_key_block(n):
        return flags
    keys = max(16, triton.next_power_of_2(n))
    # A window of up to 64 tokens is one query block on a GPU; larger ones are walked in blocks
    # of 16 rows, which keeps the backward's [BLOCK_M, KEYS] tiles and its dK, dV accumulators
    # in registers (n = 144 with 32 rows spills on sm_90). Under the interpreter blocks of 32
    # rows, so that the tests cover both one and several query blocks.
    block_m = min(keys, 32) if INTERPRET else keys if keys <= 64 else 16
    return dict(flags, KEYS=keys, BLOCK_M=block_m)


def _bias_and_mask(q, bias, mask):
    """bias, mask (contiguous; q stands in for an absent one, never read) and the number of masks."""
    return [q if t is None else t.contiguous() for t in (bias, mask)] + [1 if mask is None else mask.shape[0]]


def _rel_pos(q, rel_h, rel_w):
    """rel_h, rel_w as given (any strides; q stands in for absent ones, never read)."""
    return (q, q) if rel_h is None else (rel_h, rel_w)


def _windows_per_program(M: int, H: int, n: int, bias_grad: bool) -> int:
    """Consecutive windows per backward program that sees dS: one without a bias gradient, else
    as few as keep the dbias partials ([programs, H, n, n]) under PARTIAL_ELEMENTS floats."""
    if not bias_grad:
        return 1
    slots = max(1, min(M, PARTIAL_ELEMENTS // (H * n * n)))
    return triton.cdiv(M, slots)


def forward(q, k, v, window_ids, bias, mask, scale: float, head_scale=None, rel_h=None, rel_w=None):
    """-> out [M, H, n, D] (contiguous). bias [H, n, n], mask [nW, n, n], head_scale [H]
    (float32, multiplies scale) and rel_h [M, H, n, wh] with rel_w [M, H, n, ww] may be None."""
    M, H, n, _ = q.shape
    out = empty_output(q)
    if M:
        rel = _rel_pos(q, rel_h, rel_w)
        args = (q, k, v, window_ids.contiguous(), *_bias_and_mask(q, bias, mask),
                q if head_scale is None else head_scale.contiguous(), *rel, out)
        flags = _constexprs(q, bias, mask, head_scale, rel_h, rel_w)
        with on_device_of(q):
            if one_key_block(n):
                tuned(_forward_kernel)[lambda meta: (triton.cdiv(M, meta["WINDOWS"]), H)](
                    *args, M, scale * LOG2E, bucket(M * H), *strides(q, k, v, *rel), **flags)
            else:
                tuned(_forward_blocked_kernel)[lambda meta: (M, H, triton.cdiv(n, meta["BLOCK_M"]))](
                    *args, scale * LOG2E, bucket(M * H), *strides(q, k, v, *rel), **flags)
    return out.to(q.dtype)


def backward(dout, q, k, v, window_ids, bias, mask, scale: float, bias_grad: bool, head_scale=None, rel_h=None,
             rel_w=None):
    """-> dq, dk, dv [M, H, n, D] (contiguous), dbias [H, n, n] in bias's dtype (empty unless
    bias_grad), dhead_scale [H] float32 (empty without head_scale), drel_h and drel_w
    (contiguous) in rel_h's and rel_w's shapes and dtypes (empty without them)."""
    M, H, n, _ = q.shape
    dq, dk, dv = (empty_output(q) for _ in range(3))
    per_program = _windows_per_program(M, H, n, bias_grad)
    groups = triton.cdiv(M, per_program) if M else 0
    dbias_partials = q.new_empty((groups, H, n, n) if bias_grad else (0,), dtype=torch.float32)
    dscale_rows = q.new_empty((M, H, n) if head_scale is not None else (0,), dtype=torch.float32)
    # float32, cast afterwards (they are small; under the interpreter a bf16 store would truncate)
    drel_h, drel_w = (q.new_empty(0) if t is None else q.new_empty(t.shape, dtype=torch.float32) for t in (rel_h, rel_w))
    if M:
        rel = _rel_pos(q, rel_h, rel_w)
        inputs = (q, k, v, dout, window_ids.contiguous(), *_bias_and_mask(q, bias, mask),
                  q if head_scale is None else head_scale.contiguous(), *rel)
        scalars = (scale * LOG2E, scale, bucket(M * H))  # qk_scale, scale, windows_heads
        flags = _constexprs(q, bias, mask, head_scale, rel_h, rel_w)
        with on_device_of(q):
            if one_key_block(n):
                tuned(_backward_kernel)[(groups, H)](
                    *inputs, dq, dk, dv, dbias_partials, dscale_rows, drel_h, drel_w, M, per_program, *scalars,
                    *strides(q, k, v, dout, *rel), BIAS_GRAD=bias_grad, **flags)
            else:
                lse, delta = (torch.empty(M, H, n, dtype=torch.float32, device=q.device) for _ in range(2))
                tuned(_backward_dq_blocked_kernel)[lambda meta: (M, H, triton.cdiv(n, meta["BLOCK_M"]))](
                    *inputs, dq, lse, delta, dscale_rows, drel_h, drel_w, *scalars, *strides(q, k, v, dout, *rel),
                    **flags)
                tuned(_backward_dkdv_blocked_kernel)[lambda meta: (groups, H, triton.cdiv(n, meta["BLOCK_N"]))](
                    *inputs, dk, dv, lse, delta, dbias_partials, M, per_program, *scalars,
                    *strides(q, k, v, dout, *rel), BIAS_GRAD=bias_grad, **flags)
    # the partial sums in a fixed order (no windows: zeros)
    dbias = dbias_partials.sum(0).to(bias.dtype) if bias_grad else dbias_partials
    dhead_scale = dscale_rows.sum((0, 2)) * scale if head_scale is not None else dscale_rows
    if rel_h is not None:
        drel_h, drel_w = drel_h.to(rel_h.dtype), drel_w.to(rel_w.dtype)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dbias, dhead_scale, drel_h, drel_w
