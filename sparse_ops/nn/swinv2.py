"""Window pruning in timm Swin V2 blocks (SwinTransformerV2, swinv2_*), as for Swin v1
(sparse_ops.nn.swin): a block with sparsity s keeps the ceil((1 - s) * nW) windows of its
(shifted, padded) window grid with the largest activation norm; pruned windows pass through.

V2's block differs from v1's in its maths, and so in its sparse path, on packed rows:
- no LayerNorm before attention or MLP: the prologue is a gathered qkv GEMM (fused);
- cosine attention: q and k L2-normalised (on the kept rows only), times a learned per-head
  logit scale (clamped to log(100), then exp) that window_attention takes as a [H] tensor;
- a continuous relative-position bias, 16 * sigmoid(cpb_mlp(coords)), computed once per block
  forward (never per window) and looked up by the kernel as v1's bias is;
- res-post-norm, ``x + norm1(attn(x))`` and ``x + norm2(mlp(x))``: the epilogue is composed,
  fc2 GEMM, then LayerNorm, then residual add and scatter (the LayerNorm needs whole rows,
  which the fused GEMM epilogue's tiles do not hold).
Window ranking, window grids, shift masks at any input size and the stage's shared ranking
are v1's.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block, SwinTransformerV2Stage
from torch import Tensor, nn

from .._backend import kernel
from ..attention import window as _window
from ..fused import layernorm_linear
from ._common import drop_path, gather, inference_cached, linear
from .swin import SparseSwinBlock, SparseSwinStage


class SparseSwinV2Block(SwinTransformerV2Block):
    """timm's SwinTransformerV2Block (same parameters) pruning a fraction `sparsity` of its
    windows (set by sparse_ops.patch.swin / set_sparsity; 0 runs timm's dense forward)."""
    sparsity: float = 0.0
    prunable = True
    __prepare_scriptable__ = SparseSwinBlock.__prepare_scriptable__
    # the window grid, ranking and shift mask are v1's (same attributes, same timm geometry)
    num_windows = SparseSwinBlock.num_windows
    kept_windows = SparseSwinBlock.kept_windows
    rank_windows = SparseSwinBlock.rank_windows
    kept_rows = SparseSwinBlock.kept_rows
    _shift_mask = SparseSwinBlock._shift_mask

    def position_bias(self) -> Tensor:
        """The continuous relative-position bias [H, n, n]: 16 * sigmoid of cpb_mlp on the
        log-spaced coordinate table, gathered by relative position index (cached in inference)."""
        attn = self.attn

        def compute():
            table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
            n = self.window_area
            bias = table[attn.relative_position_index.view(-1)].view(n, n, attn.num_heads).permute(2, 0, 1)
            return 16 * torch.sigmoid(bias)
        return inference_cached(self, "bias", compute, attn.relative_coords_table, attn.relative_position_index,
                                *attn.cpb_mlp.parameters())

    def head_scale(self, dtype: torch.dtype) -> Tensor:
        """[H]: exp(logit_scale clamped to log(100)), in the attention's statistics dtype (cached
        in inference)."""
        scale = self.attn.logit_scale
        return inference_cached(self, f"head_scale {dtype}",
                                lambda: torch.clamp(scale, max=math.log(100.0)).exp().view(-1).to(dtype), scale)

    def forward(self, x: Tensor, order: Optional[Tensor] = None, inplace: bool = False) -> Tensor:
        """x [B, H, W, C]. order: this block's window ranking [B, >= kept] (a stage passes
        one for all its blocks), else computed from x. inplace: write into x (a stage does
        that for tensors it owns when no gradient is needed; only where the map needs no
        padding, as the scatter then has no padding rows to skip)."""
        B, H, W, C = x.shape
        if B == 0:  # nothing to compute
            return x.clone()
        kept = self.kept_rows(x, order)
        if kept is None:
            return super().forward(x)
        windows, rows = kept
        K = windows.shape[1]
        attn, mlp = self.attn, self.mlp
        x2d = x.reshape(-1, C)
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        M, n = B * K, self.window_area
        qkv_bias = None if attn.q_bias is None else inference_cached(
            self, "qkv_bias", lambda: torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)), attn.q_bias, attn.k_bias,
            attn.v_bias)
        # gather + qkv GEMM; a padding row reads zeros, so its q, k, v are the biases, as timm's
        qkv = layernorm_linear(x2d, rows, None, None, 0.0, attn.qkv.weight, qkv_bias)
        q, k, v = qkv.view(M, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        stat = torch.float64 if x.dtype == torch.float64 else torch.float32
        o = _window._forward_op(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, windows.view(-1),
                                self.position_bias(), self._shift_mask(H, W, x), 1.0, self.head_scale(stat))
        o = attn.proj_drop(linear(o.transpose(1, 2).reshape(M * n, -1), attn.proj))
        sample = torch.arange(B, device=x.device).repeat_interleave(K * n) if self.training else None
        y = gather(x2d, rows) + drop_path(self.drop_path1, self.norm1(o), sample, B)
        h = mlp.norm(mlp.drop1(mlp.act(linear(y, mlp.fc1))))
        y = y + drop_path(self.drop_path2, self.norm2(mlp.drop2(linear(h, mlp.fc2))), sample, B)
        padded = H % self.window_size[0] or W % self.window_size[1]
        if inplace and not padded:  # every row is real: a plain indexed copy into the owned map
            out = x2d.index_copy_(0, rows, y)
        else:
            out = kernel("scatter_rows", x.device.type)(y, rows, x2d)
        return out.view(B, H, W, C)


class SparseSwinV2Stage(SwinTransformerV2Stage):
    """timm's SwinTransformerV2Stage whose sparse blocks share one window ranking per window
    grid, computed on the stage's input (v1's stage forward: same attributes)."""
    forward = SparseSwinStage.forward


def swap_classes(model: SwinTransformerV2) -> None:
    """Check that every stage and block of model is timm's V2 stage and block with what the
    sparse path needs, then swap in the sparse classes (in place). TypeError otherwise."""
    for s, stage in enumerate(model.layers):
        if type(stage) not in (SwinTransformerV2Stage, SparseSwinV2Stage):
            raise TypeError(f"model.layers[{s}] is a {type(stage).__name__}; patch.swin supports timm's "
                            "SwinTransformerV2Stage")
        for b, blk in enumerate(stage.blocks):
            name = f"model.layers[{s}].blocks[{b}]"
            if type(blk) not in (SwinTransformerV2Block, SparseSwinV2Block):
                raise TypeError(f"{name} is a {type(blk).__name__}; patch.swin supports timm's SwinTransformerV2Block")
            if not isinstance(blk.norm1, nn.LayerNorm) or not isinstance(blk.norm2, nn.LayerNorm):
                raise TypeError(f"{name}: norm1 and norm2 must be LayerNorms, got {type(blk.norm1).__name__} and "
                                f"{type(blk.norm2).__name__}")
            if not isinstance(blk.mlp, Mlp) or blk.attn.attn_drop.p > 0:
                raise TypeError(f"{name}: patch.swin needs timm's Mlp and no attention dropout")
    for stage in model.layers:
        stage.__class__ = SparseSwinV2Stage
        for blk in stage.blocks:
            blk.__class__ = SparseSwinV2Block
