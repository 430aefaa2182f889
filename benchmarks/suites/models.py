"""models: whole timm models (inference) at a throughput and a latency batch size.
Every case at a throughput batch (64; Swin-T 672: 4; CPU: DeiT-S 8) and at batch 1, where the
per-block fixed overhead shows; on CPU DeiT-S and Swin-T at 224 (and 672 in SparseViT's
configuration) only, without torch.compile.
- DeiT-S / DeiT-B at 224 pruning tokens at blocks 3, 6, 9 with a fixed keep rate r (each
  prune layer keeps ceil(r * candidates)), or adaptively ("mass m": per image the fewest
  tokens whose class-attention mass reaches m). dense = the timm model; naive = EViT-style
  (explicit class-attention row, torch.gather, unchanged timm blocks; the adaptive mode pads
  the batch to its largest count and masks the padding); ours = sparse_ops.patch.vit.
- SigLIP B/16 at 224 (no class token, attention-pool head) pruning at blocks 3, 6, 9 with a
  fixed keep rate, tokens ranked by the attention they receive: dense and ours only (the
  EViT-style naive peer ranks by the class token's row, which this model lacks); FLOPs
  without the attention-pool head.
- Swin-T at 224 and at 672x672 (batch 4) with a window sparsity s in every block, and
  SparseViT's per-block ratios (stage 0: 0.6, stage 1: 0, stage 2: 0.2/0.4/0.5 in pairs,
  stage 3: 0). dense = the timm model; naive = SparseViT-style (roll, pad, partition, top
  windows by L2 norm ranked once per stage and window grid, unchanged timm attention and
  MLP on those, scatter back); flex = the same with the window attention's core on
  torch.compile(flex_attention) (bias and shift mask in a score_mod); ours =
  sparse_ops.patch.swin(model, ratios). naive and flex are checked against ours once before
  they are timed; "ours/<peer> overhead" is ours' median over the peer's, minus 1.
- Swin-T backbone at 672x672, batch 4, SparseViT's ratios, timed as SparseViT times it (its
  tools/measure_latency.py: the backbone alone on 4 images): every stage's features, NCHW,
  as timm's forward_intermediates(x, intermediates_only=True) returns them; beside the
  classifier in the same configuration. Methods as for the classifier.
- EVA-02-Ti (eva02_tiny_patch14_224: rotary embeddings, SwiGLU, 'avg' pooling) and CLIP's
  ViT-B/16 (vit_base_patch16_clip_224: norm_pre) at keep rate 0.7, pruning as DeiT (EVA's
  naive: EViT's pruning around timm's EvaBlocks, rope rows gathered with the tokens; ours =
  sparse_ops.patch.eva / patch.vit).
- Swin V2-T (swinv2_tiny_window8_256) at 512x512 with a window sparsity s in every block:
  the same methods (naive: SparseViT-style around V2's res-post-norm block; flex: unavailable,
  V2's cosine attention is not the peer's score_mod).
- SAM's image encoder (samvit_base_patch16 at 1024x1024, batch 1; CPU: its first three
  blocks, windowed, windowed, global, at 576x576) with a ratio r of every windowed block's
  14x14 windows pruned, timed as SAM times it (patch embedding, blocks, neck). dense = timm;
  naive = SparseViT-style (windows ranked once per run of windowed blocks; per block
  timm's window_partition, index_select of the kept windows, timm's attention, index_copy
  back, the MLP on the kept windows' real tokens); ours = sparse_ops.patch.sam(model, r).
  Global blocks run dense in all three. FLOPs: the attention on whole (padded) windows, the
  MLP on real tokens. And at 0.5 with query-pruned global blocks (patch.sam's
  query_pruned_global: a global block's queries are its kept windows' tokens, every token a key
  and value), against ours with dense global blocks.
Speedups are over dense; sparsity is the fraction of the model's FLOPs pruned (for the
adaptive mode, from the counts the naive baseline kept on the benchmark batch)."""
import functools

import torch


from .. import baselines, flops
from ..core import Case, Config, NO_FLEX, Setup, Unavailable, compiled, guarded, pick

NAME = "models"
MEMORY_BOUND = False
X_LABEL = "fraction of FLOPs pruned"

# SparseViT's Swin-T configuration, one ratio (fraction of windows pruned) per block.
SPARSEVIT_SWIN_T = (0.6, 0.6, 0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.5, 0.5, 0.0, 0.0)


def _images(net, batch: int, cfg: Config) -> torch.Tensor:
    return torch.randn(batch, 3, *net.patch_embed.img_size, device=cfg.device, dtype=cfg.dtype)


def _vit(cfg: Config, model: str, batch: int, keep_rate=None, mass=None) -> Setup:
    net = baselines.model(model, cfg.device, cfg.dtype, None)
    images = _images(net, batch, cfg)
    layers = baselines.prune_layers(len(net.blocks))
    mode = dict(keep_rate=keep_rate) if mass is None else dict(mass=mass)
    with torch.no_grad():
        counts = []  # [prune layer][image]
        baselines.evit_forward(net, images, **mode, layers=layers, counts=counts)
    N = net.patch_embed.num_patches + net.num_prefix_tokens
    schedules = [flops.evit_schedule(N, len(net.blocks), layers, [c[b] for c in counts], net.num_prefix_tokens)
                 for b in range(batch)]
    dense, sparse = flops.vit(net, batch), flops.vit(net, batch, schedules)
    ours = guarded(lambda: baselines.patched("vit", net, **mode, prune_layers=layers, package=False))
    methods = {"dense": lambda: net(images),
               "naive": lambda: baselines.evit_forward(net, images, **mode, layers=layers),
               "ours": ours if not callable(ours) else (lambda: ours(images))}
    return Setup(compiled(methods, cfg), flops=(dense, sparse), sparsity=1 - sparse / dense)


def _eva(cfg: Config, model: str, batch: int, keep_rate: float) -> Setup:
    """EVA-02 at a fixed keep rate; naive = EViT's pruning around timm's EvaBlocks (the rope
    rows gathered with the tokens)."""
    net = baselines.model(model, cfg.device, cfg.dtype, None)
    images = _images(net, batch, cfg)
    layers = baselines.prune_layers(len(net.blocks))
    schedule = flops.fixed_rate_schedule(net, layers, keep_rate)
    dense, sparse = flops.vit(net, batch), flops.vit(net, batch, [schedule] * batch)
    ours = guarded(lambda: baselines.patched("eva", net, keep_rate=keep_rate, prune_layers=layers))
    methods = {"dense": lambda: net(images),
               "naive": lambda: baselines.evit_eva_forward(net, images, keep_rate, layers),
               "ours": ours if not callable(ours) else (lambda: ours(images))}
    return Setup(compiled(methods, cfg), flops=(dense, sparse), sparsity=1 - sparse / dense)


def _vit_no_class(cfg: Config, model: str, batch: int, keep_rate: float) -> Setup:
    net = baselines.model(model, cfg.device, cfg.dtype, None)
    images = _images(net, batch, cfg)
    layers = baselines.prune_layers(len(net.blocks))
    dense = flops.vit(net, batch)
    sparse = flops.vit(net, batch, [flops.fixed_rate_schedule(net, layers, keep_rate)] * batch)
    ours = guarded(lambda: baselines.patched("vit", net, keep_rate=keep_rate, prune_layers=layers))
    methods = {"dense": lambda: net(images),
               "naive": Unavailable("the EViT-style peer ranks tokens by the class token's row; this model has none"),
               "ours": ours if not callable(ours) else (lambda: ours(images))}
    return Setup(compiled(methods, cfg), flops=(dense, sparse), sparsity=1 - sparse / dense)


def _swin(cfg: Config, model: str, img_size, batch: int, ratios, backbone: bool = False,
          inplace_off: bool = False) -> Setup:
    """The classifier, or with backbone=True every stage's features (no norm, no head).
    inplace_off: also ours with patch.swin(inplace=False), reported as its median over ours'
    minus 1 (what the in-place write saves)."""
    net = baselines.model(model, cfg.device, cfg.dtype, img_size)
    images = _images(net, batch, cfg)
    blocks = sum(len(stage.blocks) for stage in net.layers)
    ratios = [ratios] * blocks if isinstance(ratios, float) else list(ratios)
    kept = baselines.swin_kept_windows(net, ratios)
    head = 2 * batch * flops._weights(net.head) if backbone else 0
    dense, sparse = flops.swin(net, batch) - head, flops.swin(net, batch, kept) - head
    patched = guarded(lambda: baselines.patched("swin", net, ratios=ratios))
    if backbone:
        sparse_forward = baselines.sparsevit_features
        run = lambda m: m.forward_intermediates(images, intermediates_only=True)  # noqa: E731
    else:
        sparse_forward, run = baselines.sparsevit_forward, lambda m: m(images)  # noqa: E731
    ours = patched if not callable(patched) else (lambda: run(patched))
    check = functools.partial(baselines.peer, expected=baselines.expected_of(ours), device=cfg.device,
                              dtype=cfg.dtype)

    def make_flex():
        torch._dynamo.reset()  # this case's FlexAttention compiles on its own (within the recompile limit)
        return lambda: sparse_forward(net, images, kept, attention=baselines.flex_window_attention)

    methods = {"dense": lambda: run(net), "naive": check(lambda: lambda: sparse_forward(net, images, kept)),
               "flex": check(make_flex) if cfg.flex else NO_FLEX, "ours": ours}
    overheads = baselines.peer_ratios(methods, ("naive", "flex"))
    if inplace_off:
        copying = guarded(lambda: baselines.patched("swin", net, ratios=ratios, inplace=False))
        methods["ours inplace=False"] = copying if not callable(copying) else (lambda: run(copying))
        overheads["ours inplace=False/ours"] = ("ours inplace=False", "ours")
    return Setup(compiled(methods, cfg, names=("dense", "naive", "flex")), flops=(dense, sparse),
                 sparsity=1 - sparse / dense, overheads=overheads)


def _sam(cfg: Config, model: str, img_size, batch: int, ratio: float, query_pruned: bool = False) -> Setup:
    """SAM's image encoder as SAM times it (forward_features: patch embedding, blocks, neck),
    with `ratio` of every windowed block's windows pruned; query_pruned: the global blocks' too
    (patch.sam's query_pruned_global: only the kept windows' tokens are queries), where ours
    with dense global blocks is the peer (the naive has no such global block)."""
    net = baselines.model(model, cfg.device, cfg.dtype, img_size)
    images = _images(net, batch, cfg)
    dense = flops.sam(net, batch)
    patched = guarded(lambda: baselines.patched("sam", net, ratios=ratio, query_pruned_global=query_pruned))
    ours = patched if not callable(patched) else (lambda: patched.forward_features(images))
    if query_pruned:
        # the windows each block ran, read off ours (its global blocks rank their own inputs)
        kept = baselines.sam_changed_windows(patched, images) if callable(patched) else None
        sparse = dense if kept is None else flops.sam(net, batch, kept)
        windowed = guarded(lambda: baselines.patched("sam", net, ratios=ratio))
        methods = {"dense": lambda: net.forward_features(images),
                   "ours, dense global blocks": windowed if not callable(windowed) else
                   (lambda: windowed.forward_features(images)), "ours": ours}
        overheads = {"ours/ours, dense global blocks": ("ours", "ours, dense global blocks")}
        return Setup(compiled(methods, cfg), flops=(dense, sparse), sparsity=1 - sparse / dense, overheads=overheads)
    kept = []  # per block, the windows each image keeps: their real tokens are the MLP's FLOPs
    with torch.no_grad():
        baselines.sam_naive_forward(net, images, ratio, kept=kept)
    sparse = flops.sam(net, batch, kept)
    check = functools.partial(baselines.peer, expected=baselines.expected_of(ours), device=cfg.device,
                              dtype=cfg.dtype)
    methods = {"dense": lambda: net.forward_features(images),
               "naive": check(lambda: lambda: baselines.sam_naive_forward(net, images, ratio)), "ours": ours}
    return Setup(compiled(methods, cfg), flops=(dense, sparse), sparsity=1 - sparse / dense,
                 overheads=baselines.peer_ratios(methods, ("naive",)))


def cases(cfg: Config):
    vits = pick(cfg, quick=("vit_test",), cpu=("deit_small",), cuda=("deit_small", "deit_base"))
    vit_batches = pick(cfg, quick=(2,), cpu=(8, 1), cuda=(64, 1))
    keep_rates = pick(cfg, quick=(1.0, 0.5), cpu=(1.0, 0.7, 0.5), cuda=(1.0, 0.8, 0.7, 0.6, 0.5))
    masses = pick(cfg, quick=(0.9,), cpu=(0.9,), cuda=(0.9, 0.8))
    for model in vits:
        for batch in vit_batches:
            for r in keep_rates:
                yield Case(NAME, f"{NAME}/{model}/b{batch}/keep{r}", f"{model} b{batch}",
                           dict(model=model, batch=batch, keep_rate=r),
                           functools.partial(_vit, cfg, model, batch, keep_rate=r))
            for m in masses:
                yield Case(NAME, f"{NAME}/{model}/b{batch}/mass{m}", f"{model} b{batch} adaptive",
                           dict(model=model, batch=batch, mass=m),
                           functools.partial(_vit, cfg, model, batch, mass=m))

    # EVA-02 (rotary embeddings, SwiGLU) and CLIP's ViT-B/16 (norm_pre) at one fixed keep rate
    families = pick(cfg, quick=(("eva_test", 2),), cpu=(("eva02_tiny", 8), ("vit_base_clip", 1)),
                    cuda=(("eva02_tiny", 64), ("eva02_tiny", 1), ("vit_base_clip", 64), ("vit_base_clip", 1)))
    for model, batch in families:
        setup = _eva if model.startswith("eva") else _vit
        yield Case(NAME, f"{NAME}/{model}/b{batch}/keep0.7", f"{model} b{batch}",
                   dict(model=model, batch=batch, keep_rate=0.7),
                   functools.partial(setup, cfg, model, batch, keep_rate=0.7))

    no_class = pick(cfg, quick=(("siglip_test", 2),), cpu=(("siglip_base", 1),), cuda=(("siglip_base", 64),
                                                                                ("siglip_base", 1)))
    for model, batch in no_class:
        for r in pick(cfg, quick=(0.5,), cpu=(0.7,), cuda=(0.7, 0.5)):
            yield Case(NAME, f"{NAME}/{model}/b{batch}/keep{r}", f"{model} b{batch}",
                       dict(model=model, batch=batch, keep_rate=r),
                       functools.partial(_vit_no_class, cfg, model, batch, r))

    swins = pick(cfg, quick=(("swin_test", None, 1),),
                 cpu=(("swin_tiny", 224, 1), ("swin_tiny", 672, 1), ("swin_tiny", 672, 4), ("swinv2_tiny", 512, 1)),
                 cuda=(("swin_tiny", 224, 64), ("swin_tiny", 224, 1), ("swin_tiny", 672, 4), ("swin_tiny", 672, 1),
                       ("swinv2_tiny", 512, 8), ("swinv2_tiny", 512, 1)))
    window_ratios = pick(cfg, quick=(0.0, 0.5), cpu=(0.0, 0.4, 0.8), cuda=(0.0, 0.2, 0.4, 0.6, 0.8))
    for model, img_size, batch in swins:
        size = f"{model}_{img_size}" if img_size else model
        # On the CPU, 672x672 only in SparseViT's configuration (a dense forward takes ~1 s).
        configs = [] if cfg.device == "cpu" and img_size == 672 else [(f"s{r}", r, f"{size} b{batch}") for r in window_ratios]
        if model == "swin_tiny":
            configs.append(("sparsevit", SPARSEVIT_SWIN_T, f"{size} b{batch} sparsevit"))
        for label, ratios, group in configs:
            # the in-place write's saving, where SparseViT's ratios run (--quick: at 0.5)
            off = label == ("s0.5" if cfg.quick else "sparsevit")
            yield Case(NAME, f"{NAME}/{size}/b{batch}/{label}", group,
                       dict(model=model, img_size=img_size, batch=batch, ratios=ratios),
                       functools.partial(_swin, cfg, model, img_size, batch, ratios, inplace_off=off))
        # SparseViT's measurement: the backbone at 672x672, batch 4 (--quick: the test model at 0.5)
        if (model, img_size, batch) == ("swin_tiny", 672, 4) or cfg.quick:
            ratios = 0.5 if cfg.quick else SPARSEVIT_SWIN_T
            yield Case(NAME, f"{NAME}/{size}/b{batch}/{'s0.5' if cfg.quick else 'sparsevit'}/backbone",
                       f"{size} b{batch} backbone", dict(model=model, img_size=img_size, batch=batch, ratios=ratios,
                                                         backbone=True),
                       functools.partial(_swin, cfg, model, img_size, batch, ratios, backbone=True))

    # SAM's image encoder, window pruning (CPU: its first three blocks at 576x576: 36x36 tokens
    # in 3x3 windows of 14x14 whose last row and column hold 8 real ones, as 1024's 64x64 in 5x5)
    sams = pick(cfg, quick=(("samvit_test", None, 1),), cpu=(("samvit_base_d3", 576, 1),),
                cuda=(("samvit_base", 1024, 1),))
    for model, img_size, batch in sams:
        size = f"{model}_{img_size}" if img_size else model
        for r in pick(cfg, quick=(0.5,), cpu=(0.5,), cuda=(0.3, 0.5, 0.7)):
            yield Case(NAME, f"{NAME}/{size}/b{batch}/r{r}", f"{size} b{batch}",
                       dict(model=model, img_size=img_size, batch=batch, ratio=r),
                       functools.partial(_sam, cfg, model, img_size, batch, r))
        # the global blocks pruned too (their queries), at 0.5
        yield Case(NAME, f"{NAME}/{size}/b{batch}/r0.5/qglobal", f"{size} b{batch} query-pruned global",
                   dict(model=model, img_size=img_size, batch=batch, ratio=0.5, query_pruned=True),
                   functools.partial(_sam, cfg, model, img_size, batch, 0.5, query_pruned=True))
