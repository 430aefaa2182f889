"""Token pruning in timm ViT blocks (SaiT-style): a block that prunes keeps the tokens with the
most class attention in the block before it (without a class token: the most attention
received, see _received_attention), and it and every later block run on the kept tokens
only, packed image after image (per image a different count: never padded).

``Tokens`` is what flows between the blocks of a pruned model: the packed rows plus their
sequence bounds and positions. A SparseBlock given a plain [B, N, C] tensor is timm's Block,
unchanged.

Outside the model a pruned ViT shows timm's shapes: forward_features and forward_intermediates
return full [B, N, C] token grids in which a pruned token holds ("pauses at") its value from the
block before the one that dropped it; forward_tokens returns the packed kept rows.
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.models._features import feature_take_indices
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from .. import _autocast, _export
from .._backend import kernel
from ..attention import varlen as _varlen
from ..layout import TokenIndex
from ..select import mass_tokens, top_tokens
from ._common import drop_path, gather, linear, norm_linear


@dataclass
class Tokens:
    """A batch of token sequences packed as rows: image b is rows cu_seqlens[b]:cu_seqlens[b+1]
    of x [T, C]. seq_len is the common length when every image has it (known without a host
    sync: no pruning, a fixed keep rate, or a single image), else None. cls_attn [T] float32: per token, its
    score for the next pruning, from the last block: the class token's attention to it (mean
    over heads), or in a model without a class token the attention it received (mean over
    its image's queries and the heads; see _received_attention).
    index int64 [T]: each row's position b * N + n in the [B, N] token grid the model began
    with (-1: a package token, which has none); None: the rows are that grid, in order."""
    x: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    batch_size: int
    seq_len: Optional[int]
    cls_attn: Optional[Tensor] = None
    index: Optional[Tensor] = None

    @classmethod
    def from_dense(cls, x: Tensor, cls_attn: Optional[Tensor] = None) -> "Tokens":
        """From [B, N, C] tokens (and optionally [B, N] class attention)."""
        B, N, C = x.shape
        cu = torch.arange(B + 1, dtype=torch.int32, device=x.device) * N
        return cls(x.reshape(B * N, C), cu, N, B, N, None if cls_attn is None else cls_attn.reshape(B * N))

    def dense(self) -> Tensor:
        """[B, L, C], for equal lengths."""
        if self.seq_len is None:
            raise ValueError("Tokens.dense() needs sequences of equal length")
        return self.x.view(self.batch_size, self.seq_len, self.x.shape[1])

    def positions(self) -> Tensor:
        """int64 [T]: index, or for the unpruned grid 0 .. T-1."""
        if self.index is not None:
            return self.index
        return torch.arange(self.x.shape[0], device=self.x.device)

    def sample_of_row(self) -> Tensor:
        """int64 [T]: the image each row belongs to."""
        images = torch.arange(self.batch_size, device=self.x.device)
        if self.seq_len is not None:
            return images.repeat_interleave(self.seq_len)
        return images.repeat_interleave(self.cu_seqlens.diff().long(), output_size=self.x.shape[0])


def _class_row_attention(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """[B*L] (float32, float64 for float64): per token, the class token's (row 0's) attention
    to it, mean over heads, from q, k [B, H, L, D]; what varlen_attention's cls_attn gives,
    without gradient, at the cost of one row of scores per head."""
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad(), _autocast.off(q.device.type):  # a statistic: float32 under autocast too
        scores = (q[:, :, :1].to(stat) @ k.to(stat).transpose(-1, -2)) * scale  # [B, H, 1, L]
        return scores.softmax(-1).mean(1).reshape(-1)


def _received_attention(q: Tensor, k: Tensor, v: Tensor, t: "Tokens", scale: float):
    """Attention over the packed rows of t, q, k, v [T, H, D] -> (out [T, H, D], received [T]).

    received (float32, float64 for float64; no gradient): per token, the softmax attention it
    receives, mean over the queries of its image and over the heads: the importance score of
    a model without a class token, a side output of the attention (varlen_attention's
    kernels with a second pass over q and k from the logsumexp on CUDA; on the CPU the
    probabilities explicitly, the output and the column means from the same ones)."""
    out, _, received = _varlen.forward_received(q, k, v, t.cu_seqlens, t.max_seqlen, scale)
    return out, received


def packed_attention(q: Tensor, k: Tensor, v: Tensor, t: "Tokens", scale: float, scores: bool,
                     received: bool):
    """Attention over the packed rows of t, q, k, v [T, H, D] -> (out [T, H, D], the token
    scores [T] where scores, else None): the attention received (see _received_attention)
    where received, else the class row's attention. Equal lengths run as one dense batch
    for SDPA (the class row's attention beside it), unequal ones as varlen attention."""
    if scores and received:
        return _received_attention(q, k, v, t, scale)
    if t.seq_len is None:
        o, _, cls_attn = _varlen.forward(q, k, v, t.cu_seqlens, t.max_seqlen, scale, scores)
        return o, cls_attn if scores else None
    B, L, H = t.batch_size, t.seq_len, q.shape[1]
    q, k, v = (z.reshape(B, L, H, -1).transpose(1, 2) for z in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)
    return o, _class_row_attention(q, k, scale) if scores else None


def _exact_float(ratio_attr: str) -> property:
    """A float attribute (None allowed) kept as its exact integer ratio in ratio_attr:
    torch.compile specializes a module's int attributes (one graph per value, reused when the
    value comes back), whereas a float attribute that changes becomes a symbolic float after
    one recompile, and tracing the token counts from it did not finish (sympy)."""
    def get(self) -> Optional[float]:
        ratio = getattr(self, ratio_attr)
        return None if ratio is None else ratio[0] / ratio[1]

    def set(self, value: Optional[float]) -> None:
        setattr(self, ratio_attr, None if value is None else float(value).as_integer_ratio())

    return property(get, set)


class SparseBlock(Block):
    """timm's ViT Block (same parameters), which on Tokens prunes at its entry when it is a
    prune layer and returns the token scores (Tokens.cls_attn) when the next block prunes.

    Set by sparse_ops.patch.vit / set_sparsity: keep_rate, mass (None: by keep_rate), package,
    emit_cls_attn (return the scores), num_prefix_tokens, and received_attention (False: the
    scores are the class token's attention row, a side output of the attention kernel; True,
    for models without a class token: the attention each token receives, from
    _received_attention). keep_rate and mass are floats kept as exact integer ratios (see
    _exact_float): a compiled model recompiles once per density."""
    _keep_rate_ratio: tuple = (1, 1)
    _mass_ratio: Optional[tuple] = None
    keep_rate = _exact_float("_keep_rate_ratio")
    mass = _exact_float("_mass_ratio")
    package: bool = False
    emit_cls_attn: bool = False
    num_prefix_tokens: int = 1
    received_attention: bool = False
    __prepare_scriptable__ = _export.refuse_scripting

    @property
    def prunes(self) -> bool:
        return self.mass is not None or self.keep_rate < 1.0

    def forward(self, x, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        if isinstance(x, Tensor):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        tokens, rows = self._select(x) if self.prunes else (x, None)
        if rows is None and tokens.seq_len is not None and not self.emit_cls_attn:
            # Equal lengths and nothing to gather: a packed batch is a dense one (timm's
            # Block.forward), the second residual added on the [T, C] rows so that the output
            # is no view (an in-place op on a view drops FSDP2's pre-backward hook).
            x = tokens.dense()
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
            mlp = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
            return replace(tokens, x=x.view(tokens.x.shape) + mlp.view(tokens.x.shape), cls_attn=None)
        return self._forward_packed(tokens, rows)

    # ----------------------------------------------------------------------- pruning
    def _select(self, t: Tokens):
        """-> (Tokens of the kept rows, whose x is still the rows to gather from; rows [T'])."""
        if t.cls_attn is None:
            raise ValueError("a pruning SparseBlock needs the token scores of the block before it "
                             "(Tokens.cls_attn: class or received attention); patch.vit sets that block to return them")
        B, P = t.batch_size, self.num_prefix_tokens
        if t.seq_len is not None:
            idx = self._select_index(t.cls_attn.view(B, t.seq_len))
            rows = idx.index  # b * L + j is the packed row when every image has L tokens
        else:  # scores on a [B, max_seqlen] grid, padding positions never kept
            sample = t.sample_of_row()
            pos = torch.arange(t.x.shape[0], device=t.x.device) - t.cu_seqlens.long()[sample]
            grid = t.cls_attn.new_zeros(B, t.max_seqlen).index_put_((sample, pos), t.cls_attn)
            valid = torch.zeros(B, t.max_seqlen, dtype=torch.bool, device=grid.device).index_put_(
                (sample, pos), torch.ones_like(pos, dtype=torch.bool))
            idx = TokenIndex.from_mask(self._select_index(grid).keep_mask() & valid)
            rows = t.cu_seqlens.long()[idx.index // t.max_seqlen] + idx.index % t.max_seqlen
        # a common length (a fixed rate on equal lengths, or a single image): the later blocks
        # run dense (timm's block, SDPA) instead of varlen attention
        seq_len = idx.max_seqlen if (self.mass is None and t.seq_len is not None) or B == 1 else None
        kept = Tokens(t.x, idx.cu_seqlens, idx.max_seqlen, B, seq_len, index=t.positions()[rows])
        if self.package:
            return self._add_package_token(t, kept, rows)
        return kept, rows

    def _select_index(self, scores: Tensor) -> TokenIndex:
        if self.mass is not None:
            _export.refuse_mass()
            return mass_tokens(scores, self.mass, self.num_prefix_tokens)
        return top_tokens(scores, self.keep_rate, self.num_prefix_tokens)

    def _add_package_token(self, t: Tokens, kept: Tokens, rows: Tensor):
        """Appends to each image the mean of its pruned tokens weighted by their class
        attention (EViT's fused token): one more row per image, gathered from [x; packages]."""
        B, T = t.batch_size, t.x.shape[0]
        pruned = torch.ones(T, dtype=t.x.dtype, device=t.x.device).index_fill_(0, rows, 0)
        w = t.cls_attn.to(t.x.dtype) * pruned
        sample = t.sample_of_row()
        total = w.new_zeros(B).index_add_(0, sample, w)
        packages = t.x.new_zeros(B, t.x.shape[1]).index_add_(0, sample, w.unsqueeze(1) * t.x)
        # an image with nothing pruned gets a zero package, and zero gradients (not a clamped
        # total's NaN ones)
        packages = packages / torch.where(total > 0, total, 1).unsqueeze(1)
        lengths = kept.cu_seqlens.diff()
        images = torch.arange(B, device=rows.device)
        # kept row i of image b moves down by b (the packages before it); image b's package
        # goes at the end of its sequence.
        shift = images.repeat_interleave(lengths.long(), output_size=rows.shape[0])
        new_rows = rows.new_empty(rows.shape[0] + B)
        new_rows[torch.arange(rows.shape[0], device=rows.device) + shift] = rows
        new_rows[kept.cu_seqlens[1:].long() + images] = T + images
        cu = kept.cu_seqlens + torch.arange(B + 1, dtype=torch.int32, device=rows.device)
        seq_len = None if kept.seq_len is None else kept.seq_len + 1
        index = torch.cat([t.positions(), rows.new_full((B,), -1)])[new_rows]
        return Tokens(torch.cat([t.x, packages]), cu, kept.max_seqlen + 1, B, seq_len, index=index), new_rows

    # --------------------------------------------------------------- packed forward
    def _forward_packed(self, t: Tokens, rows: Optional[Tensor]) -> Tokens:
        attn, mlp = self.attn, self.mlp
        T = t.x.shape[0] if rows is None else rows.shape[0]
        # the full grid before any pruning (the block that emits the first scores): timm's
        # Linears, so that the intermediates up to the first prune layer are timm's bit for bit
        as_timm = t.index is None
        qkv = norm_linear(t.x, rows, self.norm1, attn.qkv, as_timm).view(T, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.unbind(1)
        q, k = attn.q_norm(q), attn.k_norm(k)
        o, cls_attn = packed_attention(q, k, v, t, attn.scale, self.emit_cls_attn, self.received_attention)
        o = attn.proj_drop(linear(attn.norm(o.reshape(T, -1)), attn.proj, as_timm))
        x = gather(t.x, rows)
        # t.x still holds the rows before the gather: count images over the gathered ones
        sample = replace(t, x=x).sample_of_row() if self.training else None
        x = x + drop_path(self.drop_path1, self.ls1(o), sample, t.batch_size)
        h = mlp.norm(mlp.drop1(mlp.act(norm_linear(x, None, self.norm2, mlp.fc1, as_timm))))
        x = x + drop_path(self.drop_path2, self.ls2(mlp.drop2(linear(h, mlp.fc2, as_timm))), sample, t.batch_size)
        return Tokens(x, t.cu_seqlens, t.max_seqlen, t.batch_size, t.seq_len, cls_attn, t.index)


class SparseVisionTransformer(VisionTransformer):
    """timm's VisionTransformer (same parameters) whose blocks pass Tokens when any of them
    prunes, with timm's return types:

    - forward(x): logits, pooled from the packed kept tokens ('token': the class token row;
      'avg': the mean of the kept tokens; 'map': timm's attention pool, whose latent query
      attends to the kept tokens only).
    - forward_features(x): the [B, N, C] token grid after the final norm; a token pruned
      before block i holds its output of block i - 1. The tensor carries ``kept_tokens``
      (bool [B, N]: the tokens the last block ran on), so that forward_head pools 'avg' and
      'map' over the kept tokens only and forward_head(forward_features(x)) equals forward(x).
    - forward_tokens(x): the same, packed: Tokens of the kept rows after the final norm
      (index: each row's position in that grid); forward_head pools it as forward does.
    - forward_intermediates / features_only: timm's outputs, each a full grid as above.

    An empty batch, an attention mask, or no block that prunes: timm's forward, unchanged."""
    timm_class = VisionTransformer  # the timm class this one patches (patch.vit undoes to it)

    def _prunes(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> bool:
        _export.refuse_fx_tracing(type(self).__name__)
        return attn_mask is None and not is_causal and x.shape[0] > 0 and any(blk.prunes for blk in self.blocks)

    def _embed(self, x: Tensor) -> Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def _run_blocks(self, x: Tensor, take=frozenset(), last: Optional[int] = None, **block_kwargs):
        """Embedded tokens x [B, N, C] through blocks 0..last (default: all) -> (the Tokens
        after the last, {i: the token grid [B, N, C] after block i for i in take});
        block_kwargs go to every block (SparseEva's rope).

        A grid is restored with one scatter of the rows alive since the previous grid: the
        current rows, plus each row a prune layer dropped on the way, with the value it had
        there (nested keep sets: a dropped token never returns, so no row is written twice).
        Until the first prune layer the grid is the blocks' dense output itself."""
        B, N, C = x.shape
        tokens, grid, grids = Tokens.from_dense(x), x, {}
        paused = []  # (rows, their grid positions or -1) of tokens dropped since `grid`
        last_grid = max(take, default=-1)
        blocks = self.blocks if last is None else self.blocks[:last + 1]
        for i, blk in enumerate(blocks):
            before = tokens
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, use_reentrant=False, **block_kwargs)
            else:
                tokens = blk(tokens, **block_kwargs)
            if blk.prunes and i <= last_grid:  # what a later grid restores (forward takes none)
                alive = torch.zeros(B * N + 1, dtype=torch.bool, device=x.device).index_fill_(0, tokens.index + 1, True)
                position = before.positions()  # -1 (package rows) stays -1: never written
                paused.append((before.x, torch.where(alive[position + 1], -1, position)))
            if i in take:
                if tokens.index is None:
                    grid = tokens.dense()
                else:
                    rows = torch.cat([p for _, p in paused] + [tokens.index])
                    values = torch.cat([v for v, _ in paused] + [tokens.x])
                    grid = kernel("scatter_rows", x.device.type)(values, rows, grid.reshape(B * N, C)).view(B, N, C)
                    paused = []
                grids[i] = grid
        return tokens, grids

    def _kept_grid(self, tokens: Tokens, grid: Tensor) -> Tensor:
        """bool [B, N]: the grid's tokens present in tokens (package rows have no place)."""
        B, N = grid.shape[:2]
        if tokens.index is None:
            return torch.ones(B, N, dtype=torch.bool, device=grid.device)
        kept = torch.zeros(B * N + 1, dtype=torch.bool, device=grid.device).index_fill_(0, tokens.index + 1, True)
        return kept[1:].view(B, N)

    # --------------------------------------------------------------------- timm API
    def forward_tokens(self, x: Tensor) -> Tokens:
        """The packed form of forward_features: each image's kept tokens (class and register
        tokens first, in their original order; with package=True the package token last)
        as rows of Tokens.x [T, C], after the final norm; Tokens.index gives each row's
        position b * N + n in forward_features' grid (-1: the package token)."""
        if not self._prunes(x):
            return Tokens.from_dense(super().forward_features(x))
        tokens, _ = self._run_blocks(self._embed(x))
        return replace(tokens, x=self.norm(tokens.x), cls_attn=None)

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if not self._prunes(x, attn_mask, is_causal):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        last = len(self.blocks) - 1
        tokens, grids = self._run_blocks(self._embed(x), take={last})
        out = self.norm(grids[last])
        out.kept_tokens = self._kept_grid(tokens, out)
        return out

    def forward_head(self, x, pre_logits: bool = False):
        """timm's head on a tensor (forward_features' grid: 'avg' over its kept_tokens) or
        on Tokens (forward_tokens)."""
        if isinstance(x, Tokens):
            if self.global_pool == "token":  # the class (and distillation) token rows
                P = self.num_prefix_tokens
                rows = x.cu_seqlens[:-1].long().unsqueeze(1) + torch.arange(P, device=x.x.device)
                return super().forward_head(x.x[rows.reshape(-1)].view(x.batch_size, P, -1), pre_logits=pre_logits)
            if self._pools_packed_latent():
                return self._head(self._attention_pool_packed(x), pre_logits)
            if self.global_pool != "avg":
                raise ValueError(f"forward_head pools Tokens with global_pool 'token', 'avg' or 'map' (without "
                                 f"the attention pool's pos_embed), not {self.global_pool!r}; use "
                                 f"forward_features' token grid")
            return self._head(self._pool_packed(x), pre_logits)
        kept = getattr(x, "kept_tokens", None)
        skip = 0 if self.pool_include_prefix else self.num_prefix_tokens
        if kept is not None and self.attn_pool is not None:  # 'map': the latent query sees the kept tokens only
            pruned = torch.zeros(kept[:, skip:].shape, dtype=x.dtype, device=x.device)
            pruned = pruned.masked_fill(~kept[:, skip:], float("-inf"))[:, None, None, :]  # [B, 1, 1, N']
            return self._head(self.attn_pool(x[:, skip:], attn_mask=pruned), pre_logits)
        if kept is not None and self.global_pool == "avg":
            weight = kept[:, skip:].to(x.dtype).unsqueeze(-1)
            pooled = (x[:, skip:] * weight).sum(1) / weight.sum(1).clamp_min(1)
            return self._head(pooled, pre_logits)
        return super().forward_head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        if not self._prunes(x, attn_mask, is_causal):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.global_pool in ("token", "avg") or self._pools_packed_latent():
            return self.forward_head(self.forward_tokens(x))
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices=None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        """timm's forward_intermediates, pruning as forward does: each intermediate is the
        full token grid after its block (pruned tokens paused); the blocks before the first
        prune layer give exactly timm's dense intermediates."""
        if not self._prunes(x, attn_mask, is_causal):
            return super().forward_intermediates(
                x, indices, return_prefix_tokens=return_prefix_tokens, norm=norm, stop_early=stop_early,
                output_fmt=output_fmt, intermediates_only=intermediates_only, output_dict=output_dict,
                attn_mask=attn_mask, is_causal=is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        last = max_index if stop_early else len(self.blocks) - 1
        take = sorted(i for i in set(take_indices) if i <= last)
        _, grids = self._run_blocks(self._embed(x), take=set(take) if intermediates_only else {*take, last}, last=last)
        intermediates = [self.norm(grids[i]) if norm else grids[i] for i in take]
        P = self.num_prefix_tokens
        prefix_tokens = [y[:, :P] for y in intermediates] if P else None
        intermediates = [y[:, P:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(grids[last])
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(grids[last]), intermediates

    def _head(self, pooled: Tensor, pre_logits: bool) -> Tensor:
        x = self.head_drop(self.fc_norm(pooled))
        return x if pre_logits else self.head(x)

    def _pools_packed_latent(self) -> bool:
        """'map' pooling that needs no grid positions (no pos_embed of its own, as in SigLIP)."""
        return self.global_pool == "map" and self.attn_pool is not None and self.attn_pool.pos_embed is None

    def _attention_pool_packed(self, t: Tokens) -> Tensor:
        """timm's attention pool over each image's packed rows: the rows padded to
        [B, max_seqlen, C], the latent query masked off the padding (and off the prefix rows
        unless pool_include_prefix)."""
        skip = 0 if self.pool_include_prefix else self.num_prefix_tokens
        sample = t.sample_of_row()
        pos = torch.arange(t.x.shape[0], device=t.x.device) - t.cu_seqlens.long()[sample]
        grid = t.x.new_zeros(t.batch_size, t.max_seqlen, t.x.shape[1]).index_put((sample, pos), t.x)
        counted = torch.zeros(t.batch_size, t.max_seqlen, dtype=torch.bool, device=t.x.device).index_put(
            (sample, pos), pos >= skip)
        masked = torch.zeros(counted.shape, dtype=t.x.dtype, device=t.x.device).masked_fill(~counted, float("-inf"))
        return self.attn_pool(grid, attn_mask=masked[:, None, None, :])

    def _pool_packed(self, t: Tokens) -> Tensor:
        """timm's 'avg' pooling over each image's packed rows."""
        skip = 0 if self.pool_include_prefix else self.num_prefix_tokens
        pos = torch.arange(t.x.shape[0], device=t.x.device)
        sample = t.sample_of_row()
        counted = (pos - t.cu_seqlens.long()[sample] >= skip).to(t.x.dtype)
        sums = t.x.new_zeros(t.batch_size, t.x.shape[1]).index_add_(0, sample, t.x * counted.unsqueeze(1))
        counts = counted.new_zeros(t.batch_size).index_add_(0, sample, counted)
        return sums / counts.clamp_min(1).unsqueeze(1)


class SparseVisionTransformerDistilled(SparseVisionTransformer, VisionTransformerDistilled):
    """timm's distilled DeiT (class and distillation tokens, both kept; its two heads, with
    timm's train / eval behaviour) with pruned blocks: SparseVisionTransformer's forward
    paths over VisionTransformerDistilled's _pos_embed and forward_head."""
    timm_class = VisionTransformerDistilled
