"""Window pruning in timm Swin blocks (SparseViT-style): a block with sparsity s keeps the
ceil((1 - s) * nW) windows of its (shifted) window grid with the largest activation norm and
runs attention and MLP on their rows only; pruned windows pass through unchanged.

A block is, on packed rows: one fused gather + LayerNorm + qkv GEMM, window attention with
the relative-position bias and the shift mask looked up by window id, proj + residual, the
MLP, and one fused fc2 + residual + scatter into the output. Nothing dense is rolled, padded
or partitioned. A stage scores windows once, on its input, per window grid (shift); its
blocks keep nested prefixes of that ranking.
"""
from typing import Optional, Tuple

import torch
from timm.models.swin_transformer import SwinTransformerBlock, SwinTransformerStage
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import _export
from .._backend import kernel
from ..attention import window as _window
from ..layout import window_grid
from ..select import kept_count
from ._common import drop_path, gather, hooked, inference_cached, linear, linear_scatter, norm_linear


class SparseSwinBlock(SwinTransformerBlock):
    """timm's SwinTransformerBlock (same parameters) pruning a fraction `sparsity` of its
    windows (set by sparse_ops.patch.swin / set_sparsity; 0 runs timm's dense forward)."""
    sparsity: float = 0.0
    prunable = True  # (any ratio; LatencyTable reads it, as SAM's global blocks have only 0)
    __prepare_scriptable__ = _export.refuse_scripting

    def num_windows(self, height: int, width: int) -> int:
        gh, gw = window_grid(height, width, self.window_size)
        return gh * gw

    def kept_windows(self, height: int, width: int) -> int:
        total = self.num_windows(height, width)
        return kept_count(1.0 - self.sparsity, total) if self.sparsity > 0 else total

    def rank_windows(self, x: Tensor, num_keep: int) -> Tensor:
        """int64 [B, num_keep]: the windows of x [B, H, W, C] with the largest L2 norm of the
        per-token mean |x| in this block's window grid, best first."""
        scores = kernel("window_scores", x.device.type)(x, list(self.window_size), list(self.shift_size))
        return torch.topk(scores, num_keep, dim=1, sorted=True).indices

    def kept_rows(self, x: Tensor, order: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
        """The kept windows [B, K] of x [B, H, W, C] (the first K of order, else ranked here)
        and their map rows [B * K * window_area] (-1 for padding), or None where the block
        keeps every window (and runs timm's dense forward)."""
        H, W = x.shape[1:3]
        K = self.kept_windows(H, W)
        if K == self.num_windows(H, W):
            return None
        windows = (self.rank_windows(x, K) if order is None else order[:, :K]).contiguous()
        return windows, kernel("window_rows", x.device.type)(windows, H, W, list(self.window_size), list(self.shift_size))

    def forward(self, x: Tensor, order: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
        """x [B, H, W, C]. order: this block's window ranking [B, >= kept] (a stage passes
        one for all its blocks), else computed from x. inplace: write into x (a stage does
        that for tensors it owns when no gradient is needed)."""
        B, H, W, C = x.shape
        if B == 0:  # nothing to compute (timm's dense block cannot reshape an empty batch)
            return x.clone()
        kept = self.kept_rows(x, order)
        if kept is None:
            return super().forward(x)
        windows, rows = kept
        K = windows.shape[1]
        attn, mlp = self.attn, self.mlp
        x2d = x.reshape(-1, C)
        M, n = B * K, self.window_area
        head_dim = attn.qkv.out_features // (3 * attn.num_heads)  # explicit: M may be 0 (batch 0)
        qkv = norm_linear(x2d, rows, self.norm1, attn.qkv).view(M, n, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        bias = inference_cached(self, "bias", lambda: attn._get_rel_pos_bias()[0], attn.relative_position_bias_table,
                                attn.relative_position_index)
        o = _window._forward_op(*qkv.unbind(0), windows.view(-1), bias, self._shift_mask(H, W, x), attn.scale)
        o = attn.proj_drop(linear(o.transpose(1, 2).reshape(M * n, attn.num_heads * head_dim), attn.proj))
        sample = torch.arange(B, device=x.device).repeat_interleave(K * n) if self.training else None
        y = gather(x2d, rows) + drop_path(self.drop_path1, o, sample, B)
        h = mlp.norm(mlp.drop1(mlp.act(norm_linear(y, None, self.norm2, mlp.fc1))))
        if self.training and (not isinstance(self.drop_path2, nn.Identity) or mlp.drop2.p > 0):
            y = y + drop_path(self.drop_path2, mlp.drop2(mlp.fc2(h)), sample, B)
            out = kernel("scatter_rows", x.device.type)(y, rows, x2d)
        else:  # fc2 + residual + scatter in one epilogue
            out = linear_scatter(h, mlp.fc2, x2d, rows, y, inplace)
        return out.view(B, H, W, C)

    def _shift_mask(self, height: int, width: int, x: Tensor) -> Optional[Tensor]:
        if not any(self.shift_size):
            return None
        if self.attn_mask is not None and tuple(self.input_resolution) == (height, width):
            return self.attn_mask
        gh, gw = window_grid(height, width, self.window_size)
        frame = x.new_empty(1, gh * self.window_size[0], gw * self.window_size[1], 0)
        return self.get_attn_mask(frame)


class SparseSwinStage(SwinTransformerStage):
    """timm's SwinTransformerStage whose sparse blocks share one window ranking per window
    grid, computed on the stage's input. In inference (no gradient) a block writes in place
    into its input when that is a tensor this stage made and nobody else has seen: the output
    of the stage's downsample or of the previous block, when no forward hook is registered on
    them (their subtree, for the downsample) or on the block, nor globally. Pruned windows
    then cost no memory traffic, and what a hook or caller holds never changes under it.
    inplace=False (patch.swin's argument) makes every block allocate its output."""
    inplace: bool = True

    def forward(self, x: Tensor) -> Tensor:
        _export.refuse_fx_tracing(type(self).__name__)
        x = self.downsample(x)
        B, H, W, C = x.shape
        most, ranker = {}, {}  # per window grid (window, shift): most windows a block keeps
        for blk in self.blocks:
            K = blk.kept_windows(H, W)
            if K < blk.num_windows(H, W):
                key = (tuple(blk.window_size), tuple(blk.shift_size))
                most[key], ranker[key] = max(most.get(key, 0), K), blk
        orders = {key: ranker[key].rank_windows(x, K) for key, K in most.items()}
        may_write = self.inplace and not _export.exporting() and not (torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())))
        # the stage's own tensor: the downsample's fresh output (an Identity passes the caller's)
        owned = may_write and not isinstance(self.downsample, nn.Identity) and not any(
            hooked(m) for m in self.downsample.modules())
        for blk in self.blocks:
            order = orders.get((tuple(blk.window_size), tuple(blk.shift_size)))
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, order, False, use_reentrant=False)
                owned = False
            else:
                watched = hooked(blk)
                x = blk(x, order=order, inplace=owned and not watched)
                owned = may_write and not watched  # a block returns its input written in place or a new tensor
        return x
