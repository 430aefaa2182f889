"""attention: the attention kernels at the models' shapes, forward and forward+backward.
Backward: the gradients of the inputs.
- varlen: sparse_ops.varlen_attention on packed DeiT-S / DeiT-B heads (H = 6 / 12, D = 64;
  on CPU DeiT-S only), batch 64 (CPU: 8), per-image lengths drawn from 60..197 (the tokens
  a pruned DeiT keeps). dense = SDPA on the padded batch with a key-padding mask; naive =
  SDPA on the nested jagged tensor (torch.nested, layout=torch.jagged); varlen_attn =
  torch.nn.attention.varlen.varlen_attn (torch's flash varlen kernel, the same cu_seqlens;
  CUDA, half precision); flex = torch.compile(flex_attention) on the packed rows with a
  document mask (create_block_mask, built once outside the timing; no backward on CPU);
  ours+cls = ours with return_cls_attn=True (its cost over ours is reported as cls_attn
  overhead).
- window: Swin-T's shifted-window attention module (qkv, attention, proj) at 672x672, batch 4,
  each stage (CPU: 224, batch 1, stages 0 and 2), keeping a fraction of the windows. dense =
  timm's WindowAttention (fused SDPA, the shift mask expanded per batch) on all windows;
  naive = the same on the kept windows with the mask indexed by window; flex = the module's
  qkv and proj around torch.compile(flex_attention) on the kept windows, the relative-position
  bias and each window's shift-mask row added by a score_mod; ours = the module's qkv and
  proj around sparse_ops.window_attention on the kept windows (the mask looked up by window
  id).
Every method but dense+compile / naive+compile is checked against ours once before it is
timed (the same gradient of the output for all in the backward); a peer torch cannot run
here is listed unavailable with torch's reason. "ours/<peer> overhead" is ours' median over
the peer's, minus 1 (negative: ours is faster).
Speedups are over dense; sparsity is the fraction of FLOPs pruned."""
import functools

import torch
import torch.nn.functional as F

import sparse_ops
from sparse_ops.select import kept_count

from .. import baselines, flops
from ..core import Case, Config, NO_FLEX, Setup, compiled, pick

NAME = "attention"
MEMORY_BOUND = False
X_LABEL = "fraction of FLOPs pruned"
PASSES = ("fwd", "fwd+bwd")
BACKWARD_FLOPS = 2  # a backward's matmuls are twice the forward's (q k^T is not recomputed)


def _timed(forward, inputs, grad_out=None):
    """forward(*inputs), and with grad_out the gradients of the inputs for that output
    gradient (torch.autograd.grad: nothing accumulates between calls)."""
    if grad_out is None:
        return lambda: forward(*inputs)
    return lambda: torch.autograd.grad(forward(*inputs), inputs, grad_out)


# --------------------------------------------------------------------------- varlen
def _varlen(cfg: Config, heads: int, batch: int, lengths_range, backward: bool) -> Setup:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(lengths_range[0], lengths_range[1] + 1, (batch,), generator=generator)
    T, L, D = int(lengths.sum()), int(lengths.max()), 64
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(cfg.device)
    packed = [torch.randn(T, heads, D, device=cfg.device, dtype=cfg.dtype, requires_grad=backward) for _ in range(3)]
    keep = (torch.arange(L) < lengths[:, None]).to(cfg.device)  # [B, L]
    padded = []
    for t in packed:
        p = torch.zeros(batch, L, heads, D, device=cfg.device, dtype=cfg.dtype)
        p[keep] = t.detach()
        padded.append(p.requires_grad_(backward))
    key_mask = keep.view(batch, 1, 1, L)
    grad_packed = torch.randn(T, heads, D, device=cfg.device, dtype=cfg.dtype) if backward else None
    grad_padded = None
    if backward:
        grad_padded = torch.zeros(batch, L, heads, D, device=cfg.device, dtype=cfg.dtype)
        grad_padded[keep] = grad_packed
    cu32 = cu_seqlens.to(torch.int32)

    def ours(q, k, v, return_cls_attn=False):
        # cu_seqlens is valid by construction: skip its check, a host sync per call (as a
        # patched model does for the cu_seqlens that select_tokens builds)
        with sparse_ops.no_index_checks():
            return sparse_ops.varlen_attention(q, k, v, cu32, L, return_cls_attn=return_cls_attn)

    def dense(q, k, v):  # [B, L, H, D] viewed as [B, H, L, D], as timm's Attention has them
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=key_mask).transpose(1, 2)

    def nested(q, k, v):
        q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets=cu_seqlens).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()

    def make_varlen_attn():
        from torch.nn.attention.varlen import varlen_attn
        if cfg.device == "cuda" and cfg.dtype == torch.float32:
            raise NotImplementedError("varlen_attn (flash attention) takes float16 / bfloat16 only")
        return _timed(lambda q, k, v: varlen_attn(q, k, v, cu32, cu32, L, L), packed, grad_packed)

    def make_flex():
        from torch.nn.attention.flex_attention import create_block_mask
        torch._dynamo.reset()  # this case's FlexAttention compiles on its own (within the recompile limit)
        document = torch.repeat_interleave(torch.arange(batch, device=cfg.device), lengths.to(cfg.device))
        block_mask = create_block_mask(lambda b, h, i, j: document[i] == document[j], None, None, T, T,
                                       device=cfg.device)
        flex = baselines.compiled_flex_attention()

        def forward(q, k, v):  # [T, H, D] viewed as one [1, H, T, D] sequence
            out = flex(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)
            return out[0].transpose(0, 1)
        return _timed(forward, packed, grad_packed)

    methods = {"ours": _timed(ours, packed, grad_packed)}
    methods["ours+cls"] = _timed(lambda q, k, v: ours(q, k, v, return_cls_attn=True)[0], packed, grad_packed)
    expected = baselines.expected_of(methods["ours"])
    check = functools.partial(baselines.peer, expected=expected, device=cfg.device, dtype=cfg.dtype)
    methods = {"dense": check(lambda: _timed(dense, padded, grad_padded), as_ours=lambda t: t[keep]),
               "naive": check(lambda: _timed(nested, packed, grad_packed)),
               "varlen_attn": check(make_varlen_attn), "flex": check(make_flex) if cfg.flex else NO_FLEX,
               **methods}
    methods["ours+cls"] = check(lambda: methods["ours+cls"])
    scale = 1 + BACKWARD_FLOPS * backward
    dense_flops = scale * flops.attention_core(batch * L, L, heads * D)
    sparse_flops = scale * sum(flops.attention_core(n, n, heads * D) for n in lengths.tolist())
    overheads = {"cls_attn": ("ours+cls", "ours"), **baselines.peer_ratios(methods, ("naive", "varlen_attn", "flex"))}
    return Setup(compiled(methods, cfg), flops=(dense_flops, sparse_flops), sparsity=1 - sparse_flops / dense_flops,
                 grad=backward, overheads=overheads)


# --------------------------------------------------------------------------- window
def ours_window_attention(attn, x: torch.Tensor, window_ids: torch.Tensor, mask) -> torch.Tensor:
    """timm's WindowAttention forward with sparse_ops.window_attention as its core (window_ids
    valid by construction: their range check, a host sync per call, is skipped)."""
    M, n, C = x.shape
    q, k, v = attn.qkv(x).reshape(M, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    with sparse_ops.no_index_checks():
        out = sparse_ops.window_attention(q, k, v, window_ids, bias=attn._get_rel_pos_bias()[0], mask=mask,
                                          scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(M, n, -1))


def _window(cfg: Config, model: str, img_size: int, stage: int, batch: int, sparsity: float, backward: bool) -> Setup:
    net = baselines.model(model, cfg.device, cfg.dtype, img_size)
    block = net.layers[stage].blocks[-1]  # the last block of a stage is shifted where the stage is
    attn, mask = block.attn, block.attn_mask
    windows, area = flops.swin_windows(block)
    K = kept_count(1.0 - sparsity, windows)
    ids = torch.rand(batch, windows, device=cfg.device).topk(K, dim=1).indices  # [B, K]
    kept_rows = (ids + windows * torch.arange(batch, device=cfg.device)[:, None]).flatten()  # into [B * nW]
    x_all = torch.randn(batch * windows, area, block.dim, device=cfg.device, dtype=cfg.dtype)
    x_kept = x_all[kept_rows].requires_grad_(backward)
    x_all.requires_grad_(backward)
    grad_all = torch.randn_like(x_all) if backward else None
    grad_kept = grad_all[kept_rows] if backward else None
    ids = ids.flatten()

    def make_flex():
        torch._dynamo.reset()  # this case's FlexAttention compiles on its own (within the recompile limit)
        return _timed(lambda t: baselines.flex_window_attention(attn, t, ids, mask), [x_kept], grad_kept)

    methods = {"ours": _timed(lambda t: ours_window_attention(attn, t, ids, mask), [x_kept], grad_kept)}
    check = functools.partial(baselines.peer, expected=baselines.expected_of(methods["ours"]), device=cfg.device,
                              dtype=cfg.dtype)
    methods = {"dense": check(lambda: _timed(lambda t: attn(t, mask=mask), [x_all], grad_all),
                              as_ours=lambda t: t[kept_rows]),
               "naive": check(lambda: _timed(lambda t: baselines.timm_window_attention(attn, t, ids, mask), [x_kept],
                                             grad_kept)),
               "flex": check(make_flex) if cfg.flex else NO_FLEX, **methods}
    scale = 1 + BACKWARD_FLOPS * backward
    dense, sparse = (scale * batch * flops.swin_attention(block, kept) for kept in (windows, K))
    return Setup(compiled(methods, cfg), flops=(dense, sparse), sparsity=1 - K / windows, grad=backward,
                 overheads=baselines.peer_ratios(methods, ("naive", "flex")))


def cases(cfg: Config):
    batch = pick(cfg, quick=2, cpu=8, cuda=64)
    lengths = pick(cfg, quick=(5, 17), cpu=(60, 197), cuda=(60, 197))
    models = pick(cfg, quick=(("vit_test", 2),), cpu=(("deit_small", 6),), cuda=(("deit_small", 6), ("deit_base", 12)))
    for model, heads in models:
        for p in PASSES:
            yield Case(NAME, f"{NAME}/varlen/{model}/b{batch}/{p}", f"varlen {model} {p}",
                       dict(model=model, heads=heads, batch=batch, lengths=lengths, backward=p == "fwd+bwd"),
                       functools.partial(_varlen, cfg, heads, batch, lengths, p == "fwd+bwd"))

    model, img_size, batch = pick(cfg, quick=("swin_test", None, 1), cpu=("swin_tiny", 224, 1),
                                  cuda=("swin_tiny", 672, 4))
    stages = pick(cfg, quick=(0,), cpu=(0, 2), cuda=(0, 1, 2, 3))
    sparsities = pick(cfg, quick=(0.0, 0.5), cpu=(0.0, 0.5), cuda=(0.0, 0.4, 0.8))
    size = f"{model}_{img_size}" if img_size else model
    for stage in stages:
        for p in PASSES:
            for s in sparsities:
                yield Case(NAME, f"{NAME}/window/{size}/b{batch}/stage{stage}/s{s}/{p}",
                           f"window {size} b{batch} stage{stage} {p}",
                           dict(model=model, img_size=img_size, batch=batch, stage=stage, sparsity=s,
                                backward=p == "fwd+bwd"),
                           functools.partial(_window, cfg, model, img_size, stage, batch, s, p == "fwd+bwd"))
