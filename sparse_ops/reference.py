"""Plain-PyTorch version of every op: the ground truth for the tests, and the fallback
when the compiled extension (or its CUDA part) is missing.

Window ops follow timm's SwinTransformerBlock literally: roll by -shift, zero-pad to
window multiples, window_partition, then pick windows; scatter_windows reverses it.
"""
import math

import torch
import torch.nn.functional as F

from .layout import TokenIndex, to_pair
from .select import kept_count


# ----------------------------------------------------------------------------- rows
def _padded_rows(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Maps padding rows (-1) to an extra row appended at index num_rows."""
    return torch.where(rows < 0, torch.full_like(rows, num_rows), rows)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    x_ext = torch.cat([x, x.new_zeros(1, x.shape[1])])
    return x_ext[_padded_rows(rows, x.shape[0])]


def scatter_rows(y: torch.Tensor, rows: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    base_ext = torch.cat([base, base.new_zeros(1, base.shape[1])])
    return base_ext.index_copy(0, _padded_rows(rows, base.shape[0]), y)[: base.shape[0]]


def scatter_add_rows(y: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    out = y.new_zeros(num_rows + 1, y.shape[1])
    return out.index_add(0, _padded_rows(rows, num_rows), y)[:num_rows]


# -------------------------------------------------------------------------- windows
def _to_frame(x: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    """[B, H, W, ...] -> rolled by -shift and zero-padded to window multiples."""
    (wh, ww), (sh, sw) = to_pair(window_size), to_pair(shift_size)
    H, W = x.shape[1], x.shape[2]
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    pad = [0, 0] * (x.dim() - 3) + [0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh]
    return F.pad(x, pad)


def _partition(x: torch.Tensor, window_size) -> torch.Tensor:
    """[B, Hp, Wp, C] -> [B, nW, wh*ww, C], windows in row-major order (timm's window_partition)."""
    wh, ww = to_pair(window_size)
    B, Hp, Wp, C = x.shape
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (Hp // wh) * (Wp // ww), wh * ww, C)


def _reverse(windows: torch.Tensor, window_size, Hp: int, Wp: int) -> torch.Tensor:
    """[B, nW, wh*ww, C] -> [B, Hp, Wp, C] (timm's window_reverse)."""
    wh, ww = to_pair(window_size)
    B, C = windows.shape[0], windows.shape[-1]
    x = windows.view(B, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, C)


def window_rows(windows: torch.Tensor, height: int, width: int, window_size, shift_size) -> torch.Tensor:
    B, K = windows.shape
    positions = torch.arange(height * width, device=windows.device).view(1, height, width, 1)
    frame = _to_frame(positions + 1, window_size, shift_size) - 1  # padding -> -1
    rows = _partition(frame, window_size)[0, :, :, 0][windows]  # [B, K, wh*ww]
    image = (torch.arange(B, device=windows.device) * height * width).view(B, 1, 1)
    return torch.where(rows < 0, rows, rows + image).reshape(-1)


def window_scores(x: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = x.to(dtype).abs().mean(-1, keepdim=True)  # [B, H, W, 1]
    windows = _partition(_to_frame(m, window_size, shift_size), window_size)
    return torch.linalg.vector_norm(windows, dim=(2, 3))  # its gradient at a zero norm: 0, not NaN


def gather_windows(x: torch.Tensor, windows: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    all_windows = _partition(_to_frame(x, window_size, shift_size), window_size)
    picked = torch.gather(all_windows, 1, windows.view(*windows.shape, 1, 1).expand(-1, -1, *all_windows.shape[2:]))
    return picked.reshape(-1, *all_windows.shape[2:])


def scatter_windows(y: torch.Tensor, base: torch.Tensor, windows: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    B, H, W, C = base.shape
    (sh, sw) = to_pair(shift_size)
    frame = _to_frame(base, window_size, shift_size)
    all_windows = _partition(frame, window_size)
    index = windows.view(*windows.shape, 1, 1).expand(-1, -1, *all_windows.shape[2:])
    all_windows = all_windows.scatter(1, index, y.view(B, windows.shape[1], *all_windows.shape[2:]))
    out = _reverse(all_windows, window_size, frame.shape[1], frame.shape[2])[:, :H, :W]
    return torch.roll(out, shifts=(sh, sw), dims=(1, 2)) if sh or sw else out


# --------------------------------------------------------------------------- tokens
def pruned_block_output(x: torch.Tensor, out: torch.Tensor, ranked_on: torch.Tensor, window_size, shift_size,
                        sparsity: float) -> torch.Tensor:
    """What a Swin block pruning `sparsity` of its windows returns, from the dense block's
    output: out [B, H, W, C] on the kept_count(1 - sparsity, nW) windows of the block's grid
    (ceil((1 - sparsity) * nW), float error aside) ranking highest by window_scores of
    ranked_on (its stage's input), its input x elsewhere."""
    scores = window_scores(ranked_on, window_size, shift_size)
    num_windows = scores.shape[1]
    kept = scores.topk(kept_count(1 - sparsity, num_windows), dim=1).indices
    inside = scatter_windows(x.new_ones(kept.numel(), math.prod(to_pair(window_size)), 1),
                             x.new_zeros(*x.shape[:3], 1), kept, window_size, shift_size)
    return torch.where(inside.bool(), out, x)


def gather_tokens(x: torch.Tensor, idx: TokenIndex) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[idx.index]


def scatter_tokens(y: torch.Tensor, idx: TokenIndex, base: torch.Tensor) -> torch.Tensor:
    return base.reshape(-1, base.shape[-1]).index_copy(0, idx.index, y).view_as(base)


def package_tokens(x: torch.Tensor, scores: torch.Tensor, idx: TokenIndex) -> torch.Tensor:
    """Per image, the score-weighted mean of the pruned tokens (zeros if none was pruned)."""
    B, N, C = x.shape
    out = []
    for b in range(B):
        kept = idx.index[idx.cu_seqlens[b] : idx.cu_seqlens[b + 1]] - b * N
        pruned = torch.ones(N, dtype=torch.bool, device=x.device)
        pruned[kept] = False
        w = scores[b][pruned].to(torch.float64)
        total = w.sum()
        weights = w / total if total > 0 else w * 0  # nothing to average: zeros, and zero gradients
        out.append((weights[:, None] * x[b][pruned].to(torch.float64)).sum(0))
    return torch.stack(out).to(x.dtype) if B else x.new_zeros(0, C)


def select_tokens(scores: torch.Tensor, keep_rate=None, mass=None, keep_prefix: int = 1, min_keep: int = 1) -> TokenIndex:
    """One image at a time: sort the candidates (tokens after the prefix) by score and keep
    kept_count(keep_rate, candidates) of them (the op's rule: ceil(keep_rate * candidates),
    float error aside), or the fewest whose share of the score mass reaches `mass`; at least
    min_keep, at most all."""
    B, N = scores.shape
    candidates = N - keep_prefix
    kept = []
    for b in range(B):
        order = torch.argsort(scores[b, keep_prefix:].to(torch.float64), descending=True, stable=True)
        if keep_rate is not None:
            k = kept_count(keep_rate, candidates)
        else:
            s = scores[b, keep_prefix:].to(torch.float64)[order]
            share = s.cumsum(0) / s.sum() if candidates else s
            k = int((share < mass).sum()) + 1 if mass < 1.0 else candidates
        k = min(max(k, min_keep), candidates)
        chosen = torch.sort(order[:k]).values + keep_prefix
        kept.append(torch.cat([torch.arange(keep_prefix, device=scores.device), chosen]) + b * N)
    index = torch.cat(kept) if kept else scores.new_zeros(0, dtype=torch.long)
    lengths = torch.tensor([len(k) for k in kept], dtype=torch.int32, device=scores.device)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=torch.int32)])
    return TokenIndex(index, cu, int(lengths.max()) if B else 0, B, N)


def select_windows(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    return torch.argsort(scores, dim=1, descending=True, stable=True)[:, :num_keep]


# ------------------------------------------------------------------------ attention
def _per_sequence_attention(q, k, v, cu_seqlens, scale, score):
    """One sequence at a time, in the inputs' dtype: out = softmax(q k^T * scale) v over the
    rows cu_seqlens[b]:cu_seqlens[b+1], and a per-token score [T] (float32, float64 for
    float64 inputs): score(p) of each sequence's probabilities p [H, queries, keys]."""
    T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    scores = q.new_zeros(T, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        p = torch.softmax((qs @ ks.transpose(1, 2)) * scale, dim=-1)
        out[start:end] = (p @ vs).transpose(0, 1)
        scores[start:end] = score(p).to(scores.dtype)
    return out, scores


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None, return_cls_attn=False):
    """One sequence at a time: softmax(q k^T * scale) v over the rows cu_seqlens[b]:cu_seqlens[b+1],
    computed in the inputs' dtype. cls_attn[t] (float32, float64 for float64 inputs) is the first
    row of t's sequence's attention matrix, at t's key position, averaged over heads."""
    out, cls_attn = _per_sequence_attention(q, k, v, cu_seqlens, scale, lambda p: p[:, 0].mean(0))
    return (out, cls_attn) if return_cls_attn else out


def received_attention(q, k, v, cu_seqlens, scale=None):
    """One sequence at a time, in the inputs' dtype: out = softmax(q k^T * scale) v over the rows
    cu_seqlens[b]:cu_seqlens[b+1], and received[t] (float32, float64 for float64 inputs): the
    mean over the sequence's queries and the heads of the attention they give to token t (the
    column of its key in the softmax), the token score of a ViT without a class token."""
    return _per_sequence_attention(q, k, v, cu_seqlens, scale, lambda p: p.mean(1).mean(0))


def window_attention(q, k, v, window_ids, bias=None, mask=None, scale=None, rel_h=None, rel_w=None):
    """softmax(q k^T * scale + bias[h] + mask[window_ids[m]] + rel) v for windows [M, H, n, D],
    computed in the inputs' dtype. scale: a number or a tensor [H] (one per head). rel: SAM's
    decomposed relative position, rel[m, h, i, j] = rel_h[m, h, i, j // ww] + rel_w[m, h, i, j % ww]
    (rel_h [M, H, n, wh], rel_w [M, H, n, ww]), materialised."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(scale, torch.Tensor):
        scale = scale.to(q.dtype).view(-1, 1, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if mask is not None:
        s = s + mask[window_ids].unsqueeze(1).to(s.dtype)
    if rel_h is not None:
        s = s + (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2).to(s.dtype)
    return torch.softmax(s, dim=-1) @ v


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """timm's get_rel_pos(size, size, rel_pos): the table [L, D] linearly resized to 2 * size - 1
    entries where L differs, then entry (i - j + size - 1) for each query i and key j: [size, size, D]."""
    max_rel_dist = 2 * size - 1
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist,
                                mode="linear")
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


def decomposed_rel_pos(q, rel_pos_h, rel_pos_w, window):
    """SAM's decomposed relative position of q [M, H, n, D] in windows of window = (wh, ww) tokens
    (n = wh * ww, row-major), as timm's get_decomposed_rel_pos_bias computes it before it expands
    the sum: rel_h [M, H, n, wh] (q . Rh[row of i, a]) and rel_w [M, H, n, ww] (q . Rw[column of i, b])."""
    wh, ww = window
    M, H, n, D = q.shape
    Rh, Rw = rel_pos_table(wh, rel_pos_h), rel_pos_table(ww, rel_pos_w)
    r_q = q.reshape(M * H, wh, ww, D)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    return rel_h.reshape(M, H, n, wh), rel_w.reshape(M, H, n, ww)


# ------------------------------------------------------------ fused GEMM prologue / epilogue
def gather_layernorm_linear(x, rows, norm_weight, norm_bias, weight, bias=None, eps=1e-5):
    xg = x if rows is None else gather_rows(x, rows)
    if norm_weight is not None:
        xg = F.layer_norm(xg, norm_weight.shape, norm_weight, norm_bias, eps)  # (static in a jit trace)
        if rows is not None:
            xg = xg * (rows >= 0).unsqueeze(1).to(xg.dtype)  # padding rows are zero after the norm
    return F.linear(xg, weight, bias)


def linear_residual_scatter(h, weight, bias, base, rows, residual=None):
    if rows is None:
        rows = torch.arange(base.shape[0], device=base.device)
    y = F.linear(h, weight, bias) + (residual if residual is not None else gather_rows(base, rows))
    return scatter_rows(y, rows, base)
