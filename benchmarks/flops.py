"""Analytical FLOP counts of timm ViT, Swin and SAM-encoder forwards, dense or pruned: the
ideal speedup of a sparse configuration is dense FLOPs / sparse FLOPs.

Counted like torch.utils.flop_counter.FlopCounterMode (the tests check the dense counts
against it): 2 FLOPs per multiply-add of every Linear, convolution and attention matmul
(q k^T and p v; in SAM also q against the relative-position tables); normalisation,
softmax, activations and index ops are free. The work of choosing what to prune (scores,
top-k) is not counted: the ideal is the sparse model's math.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch.nn as nn

from sparse_ops.select import kept_count


def _weights(module: nn.Module) -> int:
    """Multiply-adds per token of all the Linear layers in module."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _patch_embed(model) -> int:
    conv = model.patch_embed.proj
    gh, gw = model.patch_embed.grid_size
    return 2 * gh * gw * conv.out_channels * conv.in_channels * math.prod(conv.kernel_size)


def attention_core(tokens: int, context: int, attn_dim: int) -> int:
    """q k^T and p v for `tokens` queries over `context` keys, all heads (attn_dim = H * D)."""
    return 4 * tokens * context * attn_dim


# ------------------------------------------------------------------------------ ViT
Schedule = List[Tuple[int, int]]  # per block of one image: (tokens into attention, tokens into the MLP)


def evit_schedule(num_tokens: int, depth: int, prune_layers: Sequence[int], kept: Sequence[int],
                  num_prefix: int = 1) -> Schedule:
    """EViT / SaiT: at prune layer j the attention sees all tokens, the MLP and the later blocks
    only the prefix tokens and kept[j] others."""
    schedule, n = [], num_tokens
    for i in range(depth):
        after = num_prefix + kept[list(prune_layers).index(i)] if i in prune_layers else n
        schedule.append((n, after))
        n = after
    return schedule


def fixed_rate_schedule(model, prune_layers: Sequence[int], keep_rate: float) -> Schedule:
    """evit_schedule of one image of a ViT pruned at a fixed keep rate (every image keeps the
    same counts: at each prune layer the op's count of the non-prefix tokens left)."""
    P = model.num_prefix_tokens
    kept, candidates = [], model.patch_embed.num_patches
    for _ in prune_layers:
        candidates = kept_count(keep_rate, candidates)
        kept.append(candidates)
    return evit_schedule(model.patch_embed.num_patches + P, len(model.blocks), prune_layers, kept, P)


def vit_block(block, attn_tokens: int, mlp_tokens: int) -> int:
    attn_dim = block.attn.num_heads * block.attn.head_dim
    return (2 * attn_tokens * _weights(block.attn) + attention_core(attn_tokens, attn_tokens, attn_dim)
            + 2 * mlp_tokens * _weights(block.mlp))


def vit(model, batch: int, schedules: Optional[Sequence[Schedule]] = None) -> int:
    """A timm VisionTransformer forward on `batch` images; schedules: one per image (default:
    dense, every block on all tokens)."""
    if schedules is None:
        n = model.patch_embed.num_patches + model.num_prefix_tokens
        schedules = [[(n, n)] * len(model.blocks)] * batch
    per_image = 2 * _weights(model.head) + _patch_embed(model)
    return batch * per_image + sum(vit_block(b, a, m) for s in schedules for b, (a, m) in zip(model.blocks, s))


# ----------------------------------------------------------------------------- Swin
def swin_windows(block) -> Tuple[int, int]:
    """(windows per image, tokens per window) of a timm SwinTransformerBlock."""
    (H, W), (wh, ww) = block.input_resolution, block.window_size
    return math.ceil(H / wh) * math.ceil(W / ww), wh * ww


def swin_attention(block, kept_windows: float) -> float:
    """One image through a SwinTransformerBlock's window attention (qkv, attention, proj) on
    kept_windows whole windows (padding included, as timm does)."""
    area = swin_windows(block)[1]
    attn_tokens, attn_dim = kept_windows * area, block.attn.qkv.out_features // 3
    per_token = _weights(block.attn.qkv) + _weights(block.attn.proj)  # not V2's position-bias MLP: once per block
    return 2 * attn_tokens * per_token + attention_core(attn_tokens, area, attn_dim)


def swin_block(block, kept_windows: Optional[float] = None) -> float:
    """One image through a SwinTransformerBlock keeping kept_windows windows (default all):
    the attention on those windows, the MLP on their tokens (H * W * kept / windows)."""
    windows = swin_windows(block)[0]
    kept = windows if kept_windows is None else kept_windows
    H, W = block.input_resolution
    return swin_attention(block, kept) + 2 * (H * W * kept / windows) * _weights(block.mlp)


def swin(model, batch: int, kept_windows: Optional[Sequence[float]] = None) -> float:
    """A timm SwinTransformer forward on `batch` images; kept_windows: per block, in order
    (default: all)."""
    blocks = [b for stage in model.layers for b in stage.blocks]
    kept = [None] * len(blocks) if kept_windows is None else kept_windows
    total = _patch_embed(model) + 2 * _weights(model.head)
    for stage in model.layers:
        if not isinstance(stage.downsample, nn.Identity):
            total += 2 * math.prod(stage.output_resolution) * _weights(stage.downsample)
    total += sum(swin_block(b, k) for b, k in zip(blocks, kept))
    return batch * total


# ------------------------------------------------------------------------------ SAM
def sam_window_grid(grid: Sequence[int], window_size: int) -> Tuple[int, int]:
    """Windows down and across a [H, W] token map zero-padded to multiples of window_size."""
    return math.ceil(grid[0] / window_size), math.ceil(grid[1] / window_size)


def sam_window_tokens(grid: Sequence[int], window_size: int) -> List[int]:
    """The real (not padding) tokens of each window of that grid, in timm's window order."""
    H, W = grid
    return [min(window_size, H - r) * min(window_size, W - c)
            for r in range(0, H, window_size) for c in range(0, W, window_size)]


def sam_block(block, grid: Sequence[int], kept: Optional[Sequence[int]] = None, grid_window: int = 0) -> int:
    """One image through a timm SAM Block on a grid = (H, W) token map. A windowed block: qkv,
    attention (with the decomposed rel-pos terms) and proj on the windows kept (ids; default
    all) whole, padding included, as timm partitions them; the MLP on their real tokens only.
    A global block (window_size 0): every token; or, query-pruned (kept ids of the model's
    grid_window grid), q, the attention, proj and MLP for the kept windows' real tokens, k and
    v for every token."""
    ws, attn_dim = block.window_size, block.attn.num_heads * block.attn.head_dim
    tokens = math.prod(grid)
    if not ws and kept is not None:
        real = sam_window_tokens(grid, grid_window)
        queries = sum(real[w] for w in kept)
        rel_pos = 2 * queries * attn_dim * sum(grid) if block.attn.use_rel_pos else 0
        return (2 * (queries + 2 * tokens) * attn_dim * block.attn.qkv.in_features
                + attention_core(queries, tokens, attn_dim) + rel_pos
                + 2 * queries * (_weights(block.attn.proj) + _weights(block.mlp)))
    if ws:
        real = sam_window_tokens(grid, ws)
        kept = range(len(real)) if kept is None else kept
        windows, span, mlp_tokens = len(kept), (ws, ws), sum(real[w] for w in kept)
    else:
        windows, span, mlp_tokens = 1, tuple(grid), tokens
    area = math.prod(span)
    # q against the height and the width tables: 2 n D (wh + ww) per head and window
    rel_pos = 2 * windows * area * attn_dim * sum(span) if block.attn.use_rel_pos else 0
    return (2 * windows * area * _weights(block.attn) + windows * attention_core(area, area, attn_dim) + rel_pos
            + 2 * mlp_tokens * _weights(block.mlp))


def _sam_neck(model) -> int:
    """The neck's convolutions (stride 1, same padding) on the token map."""
    H, W = model.patch_embed.grid_size
    return sum(2 * H * W * m.out_channels * m.in_channels // m.groups * math.prod(m.kernel_size)
               for m in model.neck.modules() if isinstance(m, nn.Conv2d))


def sam(model, batch: int, kept_windows: Optional[Sequence[Optional[Sequence[Sequence[int]]]]] = None) -> int:
    """timm's SAM image encoder (VisionTransformerSAM.forward_features: patch embedding, blocks,
    neck; no head) on `batch` images at the model's img_size. kept_windows: per block, None
    (every window or token) or the window ids each image keeps ([batch][K]); for a global
    block, ids of the windowed blocks' grid: its queries (patch.sam's query_pruned_global)."""
    grid = model.patch_embed.grid_size
    grid_window = max(block.window_size for block in model.blocks)
    total = batch * (_patch_embed(model) + _sam_neck(model))
    for i, block in enumerate(model.blocks):
        kept = None if kept_windows is None else kept_windows[i]
        total += batch * sam_block(block, grid) if kept is None else sum(
            sam_block(block, grid, ids, grid_window) for ids in kept)
    return total
