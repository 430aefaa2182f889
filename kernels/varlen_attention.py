"""Flash attention over packed variable-length sequences (q, k, v [T, H, D], sequence b is
rows cu_seqlens[b]:cu_seqlens[b+1]), forward and backward, with the class-attention row as a
side output of the forward, and the attention each token receives as a second pass.

One program per (sequence and query or key block, head): program axis 0 numbers the blocks
of each sequence in turn (the number of blocks per sequence comes from max_seqlen, and blocks
past a sequence's end exit at once), so that any number of sequences fits the grid (CUDA caps
its other axes at 65535). Offsets that can pass 2**31 elements (a head times a stride or T)
are int64. Head dims that are not a power of
two (80, 96) take the next power-of-two tile, masked. Softmax runs in base 2 with log2(e)
folded into the scale; the saved logsumexp `lse` [H, T] is float32 in natural-log units.

Class attention: the program of a sequence's first query block knows query row 0's final
logsumexp once its pass is done, so it sweeps that sequence's keys once more (tiles it just
read, so mostly cache hits) for that single row — a vector dot product per key, no second
matmul, no rescaling — and writes the exact probabilities to a per-head buffer [H, T]. The
mean over heads is one small reduction after the kernel: deterministic, unlike fp32 atomics
across heads (and those would need a zero fill first, which is a launch too).

Received attention (ViTs without a class token): a second kernel, launched after the
forward, per key block loops over the sequence's queries like the dK/dV kernel, recomputes
the probabilities from the saved logsumexp and sums them per key (one matmul, no V, no
atomics); the mean over heads again is one reduction after it.

Backward (deterministic, no atomics): the dQ kernel also computes delta = rowsum(dO * O) for
its rows (it loads both anyway) and saves it; the dK/dV kernel, launched after it, reads it.
"""
import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, LOG2E, LOG2E_CONST, autotune_configs, bucket, dot_precision, empty_output,
                      load_tile, on_device_of, store_tile, strides, tuned)


def _configs(*blocks):
    """Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) for CUDA; one small fixed
    tile under the interpreter (which cannot autotune), with BLOCK_M != BLOCK_N so that tests
    with short sequences cross block boundaries both ways."""
    return autotune_configs(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in blocks],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4))


# Tuned per head dim, per power-of-two bucket of max_seqlen (not max_seqlen itself, which
# changes with every pruning decision) and of sequences x heads (batch_heads: how many
# programs share the GPU); the autotuner adds the dtypes to the key.
_KEY = ["head_dim", "seq_bucket", "batch_heads"]


@triton.jit
def _sequence(cu_seqlens, total_tokens, max_seqlen, BLOCK: tl.constexpr):
    """(block, first row, length) of the sequence block this program works on (program axis
    0: the cdiv(max_seqlen, BLOCK) blocks of sequence 0, then of sequence 1, ...), the
    sequence clamped to the T rows so that a cu_seqlens left unchecked (no_index_checks)
    cannot send a program out of bounds. Rows past max_seqlen are not covered by the grid:
    they are left unwritten."""
    blocks = tl.cdiv(max_seqlen, BLOCK)
    seq = tl.program_id(0) // blocks
    start = tl.minimum(tl.maximum(tl.load(cu_seqlens + seq), 0), total_tokens)
    end = tl.minimum(tl.maximum(tl.load(cu_seqlens + seq + 1), start), total_tokens)
    return tl.program_id(0) % blocks, start.to(tl.int64), end - start


@triton.autotune(_configs((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)),
                 key=_KEY + ["RETURN_CLS"])
@triton.jit
def _forward_kernel(
    q, k, v, out, lse, cls_heads, cu_seqlens,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, total_tokens, max_seqlen, head_dim, qk_scale, seq_bucket, batch_heads,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RETURN_CLS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    m_block, start, length = _sequence(cu_seqlens, total_tokens, max_seqlen, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)
    if m_block * BLOCK_M >= length:
        return
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q_base = q + start * stride_qt + head * stride_qh
    k_base = k + start * stride_kt + head * stride_kh
    v_base = v + start * stride_vt + head * stride_vh
    q_tile = load_tile(q_base, rows, length, stride_qt, cols, head_dim, stride_qd, UPCAST)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k_tile = load_tile(k_base, keys, length, stride_kt, cols, head_dim, stride_kd, UPCAST)
        v_tile = load_tile(v_base, keys, length, stride_vt, cols, head_dim, stride_vd, UPCAST)
        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(keys[None, :] < length, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        p = tl.exp2(s - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        row_max = new_max

    out_base = out + start * stride_ot + head * stride_oh
    store_tile(out_base, rows, length, stride_ot, cols, head_dim, acc / row_sum[:, None])
    lse2 = row_max + tl.log2(row_sum)
    tl.store(lse + head * total_tokens + start + rows, lse2 / LOG2E_CONST, mask=rows < length)

    if RETURN_CLS:
        if m_block == 0:
            cls_lse2 = tl.sum(tl.where(rows == 0, lse2, 0.0), 0)
            cls_query = tl.load(q_base + cols * stride_qd, mask=cols < head_dim, other=0.0).to(tl.float32)
            for n0 in range(0, length, BLOCK_N):
                keys = n0 + tl.arange(0, BLOCK_N)
                k_tile = load_tile(k_base, keys, length, stride_kt, cols, head_dim, stride_kd, UPCAST)
                s = tl.sum(k_tile.to(tl.float32) * cls_query[None, :], 1) * qk_scale - cls_lse2
                p = tl.exp2(tl.where(keys < length, s, float("-inf")))  # past the end, s may overflow
                tl.store(cls_heads + head * total_tokens + start + keys, p, mask=keys < length)


@triton.autotune(_configs((64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)), key=_KEY)
@triton.jit
def _backward_dq_kernel(
    q, k, v, out, dout, lse, delta, dq, cu_seqlens,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod, stride_ot, stride_oh, total_tokens, max_seqlen, head_dim, qk_scale, scale,
    seq_bucket, batch_heads,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ for one query block, and delta = rowsum(dO * O) of its rows for the dK/dV kernel."""
    m_block, start, length = _sequence(cu_seqlens, total_tokens, max_seqlen, BLOCK_M)
    head = tl.program_id(1).to(tl.int64)
    if m_block * BLOCK_M >= length:
        return
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    k_base = k + start * stride_kt + head * stride_kh
    v_base = v + start * stride_vt + head * stride_vh
    offset = start * stride_ot + head * stride_oh  # out and dq: contiguous [T, H, D]
    q_tile = load_tile(q + start * stride_qt + head * stride_qh, rows, length, stride_qt, cols, head_dim, stride_qd,
                        UPCAST)
    do_tile = load_tile(dout + start * stride_dot + head * stride_doh, rows, length, stride_dot, cols, head_dim,
                         stride_dod, UPCAST)
    o_tile = load_tile(out + offset, rows, length, stride_ot, cols, head_dim, 1, UPCAST)
    row_delta = tl.sum(do_tile.to(tl.float32) * o_tile.to(tl.float32), 1)
    tl.store(delta + head * total_tokens + start + rows, row_delta, mask=rows < length)
    lse2 = tl.load(lse + head * total_tokens + start + rows, mask=rows < length, other=0.0) * LOG2E_CONST

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k_tile = load_tile(k_base, keys, length, stride_kt, cols, head_dim, stride_kd, UPCAST)
        v_tile = load_tile(v_base, keys, length, stride_vt, cols, head_dim, stride_vd, UPCAST)
        s2 = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None]
        # Keys past the end read k = 0: their p would be exp2(-lse2), which overflows for
        # very negative scores, and inf * 0 = NaN in the dot below.
        p = tl.exp2(tl.where(keys[None, :] < length, s2, float("-inf")))
        dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
        ds = p * (dp - row_delta[:, None])
        acc += tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=DOT_PRECISION)

    store_tile(dq + offset, rows, length, stride_ot, cols, head_dim, acc * scale)


@triton.autotune(_configs((64, 64, 4, 2), (64, 128, 8, 2), (128, 128, 8, 2)), key=_KEY)
@triton.jit
def _backward_dkdv_kernel(
    q, k, v, dout, lse, delta, dk, dv, cu_seqlens,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod, stride_ot, stride_oh, total_tokens, max_seqlen, head_dim, qk_scale, scale,
    seq_bucket, batch_heads,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK and dV for one key block (program axis 0), looping over the sequence's queries;
    scores are computed transposed ([keys, queries]) so no tile needs a transpose after."""
    n_block, start, length = _sequence(cu_seqlens, total_tokens, max_seqlen, BLOCK_N)
    head = tl.program_id(1).to(tl.int64)
    if n_block * BLOCK_N >= length:
        return
    keys = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    q_base = q + start * stride_qt + head * stride_qh
    do_base = dout + start * stride_dot + head * stride_doh
    k_tile = load_tile(k + start * stride_kt + head * stride_kh, keys, length, stride_kt, cols, head_dim, stride_kd,
                        UPCAST)
    v_tile = load_tile(v + start * stride_vt + head * stride_vh, keys, length, stride_vt, cols, head_dim, stride_vd,
                        UPCAST)

    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for m0 in range(0, length, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q_tile = load_tile(q_base, rows, length, stride_qt, cols, head_dim, stride_qd, UPCAST)
        do_tile = load_tile(do_base, rows, length, stride_dot, cols, head_dim, stride_dod, UPCAST)
        # Rows past the end read q = dO = 0, so they add nothing to dK or dV.
        lse2 = tl.load(lse + head * total_tokens + start + rows, mask=rows < length, other=0.0) * LOG2E_CONST
        row_delta = tl.load(delta + head * total_tokens + start + rows, mask=rows < length, other=0.0)
        s2_t = tl.dot(k_tile, tl.trans(q_tile), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :]
        p_t = tl.exp2(tl.where(keys[:, None] < length, s2_t, float("-inf")))  # as in the dQ kernel
        dv_acc += tl.dot(p_t.to(do_tile.dtype), do_tile, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - row_delta[None, :])
        dk_acc += tl.dot(ds_t.to(q_tile.dtype), q_tile, input_precision=DOT_PRECISION)

    offset = start * stride_ot + head * stride_oh  # dk and dv: contiguous [T, H, D]
    store_tile(dk + offset, keys, length, stride_ot, cols, head_dim, dk_acc * scale)
    store_tile(dv + offset, keys, length, stride_ot, cols, head_dim, dv_acc)


@triton.autotune(_configs((64, 64, 4, 2), (64, 128, 8, 2), (128, 128, 8, 2)), key=_KEY)
@triton.jit
def _received_kernel(
    q, k, lse, received_heads, cu_seqlens,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, total_tokens, max_seqlen, head_dim, qk_scale,
    seq_bucket, batch_heads,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """For one key block (program axis 0): the mean over the sequence's queries of their
    softmax probability at each key, from the forward's logsumexp (the dK/dV kernel's loop
    without dO, V or the second matmul), into received_heads [H, T]."""
    n_block, start, length = _sequence(cu_seqlens, total_tokens, max_seqlen, BLOCK_N)
    head = tl.program_id(1).to(tl.int64)
    if n_block * BLOCK_N >= length:
        return
    keys = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    q_base = q + start * stride_qt + head * stride_qh
    k_tile = load_tile(k + start * stride_kt + head * stride_kh, keys, length, stride_kt, cols, head_dim, stride_kd,
                        UPCAST)
    total = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, length, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q_tile = load_tile(q_base, rows, length, stride_qt, cols, head_dim, stride_qd, UPCAST)
        lse2 = tl.load(lse + head * total_tokens + start + rows, mask=rows < length, other=0.0) * LOG2E_CONST
        s2_t = tl.dot(k_tile, tl.trans(q_tile), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :]
        inside = (keys[:, None] < length) & (rows[None, :] < length)  # rows past the end would add exp2(0)
        total += tl.sum(tl.exp2(tl.where(inside, s2_t, float("-inf"))), 1)
    tl.store(received_heads + head * total_tokens + start + keys, total / length, mask=keys < length)


def _shape_args(q, max_seqlen, num_seqs):
    """Arguments shared by all the kernels: T, max_seqlen, D, padded D and the autotune buckets."""
    T, H, D = q.shape
    return dict(total_tokens=T, max_seqlen=max_seqlen, head_dim=D, seq_bucket=bucket(max_seqlen),
                batch_heads=bucket(num_seqs * H), BLOCK_D=max(16, triton.next_power_of_2(D)), UPCAST=INTERPRET,
                DOT_PRECISION=dot_precision(q.dtype))


def _grid(block: str, num_heads: int, max_seqlen: int, num_seqs: int):
    """(sequences x their blocks, heads): see _sequence."""
    return lambda meta: (num_seqs * triton.cdiv(max_seqlen, meta[block]), num_heads)


def forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float, return_cls_attn: bool):
    """-> out [T, H, D] (contiguous), lse float32 [H, T], cls_attn float32 [T] (empty unless
    return_cls_attn). q, k, v may be any strided views."""
    T, H, D = q.shape
    cu_seqlens = cu_seqlens.contiguous()
    out = empty_output(q)
    lse = torch.empty(H, T, dtype=torch.float32, device=q.device)
    cls_heads = torch.empty(H, T if return_cls_attn else 0, dtype=torch.float32, device=q.device)
    if T:
        num_seqs = cu_seqlens.numel() - 1
        with on_device_of(q):
            tuned(_forward_kernel)[_grid("BLOCK_M", H, max_seqlen, num_seqs)](
                q, k, v, out, lse, cls_heads, cu_seqlens, *strides(q, k, v), H * D, D,
                qk_scale=scale * LOG2E, RETURN_CLS=return_cls_attn, **_shape_args(q, max_seqlen, num_seqs),
            )
    return out.to(q.dtype), lse, cls_heads.mean(0) if return_cls_attn else cls_heads.new_empty(0)


def backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, scale: float):
    """-> dq, dk, dv [T, H, D] (contiguous). out and lse as returned by forward."""
    T, H, D = q.shape
    cu_seqlens, out, lse = cu_seqlens.contiguous(), out.contiguous(), lse.contiguous()
    dq, dk, dv = (empty_output(q) for _ in range(3))
    if T:
        delta = torch.empty_like(lse)
        num_seqs = cu_seqlens.numel() - 1
        args = dict(qk_scale=scale * LOG2E, scale=scale, **_shape_args(q, max_seqlen, num_seqs))
        with on_device_of(q):
            tuned(_backward_dq_kernel)[_grid("BLOCK_M", H, max_seqlen, num_seqs)](
                q, k, v, out, dout, lse, delta, dq, cu_seqlens, *strides(q, k, v, dout), H * D, D, **args
            )
            tuned(_backward_dkdv_kernel)[_grid("BLOCK_N", H, max_seqlen, num_seqs)](
                q, k, v, dout, lse, delta, dk, dv, cu_seqlens, *strides(q, k, v, dout), H * D, D, **args
            )
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def forward_received(q, k, v, cu_seqlens, max_seqlen: int, scale: float):
    """-> forward's out and lse, and received float32 [T]: per token, the softmax attention it
    receives, mean over its sequence's queries and the heads (a second pass from lse)."""
    out, lse, _ = forward(q, k, v, cu_seqlens, max_seqlen, scale, False)
    T, H, D = q.shape
    cu_seqlens = cu_seqlens.contiguous()
    received_heads = torch.empty(H, T, dtype=torch.float32, device=q.device)
    if T:
        num_seqs = cu_seqlens.numel() - 1
        with on_device_of(q):
            tuned(_received_kernel)[_grid("BLOCK_N", H, max_seqlen, num_seqs)](
                q, k, lse, received_heads, cu_seqlens, *strides(q, k), qk_scale=scale * LOG2E,
                **_shape_args(q, max_seqlen, num_seqs),
            )
    return out, lse, received_heads.mean(0)
