"""The models and the methods compared on them: dense timm, the naive sparse baselines
(plain PyTorch index ops around the unchanged timm layers, the way the EViT and SparseViT
code does it) and ours (sparse_ops.patch, where this checkout has it)."""
import copy
import functools
import itertools
import math
from typing import Callable, List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat, resample_abs_pos_embed_nhwc
from timm.models import vision_transformer_sam as timm_sam
from timm.models.swin_transformer import WindowAttention, window_partition, window_reverse
from timm.models.swin_transformer_v2 import SwinTransformerV2Block

from sparse_ops.select import kept_count

from .core import Unavailable
from .flops import sam_window_grid, swin_windows

# label -> (timm model, its arguments); pretrained=False always: the timings do not depend on
# the weights, and a benchmark machine may have no network.
MODELS = {
    "deit_small": ("deit_small_patch16_224", {}),
    "deit_base": ("deit_base_patch16_224", {}),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "swinv2_tiny": ("swinv2_tiny_window8_256", {}),
    "eva02_tiny": ("eva02_tiny_patch14_224", {}),
    "samvit_base": ("samvit_base_patch16", {}),
    # SAM ViT-B's first three blocks (windowed, windowed, global: its pattern): a CPU-sized stand-in
    "samvit_base_d3": ("samvit_base_patch16", dict(depth=3, global_attn_indexes=(2,))),
    "vit_base_clip": ("vit_base_patch16_clip_224", {}),
    "siglip_base": ("vit_base_patch16_siglip_224", {}),
    # Tiny stand-ins for --quick, the smoke run of the tests (18x18 tokens: padded windows).
    "vit_test": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                                              num_classes=10)),
    "siglip_test": ("vit_base_patch16_siglip_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4,
                                                        num_heads=2, num_classes=10)),
    "swin_test": ("swin_tiny_patch4_window7_224", dict(img_size=72, embed_dim=16, depths=(2, 2, 2, 2),
                                                       num_heads=(1, 2, 2, 4), num_classes=10)),
    "eva_test": ("eva02_tiny_patch14_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                                                num_classes=10)),
    # 10x10 tokens in 4x4 windows: 9 windows, the last row and column padded
    "samvit_test": ("samvit_base_patch16", dict(img_size=160, embed_dim=64, depth=4, num_heads=2, window_size=4,
                                                global_attn_indexes=(1, 3), neck_chans=32)),
}


@functools.lru_cache(maxsize=2)
def model(label: str, device: str, dtype: torch.dtype, img_size: Optional[int]) -> torch.nn.Module:
    """The timm model in eval mode, without gradients, every attention on fused SDPA (timm
    leaves it off in Swin's WindowAttention); img_size None: the model's own. Shared by the
    cases: nothing may modify it."""
    name, kwargs = MODELS[label]
    if img_size is not None:
        kwargs = dict(kwargs, img_size=img_size)
    net = timm.create_model(name, pretrained=False, **kwargs)
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return net.eval().requires_grad_(False).to(device=device, dtype=dtype)


def prune_layers(depth: int) -> tuple:
    """EViT's default: prune at a quarter, half and three quarters of the depth (3, 6, 9 of 12)."""
    return tuple(range(depth // 4, depth, depth // 4))[:3]


def patched(kind: str, net: torch.nn.Module, **options):
    """Ours: a copy of net patched by sparse_ops.patch.<kind>, or Unavailable."""
    try:
        from sparse_ops import patch
    except ImportError:
        return Unavailable("sparse_ops.patch is not in this checkout yet")
    if not hasattr(patch, kind):
        return Unavailable(f"sparse_ops.patch.{kind} is not in this checkout yet")
    return getattr(patch, kind)(copy.deepcopy(net), **options)


# ----------------------------------------------------------------- EViT-style ViT
def evit_prune_block(block, x: torch.Tensor, num_prefix: int, keep_rate: Optional[float] = None,
                     mass: Optional[float] = None, key_mask: Optional[torch.Tensor] = None):
    """A timm ViT Block that prunes tokens the EViT way: attention over all tokens, with the
    class token's attention row computed explicitly (fused attention does not return it), then
    the top tokens by that row gathered with torch.gather, and the MLP on those only.

    keep_rate keeps the same count in every image; mass keeps, per image, the fewest tokens
    whose share of the row reaches mass, so the batch is padded to the largest count and a
    key mask [B, 1, 1, N] (True = a real token) goes to the later blocks.
    Returns (x, key_mask, kept candidates: an int, or per image [B] with mass)."""
    attn = block.attn
    B, N, C = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    x = x + block.drop_path1(block.ls1(attn.proj(attn.norm(out.transpose(1, 2).reshape(B, N, -1)))))

    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    scores = logits.softmax(-1).mean(1)[:, 0, num_prefix:]  # [B, N - prefix]
    candidates = N - num_prefix
    if mass is None:
        num_keep = kept_count(keep_rate, candidates)
        keep = scores.topk(num_keep, dim=1).indices
        counts, key_mask = num_keep, None
    else:
        ranked, order = scores.float().sort(dim=1, descending=True)
        share = ranked.cumsum(1) / ranked.sum(1, keepdim=True)
        valid = candidates if key_mask is None else key_mask.sum((1, 2, 3)) - num_prefix
        counts = torch.minimum((share < mass).sum(1) + 1, torch.as_tensor(valid, device=x.device))
        keep = order[:, : int(counts.max())]  # host sync: the padded width
        positions = torch.arange(num_prefix + keep.shape[1], device=x.device)
        key_mask = (positions < num_prefix + counts[:, None]).view(B, 1, 1, -1)
    others = torch.gather(x[:, num_prefix:], 1, keep.unsqueeze(-1).expand(-1, -1, C))
    x = torch.cat([x[:, :num_prefix], others], dim=1)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, key_mask, counts


def evit_forward(net, images: torch.Tensor, keep_rate: Optional[float] = None, mass: Optional[float] = None,
                 layers: Sequence[int] = (3, 6, 9), counts: Optional[List[List[int]]] = None) -> torch.Tensor:
    """A timm VisionTransformer forward pruning at `layers`; blocks where nothing would be
    pruned (keep_rate 1) run unchanged. counts, if given, receives for each prune layer the
    kept candidates per image (for the FLOP count)."""
    if net.global_pool != "token":
        raise ValueError(f"the EViT baseline needs class-token pooling, got global_pool={net.global_pool!r}")
    x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(images))))
    prefix, key_mask = net.num_prefix_tokens, None
    for i, block in enumerate(net.blocks):
        candidates = x.shape[1] - prefix
        if i in layers and (mass is not None or kept_count(keep_rate, candidates) < candidates):
            x, key_mask, kept = evit_prune_block(block, x, prefix, keep_rate, mass, key_mask)
        else:
            x, kept = block(x, attn_mask=key_mask), candidates
        if counts is not None and i in layers:
            counts.append(torch.as_tensor(kept).expand(images.shape[0]).tolist())
    return net.forward_head(net.norm(x))


# ----------------------------------------------------------------- EViT-style Eva
def evit_eva_forward(net, images: torch.Tensor, keep_rate: float, layers: Sequence[int] = (3, 6, 9)) -> torch.Tensor:
    """A timm Eva (EVA-02) forward pruning at `layers` the EViT way, at a fixed keep rate, as
    evit_prune_block does for the ViT: the prune layer's attention runs over all tokens and
    its class row is computed explicitly (after q/k norm and rope); torch.gather keeps the top
    tokens and their rope rows; the MLP and the later, unchanged timm EvaBlocks run on those."""
    x, rope = net._pos_embed(net.patch_embed(images))
    x, P = net.norm_pre(x), net.num_prefix_tokens
    if rope is not None:
        rope = rope.expand(x.shape[0], *rope.shape)  # [B, N - P, E]: one table per image once pruned
    for i, block in enumerate(net.blocks):
        r = None if rope is None else rope.unsqueeze(1)
        candidates = x.shape[1] - P
        if i not in layers or kept_count(keep_rate, candidates) == candidates:
            x = block(x, rope=r)
            continue
        attn, (B, N, C) = block.attn, x.shape
        if attn.qkv is None:
            raise ValueError("the EViT Eva baseline needs a fused qkv projection (qkv_fused=True)")
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(block.norm1(x), attn.qkv.weight, bias).reshape(B, N, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if r is not None:
            q, k = (torch.cat([z[:, :, :P], apply_rot_embed_cat(z[:, :, P:], r, half=attn.rotate_half)], 2).type_as(v)
                    for z in (q, k))
        out = attn.proj(attn.norm(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)))
        x = x + (out if block.gamma_1 is None else block.gamma_1 * out)
        scores = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0, P:]  # [B, N - P]
        keep = scores.topk(kept_count(keep_rate, candidates), dim=1).indices
        x = torch.cat([x[:, :P], torch.gather(x[:, P:], 1, keep.unsqueeze(-1).expand(-1, -1, C))], dim=1)
        if rope is not None:
            rope = torch.gather(rope, 1, keep.unsqueeze(-1).expand(-1, -1, rope.shape[-1]))
        h = block.mlp(block.norm2(x))
        x = x + (h if block.gamma_2 is None else block.gamma_2 * h)
    return net.forward_head(net.norm(x))


# ------------------------------------------------------------ SparseViT-style Swin
def _frame_windows(t: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    """[B, H, W, C] -> [B, nW, wh*ww, C] in the rolled, padded frame of a shifted window grid."""
    B, _, W, C = t.shape
    (wh, ww), (sh, sw) = window_size, shift_size
    t = torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) if sh or sw else t
    t = F.pad(t, (0, 0, 0, (-W) % ww, 0, (-t.shape[1]) % wh))
    return window_partition(t, (wh, ww)).view(B, -1, wh * ww, C)


def sparsevit_ranking(block, x: torch.Tensor, num_keep: int) -> torch.Tensor:
    """[B, num_keep] the windows of block's grid with the largest L2 norm of their tokens'
    mean |x|, best first (SparseViT's window importance)."""
    scores = _frame_windows(x, block.window_size, block.shift_size).abs().mean(-1).norm(dim=-1)  # [B, nW]
    return scores.topk(num_keep, dim=1).indices


def timm_window_attention(attn, x: torch.Tensor, window_ids: torch.Tensor, mask: Optional[torch.Tensor]):
    """timm's WindowAttention on windows x [M, n, C] whose shift-mask rows are window_ids [M]."""
    return attn(x, mask=None if mask is None else mask[window_ids])


def sparsevit_block(block, x: torch.Tensor, num_keep: int, order: Optional[torch.Tensor] = None,
                    attention=timm_window_attention) -> torch.Tensor:
    """A timm SwinTransformerBlock that prunes windows the SparseViT way: roll, pad and
    window_partition the map, keep the first num_keep windows of order ([B, >= num_keep]; by
    default this block's own sparsevit_ranking of x) with torch.gather, run the window
    attention (attention(block.attn, windows, window ids, shift mask): timm's by default) and
    the MLP on them, scatter them back; pruned windows pass through unchanged. A Swin V2
    block (res-post-norm) normalises after each branch instead."""
    B, H, W, C = x.shape
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    frame = _frame_windows(x, block.window_size, block.shift_size)
    ids = sparsevit_ranking(block, x, num_keep) if order is None else order[:, :num_keep]  # [B, K]
    index = ids[:, :, None, None].expand(-1, -1, wh * ww, C)
    kept = torch.gather(frame, 1, index).flatten(0, 1)  # [B*K, wh*ww, C]
    if isinstance(block, SwinTransformerV2Block):
        y = kept + block.drop_path1(block.norm1(attention(block.attn, kept, ids.flatten(), block.attn_mask)))
        y = y + block.drop_path2(block.norm2(block.mlp(y)))
    else:
        # padding stays zero after the norm, as in timm
        normed = torch.gather(_frame_windows(block.norm1(x), block.window_size, block.shift_size), 1, index)
        y = kept + block.drop_path1(attention(block.attn, normed.flatten(0, 1), ids.flatten(), block.attn_mask))
        y = y + block.drop_path2(block.mlp(block.norm2(y)))
    frame = frame.scatter(1, index, y.view(B, num_keep, wh * ww, C))
    Hp, Wp = H + (-H) % wh, W + (-W) % ww
    out = window_reverse(frame.view(-1, wh, ww, C), (wh, ww), Hp, Wp)[:, :H, :W]
    return torch.roll(out, shifts=(sh, sw), dims=(1, 2)) if sh or sw else out


def swin_kept_windows(net, ratios: Sequence[float]) -> List[int]:
    """Kept windows per block for per-block sparsity ratios (fraction of windows pruned)."""
    blocks = [b for stage in net.layers for b in stage.blocks]
    if len(ratios) != len(blocks):
        raise ValueError(f"ratios must have one entry per block ({len(blocks)}), got {len(ratios)}")
    return [kept_count(1.0 - r, swin_windows(b)[0]) for b, r in zip(blocks, ratios)]


def sparsevit_stages(net, images: torch.Tensor, kept_windows: Sequence[int], attention=timm_window_attention):
    """The outputs [B, H, W, C] of a timm SwinTransformer's stages, keeping kept_windows[i]
    windows in block i as SparseViT's code does: a stage ranks its windows once per window
    grid (unshifted, shifted), on the stage's input (after its downsample), and its blocks
    keep prefixes of that ranking; blocks that keep all their windows run unchanged."""
    x = net.patch_embed(images)
    kept = iter(kept_windows)
    for stage in net.layers:
        x = stage.downsample(x)
        counts = [next(kept) for _ in stage.blocks]
        most = {}  # window grid -> the most windows a block of that grid keeps
        for block, k in zip(stage.blocks, counts):
            if k < swin_windows(block)[0]:
                most[block.shift_size] = max(most.get(block.shift_size, 0), k)
        source, orders = x, {}  # the activations SparseViT scores
        for block, k in zip(stage.blocks, counts):
            if k == swin_windows(block)[0]:
                x = block(x)
                continue
            if block.shift_size not in orders:
                orders[block.shift_size] = sparsevit_ranking(block, source, most[block.shift_size])
            x = sparsevit_block(block, x, k, orders[block.shift_size], attention)
        yield x


def sparsevit_forward(net, images: torch.Tensor, kept_windows: Sequence[int], attention=timm_window_attention):
    """A timm SwinTransformer classifier forward pruning as sparsevit_stages does."""
    *_, x = sparsevit_stages(net, images, kept_windows, attention)
    return net.forward_head(net.norm(x))


def sparsevit_features(net, images: torch.Tensor, kept_windows: Sequence[int], attention=timm_window_attention):
    """The backbone: every stage's output, NCHW, as timm's forward_intermediates(x,
    intermediates_only=True) returns them (SparseViT times the backbone this way)."""
    return [x.permute(0, 3, 1, 2).contiguous() for x in sparsevit_stages(net, images, kept_windows, attention)]


# ------------------------------------------------------- SparseViT-style SAM encoder
def sam_kept_windows(net, ratios, grid) -> List[Optional[int]]:
    """Per block of a timm VisionTransformerSAM on a grid = (H, W) token map: the windows it
    keeps for ratios (the fraction pruned: one float for every windowed block, or one per
    block), None for a global block."""
    blocks = list(net.blocks)
    ratios = [ratios if b.window_size else 0.0 for b in blocks] if isinstance(ratios, float) else list(ratios)
    if len(ratios) != len(blocks):
        raise ValueError(f"ratios must be a float or one per block ({len(blocks)}), got {len(ratios)}")
    return [kept_count(1.0 - r, math.prod(sam_window_grid(grid, b.window_size))) if b.window_size else None
            for b, r in zip(blocks, ratios)]


def sam_ranking(x: torch.Tensor, window_size: int, num_keep: int) -> torch.Tensor:
    """[B, num_keep] the windows of x [B, H, W, C] on timm SAM's grid (zero-padded to multiples
    of window_size) with the largest L2 norm of their tokens' mean |x|, best first (SparseViT's
    importance; in float32, as ours: bfloat16-rounded scores tie)."""
    means, _ = timm_sam.window_partition(x.float().abs().mean(-1, keepdim=True), window_size)
    return means.view(x.shape[0], -1, window_size**2).norm(dim=-1).topk(num_keep, dim=1).indices


def sam_naive_block(block, x: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """A timm SAM Block on the windows [B, K] of x [B, H, W, C] only, with plain index ops
    around timm's layers: norm1 and timm's window_partition (padding), index_select of the
    kept windows, timm's attention on them (its own rel-pos), index_copy into a zero padded
    frame, window_unpartition, residual; then the MLP on the kept windows' real tokens only
    (index_select, MLP, index_copy). Pruned windows pass through unchanged."""
    B, H, W, C = x.shape
    ws = block.window_size
    frame, padded = timm_sam.window_partition(block.norm1(x), ws)  # [B * nW, ws, ws, C]
    grid_h, grid_w = sam_window_grid((H, W), ws)
    rows = (windows + grid_h * grid_w * torch.arange(B, device=x.device)[:, None]).flatten()
    attended = block.drop_path1(block.ls1(block.attn(frame.index_select(0, rows))))
    x = x + timm_sam.window_unpartition(torch.zeros_like(frame).index_copy(0, rows, attended), ws, (H, W), padded)
    # which real tokens lie in a kept window: the window of each token, looked up in a kept mask
    r, c = torch.arange(H, device=x.device) // ws, torch.arange(W, device=x.device) // ws
    token_window = (r[:, None] * grid_w + c).flatten()  # [H * W]
    kept = torch.zeros(B, grid_h * grid_w, dtype=torch.bool, device=x.device).scatter_(1, windows, True)
    tokens = kept[:, token_window].flatten().nonzero().squeeze(1)  # [T] rows of x.view(B * H * W, C)
    x2d = x.reshape(B * H * W, C)
    h = x2d.index_select(0, tokens)
    h = h + block.drop_path2(block.ls2(block.mlp(block.norm2(h))))
    return x2d.index_copy(0, tokens, h).view(B, H, W, C)


def sam_naive_forward(net, images: torch.Tensor, ratios, kept: Optional[list] = None) -> torch.Tensor:
    """A timm VisionTransformerSAM's encoder output (patch embedding, blocks, neck: its
    forward_features) pruning windows SparseViT's way: each run of consecutive windowed blocks
    ranks its windows once, on the run's input, and its blocks keep prefixes of that ranking
    (sam_naive_block); global blocks and blocks that keep every window run timm's. kept, if
    given, receives per block the kept window ids of each image, or None (for the FLOP count)."""
    x = net.patch_embed(images)
    if net.pos_embed is not None:
        x = x + resample_abs_pos_embed_nhwc(net.pos_embed, x.shape[1:3])
    x = net.norm_pre(net.patch_drop(net.pos_drop(x)))
    counts = sam_kept_windows(net, ratios, x.shape[1:3])
    order = None
    for i, (block, k) in enumerate(zip(net.blocks, counts)):
        total = None if k is None else math.prod(sam_window_grid(x.shape[1:3], block.window_size))
        if k is not None and (i == 0 or counts[i - 1] is None):  # a run of windowed blocks begins
            run = itertools.takewhile(lambda c: c is not None, counts[i:])
            most = max((c for c in run if c < total), default=None)  # the most windows a block of it keeps
            order = None if most is None else sam_ranking(x, block.window_size, most)
        ids = None if k is None or k == total else order[:, :k]
        x = block(x) if ids is None else sam_naive_block(block, x, ids)
        if kept is not None:
            kept.append(None if ids is None else ids.tolist())
    return net.neck(x.permute(0, 3, 1, 2))


def sam_changed_windows(net, images: torch.Tensor) -> List[Optional[list]]:
    """Per block of a (patched) SAM encoder, the windows of the model's window grid whose tokens
    the block changed, per image ([B][K] ids; a pruned window passes through unchanged), or
    None for a global block that ran on every token: what the FLOP count needs of a run whose
    ranking is internal (query-pruned global blocks)."""
    ws = max(block.window_size for block in net.blocks)
    changed = []

    def record(block, args, out):
        x = args[0]
        moved, _ = timm_sam.window_partition((out != x).any(-1, keepdim=True).float(), ws)
        per_window = moved.view(x.shape[0], -1, ws * ws).amax(-1) > 0  # [B, nW]
        changed.append(None if not block.window_size and bool(per_window.all()) else
                       [row.nonzero().flatten().tolist() for row in per_window])

    hooks = [block.register_forward_hook(record) for block in net.blocks]
    try:
        with torch.no_grad():
            net.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return changed


# ------------------------------------------------------------------------- peers
# Graphs the FlexAttention peer may compile: one per stage, window grid and kept count (Swin-T
# at 224 needs 11, more than dynamo's default limit of 8).
FLEX_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def compiled_flex_attention():
    """torch.compile(flex_attention): FlexAttention fuses (and on the CPU runs at all without
    materialising the scores) only compiled. Past FLEX_RECOMPILE_LIMIT graphs it raises:
    dynamo would otherwise fall back to the unfused eager flex_attention without a word, and
    the peer would be timed crippled. ImportError where this torch has none."""
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def call(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            return compiled(*args, **kwargs)
    return call


def flex_window_attention(attn, x: torch.Tensor, window_ids: torch.Tensor, mask: Optional[torch.Tensor]):
    """timm's WindowAttention with FlexAttention as its core: the relative-position bias and
    the shift mask row of each window (window_ids [M]) added by a score_mod. (A block mask
    would skip nothing: a 7x7 window's 49 tokens are less than one of its 128-row blocks.)"""
    if type(attn) is not WindowAttention:
        raise NotImplementedError(f"the FlexAttention peer is written for Swin V1's WindowAttention, not "
                                  f"{type(attn).__module__}.{type(attn).__name__}")
    M, n, C = x.shape
    q, k, v = attn.qkv(x).reshape(M, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = attn._get_rel_pos_bias()[0]  # [H, n, n]
    if mask is None:
        def score_mod(score, b, h, i, j):
            return score + bias[h, i, j]
    else:
        def score_mod(score, b, h, i, j):
            return score + bias[h, i, j] + mask[window_ids[b], i, j]
    out = compiled_flex_attention()(q, k, v, score_mod=score_mod, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(M, n, -1))


def _tensors(result) -> List[torch.Tensor]:
    return [t for t in result] if isinstance(result, (list, tuple)) else [result]


def disagreement(result, expected) -> float:
    """The largest relative L2 error ||a - b|| / ||b|| over the tensors of two results."""
    got, want = _tensors(result), _tensors(expected)
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        raise ValueError(f"shapes differ: {[tuple(a.shape) for a in got]} vs {[tuple(b.shape) for b in want]}")
    return max(((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
               for a, b in zip(got, want))


# Relative L2 error a peer may have from ours: a different computation is off by O(1).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def expected_of(ours) -> Callable[[], object]:
    """ours() computed once, for the peers to be checked against."""
    @functools.lru_cache(maxsize=None)
    def expected():
        if not callable(ours):
            raise RuntimeError(f"ours is unavailable ({ours}): nothing to check this peer against")
        return ours()
    return expected


def _reason(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def peer(make: Callable[[], Callable[[], object]], expected: Callable[[], object], device: str, dtype: torch.dtype,
         as_ours: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
    """A peer method, checked once against ours before it is timed: make() builds it, and
    its result (each tensor mapped by as_ours to ours' layout) must be within TOLERANCE of
    expected() (ours' result, see expected_of). Unavailable with torch's own reason where
    this torch cannot run it here (no such API, no kernel for this device, dtype or pass, or
    on the CPU a torch.compile that fails: no C++ toolchain); the exception where it fails or
    disagrees, so that a peer computing something else is reported, not timed."""
    try:
        method = make()
        result = [as_ours(t) for t in _tensors(method())]
    except (ImportError, NotImplementedError) as e:
        return Unavailable(_reason(e))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        return Unavailable(f"torch.compile failed on the CPU: {_reason(e)}") if device == "cpu" else e
    except Exception as e:
        return e
    try:
        error = disagreement(result, expected())
    except Exception as e:
        return e
    if not error <= TOLERANCE[dtype]:
        return AssertionError(f"disagrees with ours: relative error {error:.1e} > {TOLERANCE[dtype]:.0e}")
    return method


def peer_ratios(methods: dict, peers: Sequence[str]) -> dict:
    """Setup.overheads "ours/<peer>": ours' median over each peer's that runs, minus 1."""
    return {f"ours/{p}": ("ours", p) for p in peers if callable(methods.get(p))}
