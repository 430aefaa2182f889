"""Token pruning in timm's Eva (EVA-02: rotary position embeddings, SwiGLU MLP, optional q/k
norms, LayerScale; the ROPE-ViTs vit_*_rope_*: AttentionRope, grouped-query attention, and
with 'mixed' rope one learnt table per block). SparseEvaBlock prunes as the ViT's SparseBlock
does (at a prune layer, per image the tokens with the most class attention in the block before
it, or without a class token the most attention received; kept tokens packed image after
image) and each kept token takes its rotary embedding with it: a block on Tokens rotates each
row's q and k by the rope row of that row's position in the token grid the model began with,
so a pruned block computes what timm's EvaBlock computes on the gathered sequence with the
gathered rope. Prefix tokens (class, register) are not rotated, as in timm; nor is a package
token, which has no position.

SparseEva keeps timm's return types as SparseVisionTransformer does: full token grids from
forward_features / forward_intermediates (a pruned token holds its value from the block before
the one that dropped it), the packed kept rows from forward_tokens.
"""
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models._features import feature_take_indices
from timm.models.eva import Eva, EvaBlock
from torch import Tensor

from ..fused import layernorm_linear
from ._common import drop_path, gather, inference_cached, linear
from .vit import SparseBlock, SparseVisionTransformer, Tokens, packed_attention


def rope_rows(rope: Tensor, positions: Tensor, num_prefix_tokens: int) -> Tensor:
    """[T, E], or [T, H, E] from a table per head: for each token at positions [T] (b * N + n
    in the [B, N] token grid; -1: a package token) its row of timm's rope table: [N - P, E],
    [H, N - P, E] (a block's 'mixed' rope: one table per head), or either per image after patch
    dropout ([B, 1 or H, N - P, E]). The prefix and package tokens get the identity rotation
    (sin 0, cos 1), which leaves q and k exactly as timm leaves the prefix tokens."""
    if rope.dim() not in (2, 3, 4):
        raise ValueError(f"rope must be [N, E], [H, N, E] or [B, 1 or H, N, E] (timm's rotary table), "
                         f"got shape {tuple(rope.shape)}")
    E, per_grid = rope.shape[-1], rope.shape[-2]
    heads = rope.shape[-3] if rope.dim() > 2 else 1
    N = per_grid + num_prefix_tokens
    image, n = positions.div(N, rounding_mode="floor"), positions.remainder(N)
    row = n - num_prefix_tokens
    if rope.dim() == 4:
        row = row + image * per_grid
    table = rope.reshape(-1, heads, per_grid, E).transpose(1, 2).reshape(-1, heads, E)  # [(B *) (N - P), H, E]
    identity = torch.cat([rope.new_zeros(E // 2), rope.new_ones(E // 2)])  # timm's [sin, cos] halves
    rotated = (positions >= 0) & (n >= num_prefix_tokens)
    return torch.where(rotated[:, None, None], table[row.clamp_min(0)], identity).squeeze(1)


def qkv_projection(block) -> tuple:
    """(weight, bias) of the block's q, k and v projections as one GEMM: the fused qkv Linear
    (EvaAttention's with timm's q_bias, zero k_bias and v_bias beside it, AttentionRope's with
    its own bias), or the three separate Linears stacked (k and v with fewer heads under
    grouped-query attention). What is concatenated is kept between inference calls
    (inference_cached)."""
    attn = block.attn
    if attn.qkv is not None:
        if getattr(attn, "q_bias", None) is None:  # AttentionRope, or EvaAttention without bias
            return attn.qkv.weight, attn.qkv.bias
        biases = (attn.q_bias, attn.k_bias, attn.v_bias)
        return attn.qkv.weight, inference_cached(block, "qkv_bias", lambda: torch.cat(biases), *biases)
    linears = (attn.q_proj, attn.k_proj, attn.v_proj)
    sources = [t for lin in linears for t in (lin.weight, lin.bias) if t is not None]
    return inference_cached(block, "qkv", lambda: _stacked(linears), *sources)


def _stacked(linears) -> tuple:
    weight = torch.cat([lin.weight for lin in linears])
    if all(lin.bias is None for lin in linears):
        return weight, None
    return weight, torch.cat([weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias for lin in linears])


class SparseEvaBlock(EvaBlock):
    """timm's EvaBlock (same parameters), which on Tokens prunes at its entry when it is a
    prune layer and returns the token scores when the next block prunes; rope is timm's
    table for the unpruned grid (Eva._pos_embed's), from which each row takes its own.

    Set by sparse_ops.patch.eva / set_sparsity: keep_rate, mass (None: by keep_rate), package,
    emit_cls_attn (return the scores), num_prefix_tokens, received_attention (the scores of a
    model without a class token: the attention each token receives, as SparseBlock's),
    rope_index (a model with one rope table per block, 'mixed': SparseEva hands every block
    all of them, [depth, ...], and this block takes table rope_index; None: rope is its table)."""
    # floats kept as exact integer ratios, as SparseBlock's (one compiled graph per density)
    _keep_rate_ratio, _mass_ratio = SparseBlock._keep_rate_ratio, SparseBlock._mass_ratio
    keep_rate, mass = SparseBlock.keep_rate, SparseBlock.mass
    package: bool = False
    emit_cls_attn: bool = False
    num_prefix_tokens: int = 1
    received_attention: bool = False
    rope_index: Optional[int] = None

    # SparseBlock's selection (top-k or mass of the scores, the package token) reads
    # only the attributes above and the Tokens: shared with the ViT, not copied.
    prunes = SparseBlock.prunes
    _select = SparseBlock._select
    _select_index = SparseBlock._select_index
    _add_package_token = SparseBlock._add_package_token
    __prepare_scriptable__ = SparseBlock.__prepare_scriptable__  # (refuses torch.jit.script)

    def forward(self, x, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        if isinstance(x, Tensor):
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if rope is not None and self.rope_index is not None:
            rope = rope[self.rope_index]
        tokens, rows = self._select(x) if self.prunes else (x, None)
        if tokens.index is None and not self.emit_cls_attn:  # the unpruned grid: timm's block on it
            out = super().forward(tokens.dense(), rope=rope).reshape(tokens.x.shape)
            return replace(tokens, x=out, cls_attn=None)
        return self._forward_packed(tokens, rows, rope)

    def _forward_packed(self, t: Tokens, rows: Optional[Tensor], rope: Optional[Tensor]) -> Tokens:
        attn = self.attn
        T = t.x.shape[0] if rows is None else rows.shape[0]
        src = t.x if t.x.stride(1) == 1 else t.x.contiguous()
        as_timm = t.index is None  # the full grid before any pruning: timm's GEMMs (see SparseBlock)
        if as_timm:
            qkv = F.linear(self.norm1(src), *qkv_projection(self))
        else:
            qkv = layernorm_linear(src, rows, self.norm1.weight, self.norm1.bias, self.norm1.eps, *qkv_projection(self))
        q_width = attn.num_heads * attn.head_dim
        kv_width = (qkv.shape[1] - q_width) // 2  # narrower under AttentionRope's grouped-query attention
        q, k, v = (z.unflatten(1, (-1, attn.head_dim)) for z in qkv.split([q_width, kv_width, kv_width], dim=1))
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            r = rope_rows(rope, t.positions(), attn.num_prefix_tokens).view(T, -1, rope.shape[-1])  # [T, 1 or H, E]
            q = apply_rot_embed_cat(q, r, half=attn.rotate_half).type_as(v)
            k = apply_rot_embed_cat(k, r, half=attn.rotate_half).type_as(v)
        groups = attn.num_heads // k.shape[1]
        if groups > 1:  # AttentionRope's grouped-query attention: after rope (once per kv head), as timm
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        o, cls_attn = packed_attention(q, k, v, t, attn.scale, self.emit_cls_attn, self.received_attention)
        o = attn.proj_drop(linear(attn.norm(o.reshape(T, -1)), attn.proj, as_timm))
        if self.gamma_1 is not None:
            o = self.gamma_1 * o
        x = gather(t.x, rows)
        # t.x still holds the rows before the gather: count images over the gathered ones
        sample = replace(t, x=x).sample_of_row() if self.training else None
        x = x + drop_path(self.drop_path1, o, sample, t.batch_size)
        h = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            h = self.gamma_2 * h
        x = x + drop_path(self.drop_path2, h, sample, t.batch_size)
        return Tokens(x, t.cu_seqlens, t.max_seqlen, t.batch_size, t.seq_len, cls_attn, t.index)


class SparseEva(Eva):
    """timm's Eva (same parameters) whose blocks pass Tokens when any of them prunes, with
    timm's return types, as SparseVisionTransformer (whose block loop, grid restoration and
    packed pooling it uses):

    - forward(x): logits, pooled from the packed kept tokens ('token': the class token row;
      'avg': the mean of the kept patch tokens).
    - forward_features(x): the [B, N, C] grid after the final norm, pruned tokens paused,
      carrying ``kept_tokens`` (bool [B, N]) for forward_head's 'avg'.
    - forward_tokens(x): the same, packed (Tokens of the kept rows; index: their grid positions).
    - forward_intermediates / features_only: timm's outputs, each a full grid.

    An empty batch, an attention mask, or no block that prunes: timm's forward, unchanged."""
    timm_class = Eva
    pool_include_prefix = False  # timm's Eva pools 'avg' over the patch tokens (global_pool_nlc)

    _prunes = SparseVisionTransformer._prunes
    _run_blocks = SparseVisionTransformer._run_blocks
    _kept_grid = SparseVisionTransformer._kept_grid
    _head = SparseVisionTransformer._head
    _pool_packed = SparseVisionTransformer._pool_packed

    def _embed(self, x: Tensor):
        """-> (tokens [B, N, C], timm's rope table or None)."""
        x, rope = self._pos_embed(self.patch_embed(x))
        return self.norm_pre(x), rope

    def forward_tokens(self, x: Tensor) -> Tokens:
        """The packed form of forward_features (see SparseVisionTransformer.forward_tokens)."""
        if not self._prunes(x):
            return Tokens.from_dense(super().forward_features(x))
        x, rope = self._embed(x)
        tokens, _ = self._run_blocks(x, rope=rope)
        return replace(tokens, x=self.norm(tokens.x), cls_attn=None)

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if not self._prunes(x, attn_mask, is_causal):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        last = len(self.blocks) - 1
        x, rope = self._embed(x)
        tokens, grids = self._run_blocks(x, take={last}, rope=rope)
        out = self.norm(grids[last])
        out.kept_tokens = self._kept_grid(tokens, out)
        return out

    def forward_head(self, x, pre_logits: bool = False):
        """timm's head on a tensor (forward_features' grid: 'avg' over its kept_tokens) or on
        Tokens (forward_tokens)."""
        if isinstance(x, Tokens):
            if self.global_pool == "token":
                return self._head(x.x[x.cu_seqlens[:-1].long()], pre_logits)
            if self.global_pool != "avg":
                raise ValueError(f"forward_head pools Tokens with global_pool 'token' or 'avg', not "
                                 f"{self.global_pool!r}; use forward_features' token grid")
            return self._head(self._pool_packed(x), pre_logits)
        kept = getattr(x, "kept_tokens", None)
        if kept is not None and self.global_pool == "avg":
            P = self.num_prefix_tokens
            weight = kept[:, P:].to(x.dtype).unsqueeze(-1)
            pooled = (x[:, P:] * weight).sum(1) / weight.sum(1).clamp_min(1)
            return self._head(pooled, pre_logits)
        return super().forward_head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        if not self._prunes(x, attn_mask, is_causal):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.global_pool in ("token", "avg"):
            return self.forward_head(self.forward_tokens(x))
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices=None, return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        """timm's forward_intermediates, pruning as forward does: each intermediate is the
        full token grid after its block (pruned tokens paused)."""
        if not self._prunes(x, attn_mask, is_causal):
            return super().forward_intermediates(
                x, indices, return_prefix_tokens=return_prefix_tokens, norm=norm, stop_early=stop_early,
                output_fmt=output_fmt, intermediates_only=intermediates_only, attn_mask=attn_mask,
                is_causal=is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        last = max_index if stop_early else len(self.blocks) - 1
        take = sorted(i for i in set(take_indices) if i <= last)
        x, rope = self._embed(x)
        _, grids = self._run_blocks(x, take=set(take) if intermediates_only else {*take, last}, last=last, rope=rope)
        intermediates = [self.norm(grids[i]) if norm else grids[i] for i in take]
        P = self.num_prefix_tokens
        prefix_tokens = [y[:, :P] for y in intermediates]
        intermediates = [y[:, P:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(grids[last]), intermediates
