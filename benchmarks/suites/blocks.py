"""blocks: single transformer blocks of the models that prune inside.
- DeiT-S and DeiT-B (CPU: DeiT-S): the first prune layer (block 3) on a batch of 64 (CPU: 8)
  197-token inputs, at each keep rate.
  dense = the timm Block on all tokens; naive = EViT (the class token's attention row
  computed explicitly, top tokens gathered, the MLP on those); ours = the same block of
  sparse_ops.patch.vit(model, keep_rate=r) on the tokens and class attention the block before
  hands it (SaiT: it prunes at entry, so attention and MLP both run on the kept tokens).
- Swin-T at 672x672, batch 4 (CPU: 224, batch 1, stages 0 and 2): the last (shifted) block of
  each stage at each window sparsity.
  dense = the timm SwinTransformerBlock; naive = SparseViT (roll, pad, partition, top windows
  by L2 norm, the unchanged attention and MLP on those, scatter back); flex = the same with
  the window attention's core on torch.compile(flex_attention) (relative-position bias and
  shift mask in a score_mod; no backward on CPU, and this suite is inference); ours = the
  same block of sparse_ops.patch.swin(model, ratios) with that block's ratio set. naive and
  flex are checked against ours once before they are timed; "ours/<peer> overhead" is ours'
  median over the peer's, minus 1.
Speedups are over dense; sparsity is the fraction of the block's FLOPs pruned."""
import functools

import torch

from sparse_ops.select import kept_count

from .. import baselines, flops
from ..core import Case, Config, NO_FLEX, Setup, compiled, guarded, pick

NAME = "blocks"
MEMORY_BOUND = False
X_LABEL = "fraction of FLOPs pruned"


def _vit(cfg: Config, model: str, batch: int, keep_rate: float) -> Setup:
    net = baselines.model(model, cfg.device, cfg.dtype, None)
    layers = baselines.prune_layers(len(net.blocks))
    block, prefix = net.blocks[layers[0]], net.num_prefix_tokens
    N = net.patch_embed.num_patches + prefix
    x = torch.randn(batch, N, net.embed_dim, device=cfg.device, dtype=cfg.dtype)
    ours = guarded(lambda: baselines.patched("vit", net, keep_rate=keep_rate, prune_layers=layers, package=False))
    if callable(ours):  # the block gets what the block before it hands on: tokens and class attention
        from sparse_ops.nn import Tokens
        tokens = Tokens.from_dense(x, cls_attn=torch.rand(batch, N, device=cfg.device).softmax(-1))
    methods = {"dense": lambda: block(x), "naive": lambda: baselines.evit_prune_block(block, x, prefix, keep_rate)[0],
               "ours": ours if not callable(ours) else (lambda: ours.blocks[layers[0]](tokens))}
    kept = prefix + kept_count(keep_rate, N - prefix)
    dense, sparse = (batch * flops.vit_block(block, N, n) for n in (N, kept))
    return Setup(compiled(methods, cfg), flops=(dense, sparse), sparsity=1 - sparse / dense)


def _swin(cfg: Config, model: str, img_size, batch: int, stage: int, ratio: float) -> Setup:
    net = baselines.model(model, cfg.device, cfg.dtype, img_size)
    block = net.layers[stage].blocks[-1]
    H, W = block.input_resolution
    x = torch.randn(batch, H, W, block.dim, device=cfg.device, dtype=cfg.dtype)
    windows = flops.swin_windows(block)[0]
    K = kept_count(1.0 - ratio, windows)
    ratios = [ratio if b is block else 0.0 for s in net.layers for b in s.blocks]
    patched = guarded(lambda: baselines.patched("swin", net, ratios=ratios))
    ours = patched if not callable(patched) else (lambda: patched.layers[stage].blocks[-1](x))
    check = functools.partial(baselines.peer, expected=baselines.expected_of(ours), device=cfg.device,
                              dtype=cfg.dtype)

    def make_flex():
        torch._dynamo.reset()  # this case's FlexAttention compiles on its own (within the recompile limit)
        return lambda: baselines.sparsevit_block(block, x, K, attention=baselines.flex_window_attention)

    methods = {"dense": lambda: block(x), "naive": check(lambda: lambda: baselines.sparsevit_block(block, x, K)),
               "flex": check(make_flex) if cfg.flex else NO_FLEX, "ours": ours}
    dense, sparse = (batch * flops.swin_block(block, k) for k in (windows, K))
    return Setup(compiled(methods, cfg, names=("dense", "naive", "flex")), flops=(dense, sparse),
                 sparsity=1 - sparse / dense, overheads=baselines.peer_ratios(methods, ("naive", "flex")))


def cases(cfg: Config):
    models = pick(cfg, quick=("vit_test",), cpu=("deit_small",), cuda=("deit_small", "deit_base"))
    batch = pick(cfg, quick=2, cpu=8, cuda=64)
    keep_rates = pick(cfg, quick=(1.0, 0.5), cpu=(0.7, 0.5), cuda=(0.9, 0.7, 0.5))
    for model in models:
        for r in keep_rates:
            yield Case(NAME, f"{NAME}/{model}/b{batch}/keep{r}", f"{model} b{batch}",
                       dict(model=model, batch=batch, keep_rate=r),
                       functools.partial(_vit, cfg, model, batch, r))

    model, img_size, batch = pick(cfg, quick=("swin_test", None, 1), cpu=("swin_tiny", 224, 1),
                                  cuda=("swin_tiny", 672, 4))
    stages = pick(cfg, quick=(0,), cpu=(0, 2), cuda=(0, 1, 2, 3))
    ratios = pick(cfg, quick=(0.0, 0.5), cpu=(0.5,), cuda=(0.2, 0.5, 0.8))
    size = f"{model}_{img_size}" if img_size else model
    for stage in stages:
        for r in ratios:
            yield Case(NAME, f"{NAME}/{size}/b{batch}/stage{stage}/s{r}", f"{size} b{batch} stage{stage}",
                       dict(model=model, img_size=img_size, batch=batch, stage=stage, sparsity=r),
                       functools.partial(_swin, cfg, model, img_size, batch, stage, r))
