"""Window pruning in timm's SAM image encoder (VisionTransformerSAM: samvit_*, and ViTDet-style
windowed plain ViTs built with it), SparseViT-style.

The encoder is a plain ViT on a [B, H, W, C] token map. Most blocks attend within ws x ws
windows of the map zero-padded to multiples of ws (SAM: 14x14 windows on a 64x64 map); a few
(SAM-B: 2, 5, 8, 11) attend globally. A windowed block with ratio r keeps the
ceil((1 - r) * nW) windows with the largest activation norm and runs the whole block on their
rows only: one fused gather + LayerNorm + qkv GEMM, window attention with SAM's decomposed
relative position (the height and width terms, q against the rel-pos tables, added inside the
attention kernel: no [n, n] bias per window in memory), proj + residual, the MLP and one
fused fc2 + residual + scatter. Pruned windows pass through unchanged, so the map stays
whole for the global blocks and the convolutional neck. Windows are ranked once per run of
consecutive windowed blocks, on the run's input (SparseViT's rule: the L2 norm over a
window of the per-token mean |x|, the padding counting as zeros); each block of the run
keeps a prefix of that ranking.

Global blocks run timm's block on every token by default. Opt in (query_pruned) and a global
block with ratio r ranks the windows of its own input the same way and takes only the kept
windows' tokens as queries; every token stays a key and a value, and the others pass through.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat, resample_abs_pos_embed_nhwc
from timm.models._features import feature_take_indices
from timm.models.vision_transformer_sam import Block, VisionTransformerSAM
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import _export
from .._backend import kernel
from ..attention import window as _window
from ..fused import layernorm_linear
from ..layout import window_grid
from ..reference import rel_pos_table
from ..select import kept_count
from ._common import drop_path, gather, linear, linear_scatter, norm_linear


class SparseSamBlock(Block):
    """timm's SAM Block (same parameters) pruning a fraction `sparsity` of its windows (set by
    sparse_ops.patch.sam / set_sparsity; 0 runs timm's forward). A global block prunes only
    with query_pruned; grid_window is then the window size of its ranking (the model's)."""
    sparsity: float = 0.0
    query_pruned: bool = False
    grid_window: int = 0
    __prepare_scriptable__ = _export.refuse_scripting

    @property
    def ranking_window(self) -> int:
        """The window size of the grid whose windows this block keeps or drops."""
        return self.window_size or self.grid_window

    @property
    def prunable(self) -> bool:
        """Whether any ratio but 0 applies: a windowed block, or a query-pruned global one."""
        return self.window_size > 0 or self.query_pruned

    @property
    def prunes(self) -> bool:
        return self.sparsity > 0 and self.prunable

    def num_windows(self, height: int, width: int) -> int:
        gh, gw = window_grid(height, width, self.ranking_window)
        return gh * gw

    def kept_windows(self, height: int, width: int) -> int:
        total = self.num_windows(height, width)
        return kept_count(1.0 - self.sparsity, total) if self.prunes else total

    def rank_windows(self, x: Tensor, num_keep: int) -> Tensor:
        """int64 [B, num_keep]: the windows of x [B, H, W, C] with the largest L2 norm of the
        per-token mean |x|, best first."""
        ws = self.ranking_window
        scores = kernel("window_scores", x.device.type)(x, [ws, ws], [0, 0])
        return torch.topk(scores, num_keep, dim=1, sorted=True).indices

    def forward(self, x: Tensor, order: Optional[Tensor] = None) -> Tensor:
        """x [B, H, W, C]. order: a window ranking [B, >= kept] of x's grid (the model passes
        one per run of windowed blocks), else ranked here."""
        B, H, W, C = x.shape
        if B == 0 or not self.prunes:
            return super().forward(x)
        K = self.kept_windows(H, W)
        if K == self.num_windows(H, W):
            return super().forward(x)
        windows = (self.rank_windows(x, K) if order is None else order[:, :K]).contiguous()
        ws = self.ranking_window
        rows = kernel("window_rows", x.device.type)(windows, H, W, [ws, ws], [0, 0])
        x2d = x.reshape(-1, C)
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        attn = self.attn
        if self.window_size:
            o = self._window_attention(x2d, rows, windows)
        else:
            o = self._query_pruned_attention(x2d, rows, B, H, W)
        position = None  # of each row in the padded windows' rows, where the padding rows are dropped
        if (H % ws or W % ws) and not (torch.compiler.is_compiling() or _export.exporting()):
            # proj and MLP on the real rows only, as timm's MLP (a data-dependent count: a host sync on CUDA)
            position = (rows >= 0).nonzero().squeeze(1)
            rows, o = rows[position], o[position]
        o = attn.proj_drop(linear(o, attn.proj))
        sample = None
        if self.training:
            per_image = K * ws * ws
            sample = (position.div(per_image, rounding_mode="floor") if position is not None else
                      torch.arange(B, device=x.device).repeat_interleave(per_image))
        y = gather(x2d, rows) + drop_path(self.drop_path1, self.ls1(o), sample, B)
        mlp = self.mlp
        h = mlp.norm(mlp.drop1(mlp.act(norm_linear(y, None, self.norm2, mlp.fc1))))
        if isinstance(self.ls2, nn.Identity) and (not self.training or (
                isinstance(self.drop_path2, nn.Identity) and mlp.drop2.p == 0)):
            out = linear_scatter(h, mlp.fc2, x2d, rows, y, False)  # fc2 + residual + scatter in one epilogue
        else:
            y = y + drop_path(self.drop_path2, self.ls2(mlp.drop2(linear(h, mlp.fc2))), sample, B)
            out = kernel("scatter_rows", x.device.type)(y, rows, x2d)
        return out.view(B, H, W, C)

    def _qkv(self, x2d: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q, k, v [M, heads, n, D] of the kept windows' rows (a padding row: zeros after
        norm1, as timm pads the normalised map), q and k normalised as timm's qk_norm."""
        attn = self.attn
        n = self.window_size ** 2
        qkv = norm_linear(x2d, rows, self.norm1, attn.qkv).view(-1, n, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def _window_attention(self, x2d: Tensor, rows: Tensor, windows: Tensor) -> Tensor:
        """The attention's output rows [M * n, C] (before proj) of the kept windows."""
        attn = self.attn
        ws = self.window_size
        q, k, v = self._qkv(x2d, rows)
        rel_h = rel_w = None
        if attn.use_rel_pos:
            rel_h, rel_w = _window.decomposed_rel_pos(q, attn.rel_pos_h, attn.rel_pos_w, (ws, ws))
        elif attn.rope is not None:
            rope = attn.rope.get_embed()
            q, k = apply_rot_embed_cat(q, rope).type_as(v), apply_rot_embed_cat(k, rope).type_as(v)
        o = _window._forward_op(q, k, v, windows.view(-1), None, None, attn.scale, None, rel_h, rel_w)
        M, heads, n, D = o.shape
        return o.transpose(1, 2).reshape(M * n, heads * D)

    def _query_pruned_attention(self, x2d: Tensor, rows: Tensor, B: int, H: int, W: int) -> Tensor:
        """Global attention of the kept windows' rows (queries) to every token (keys and
        values), with SAM's decomposed relative position over the whole map: [B * Q, C]
        before proj. A padding row's query reads zeros; its output is never scattered."""
        attn = self.attn
        heads, D = attn.num_heads, attn.head_dim
        C = heads * D
        weight, bias, norm = attn.qkv.weight, attn.qkv.bias, self.norm1
        q_bias, kv_bias = (None, None) if bias is None else (bias[:C], bias[C:])
        q = layernorm_linear(x2d, rows, norm.weight, norm.bias, norm.eps, weight[:C], q_bias)
        kv = layernorm_linear(x2d, None, norm.weight, norm.bias, norm.eps, weight[C:], kv_bias)
        q = attn.q_norm(q.view(B, -1, heads, D).transpose(1, 2))  # [B, heads, Q, D]
        k, v = kv.view(B, H * W, 2, heads, D).permute(2, 0, 3, 1, 4).unbind(0)
        k = attn.k_norm(k)
        mask = None
        if attn.use_rel_pos:
            position = rows.clamp_min(0).view(B, -1) % (H * W)
            Rh = rel_pos_table(H, attn.rel_pos_h)[position // W]  # [B, Q, H, D]: each query's row of the table
            Rw = rel_pos_table(W, attn.rel_pos_w)[position % W]
            rel_h = torch.einsum("bhqd,bqkd->bhqk", q, Rh.to(q.dtype))
            rel_w = torch.einsum("bhqd,bqkd->bhqk", q, Rw.to(q.dtype))
            mask = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-2)  # [B, heads, Q, H * W]
        elif attn.rope is not None:
            rope = attn.rope.get_embed()  # [H * W, 2D]
            position = rows.clamp_min(0).view(B, 1, -1, 1) % (H * W)
            q_rope = rope[position.flatten(1, 3)].unsqueeze(1)  # [B, 1, Q, 2D]
            q = apply_rot_embed_cat(q, q_rope).type_as(v)
            k = apply_rot_embed_cat(k, rope).type_as(v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        return o.transpose(1, 2).reshape(-1, C)


class SparseVisionTransformerSAM(VisionTransformerSAM):
    """timm's VisionTransformerSAM (same parameters) whose windowed blocks prune windows (and
    global blocks too, where query_pruned): forward, forward_features (the neck's full map),
    forward_intermediates and features_only return timm's outputs, pruned windows paused."""

    def _prunes(self, x: Tensor) -> bool:
        return x.shape[0] > 0 and any(blk.prunes for blk in self.blocks)

    def _embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(self.pos_embed, x.shape[1:3])
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))

    def _run_blocks(self, x: Tensor, take=(), last: Optional[int] = None) -> Tuple[Tensor, Dict[int, Tensor]]:
        """x through blocks 0..last (default all), one window ranking per run of windowed
        blocks on the run's input (a query-pruned global block ranks its own); -> the last
        output and the outputs of the blocks in take."""
        _export.refuse_fx_tracing(type(self).__name__)
        blocks = list(self.blocks)[:len(self.blocks) if last is None else last + 1]
        H, W = x.shape[1:3]
        taken, order = {}, None
        for i, blk in enumerate(blocks):
            if blk.window_size and (i == 0 or not blocks[i - 1].window_size):  # a run of windowed blocks begins
                counts = [b.kept_windows(H, W) for b in _run_from(blocks, i) if b.prunes]
                most = max(counts, default=blk.num_windows(H, W))  # the most windows a pruning block of it keeps
                order = blk.rank_windows(x, most) if most < blk.num_windows(H, W) else None
            block_order = order if blk.window_size else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, block_order, use_reentrant=False)
            else:
                x = blk(x, order=block_order)
            if i in take:
                taken[i] = x
        return x, taken

    def forward_features(self, x: Tensor) -> Tensor:
        if not self._prunes(x):
            return super().forward_features(x)
        x, _ = self._run_blocks(self._embed(x))
        return self.neck(x.permute(0, 3, 1, 2))

    def forward_intermediates(self, x: Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's forward_intermediates, pruning as forward does: each intermediate is the
        full map after its block (pruned windows paused)."""
        if not self._prunes(x):
            return super().forward_intermediates(x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                                                 intermediates_only=intermediates_only)
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for ViT-SAM (as timm's), got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        last = max_index if stop_early else len(self.blocks) - 1
        x, taken = self._run_blocks(self._embed(x), take=set(take_indices), last=last)
        maps = [taken[i].permute(0, 3, 1, 2) for i in take_indices if i in taken]
        intermediates = [self.neck(y) for y in maps] if norm else maps
        if intermediates_only:
            return intermediates
        return self.neck(x.permute(0, 3, 1, 2)), intermediates


def _run_from(blocks: List[nn.Module], start: int) -> List[nn.Module]:
    """The run of consecutive windowed blocks that begins at blocks[start]."""
    run = []
    for blk in blocks[start:]:
        if not blk.window_size:
            break
        run.append(blk)
    return run
