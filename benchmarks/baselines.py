"""The models and the methods compared on them: dense timm, the naive sparse baselines
(plain PyTorch index ops around the unchanged timm layers, the way the EViT and SparseViT
code does it) and ours (sparse_ops.patch, where this checkout has it)."""
import copy
import functools
from typing import List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import window_partition, window_reverse
from timm.models.swin_transformer_v2 import SwinTransformerV2Block

from sparse_ops.select import kept_count

from .core import Unavailable
from .flops import swin_windows

# label -> (timm model, its arguments); pretrained=False always: the timings do not depend on
# the weights, and a benchmark machine may have no network.
MODELS = {
    "deit_small": ("deit_small_patch16_224", {}),
    "deit_base": ("deit_base_patch16_224", {}),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "swinv2_tiny": ("swinv2_tiny_window8_256", {}),
    # Tiny stand-ins for --quick, the smoke run of the tests (18x18 tokens: padded windows).
    "vit_test": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                                              num_classes=10)),
    "swin_test": ("swin_tiny_patch4_window7_224", dict(img_size=72, embed_dim=16, depths=(2, 2, 2, 2),
                                                       num_heads=(1, 2, 2, 4), num_classes=10)),
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


# ------------------------------------------------------------ SparseViT-style Swin
def sparsevit_block(block, x: torch.Tensor, num_keep: int) -> torch.Tensor:
    """A timm SwinTransformerBlock that prunes windows the SparseViT way: roll, pad and
    window_partition the map, score each window by the L2 norm of its tokens' mean |x|, keep
    the top num_keep per image (torch.gather), run the unchanged WindowAttention (with the
    shift mask indexed by window) and MLP on them, scatter them back; pruned windows pass
    through unchanged. A Swin V2 block (res-post-norm) normalises after each branch instead."""
    B, H, W, C = x.shape
    (wh, ww), (sh, sw) = block.window_size, block.shift_size

    def windows(t):  # [B, H, W, C] -> [B, nW, wh*ww, C] in the rolled, padded frame
        t = torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) if sh or sw else t
        t = F.pad(t, (0, 0, 0, (-W) % ww, 0, (-H) % wh))
        return window_partition(t, (wh, ww)).view(B, -1, wh * ww, C)

    frame = windows(x)
    ids = frame.abs().mean(-1).norm(dim=-1).topk(num_keep, dim=1).indices  # [B, K]
    index = ids[:, :, None, None].expand(-1, -1, wh * ww, C)
    kept = torch.gather(frame, 1, index).flatten(0, 1)  # [B*K, wh*ww, C]
    mask = None if block.attn_mask is None else block.attn_mask[ids.flatten()]
    if isinstance(block, SwinTransformerV2Block):
        y = kept + block.drop_path1(block.norm1(block.attn(kept, mask=mask)))
        y = y + block.drop_path2(block.norm2(block.mlp(y)))
    else:
        normed = torch.gather(windows(block.norm1(x)), 1, index).flatten(0, 1)  # padding stays zero, as in timm
        y = kept + block.drop_path1(block.attn(normed, mask=mask))
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


def sparsevit_forward(net, images: torch.Tensor, kept_windows: Sequence[int]) -> torch.Tensor:
    """A timm SwinTransformer forward keeping kept_windows[i] windows in block i; blocks that
    keep all their windows run unchanged."""
    x = net.patch_embed(images)
    kept = iter(kept_windows)
    for stage in net.layers:
        x = stage.downsample(x)
        for block in stage.blocks:
            k = next(kept)
            x = block(x) if k == swin_windows(block)[0] else sparsevit_block(block, x, k)
    return net.forward_head(net.norm(x))
