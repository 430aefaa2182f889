"""Swin V2 (timm SwinTransformerV2) under patch.swin, on a tiny random model whose LayerNorms,
qkv biases and logit scales are drawn at random (timm's init makes the res-post-norms zero):
zero sparsity is timm's forward, a pruned block is timm's block on its kept windows (forward
and gradients), and window_attention's per-head scale matches the reference."""
import copy

import pytest
import timm
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2Block

import sparse_ops
from sparse_ops import patch, reference
from sparse_ops.nn import SparseSwinV2Block
from sparse_ops.select import kept_count
from test_patch import reference_swin

TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=5)
# static shift masks at a size the windows divide; dynamic ones at sizes they do not
CONFIGS = {"static 32x32": dict(img_size=32), "dynamic 36x44": dict(img_size=(36, 44), strict_img_size=False)}


def make_swinv2(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    net = timm.create_model("swinv2_tiny_window8_256", pretrained=False, **{**TINY, **kw})
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
            if isinstance(getattr(m, "logit_scale", None), torch.nn.Parameter):
                m.logit_scale.normal_(2.5, 1.5)  # some above the clamp at log(100)
                m.q_bias.normal_(0.0, 0.3)
                m.v_bias.normal_(0.0, 0.3)
    return net.to(dtype).eval()


def images(size, batch=2, dtype=torch.float32, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------- zero sparsity
@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_zero_sparsity_is_timm(config):
    net = make_swinv2(**CONFIGS[config])
    ours = patch.swin(copy.deepcopy(net))
    assert all(isinstance(b, SparseSwinV2Block) for s in ours.layers for b in s.blocks)
    assert list(ours.state_dict()) == list(net.state_dict())
    sizes = [net.patch_embed.img_size] + ([(40, 28)] if config.startswith("dynamic") else [])
    for size in sizes:
        x = images(size)
        with torch.no_grad():
            assert (ours(x) - net(x)).abs().max() < 1e-5
            sparse_ops.set_sparsity(ours, ratios=0.5)
            assert (ours(x) - net(x)).abs().max() > 1e-4  # pruning changes the output...
            sparse_ops.set_sparsity(ours, ratios=0.0)
            assert (ours(x) - net(x)).abs().max() < 1e-5  # ...and is undone at run time


# --------------------------------------------------------------------- pruned blocks
@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_pruned_block_is_timm_block_on_kept_windows(config):
    net = make_swinv2(**CONFIGS[config])
    ours = patch.swin(copy.deepcopy(net), ratios=0.5)
    x = torch.randn(2, *ours.layers[0].output_resolution, 16, generator=torch.Generator().manual_seed(2))
    for b, (blk, timm_blk) in enumerate(zip(ours.layers[0].blocks, net.layers[0].blocks)):
        with torch.no_grad():
            out = blk(x)
            ref = reference.pruned_block_output(x, timm_blk(x), x, timm_blk.window_size, timm_blk.shift_size, 0.5)
            assert (out - ref).abs().max() < 1e-5, b
            assert (out != x).any() and (out == x).any()  # some windows pruned, some kept
            owned = x.clone()
            assert blk(owned, inplace=True).equal(out)  # the in-place write (where taken) is the same


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_pruned_model_matches_reference_with_gradients(config):
    net = make_swinv2(**CONFIGS[config])
    ratios = [0.25, 0.5, 0.5, 0.75]
    ours = patch.swin(copy.deepcopy(net), ratios=ratios)
    x = images(net.patch_embed.img_size)
    out, ref = ours(x), reference_swin(net, x, ratios, SwinTransformerV2Block.forward)
    assert (out - ref).abs().max() < 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    params = dict(net.named_parameters())
    for name, p in ours.named_parameters():
        r = params[name].grad
        assert (p.grad - r).abs().max() <= 1e-4 * (1 + r.abs().max()), name


def test_batch_0():
    net = patch.swin(make_swinv2(**CONFIGS["dynamic 36x44"]), ratios=0.5)
    x = images((36, 44), batch=0)
    assert net(x).shape == (0, 5)
    x.requires_grad_(True)
    net.train()(x).sum().backward()
    assert x.grad.shape == x.shape


def test_checkpointing_and_stage_share_ranking():
    net = make_swinv2(**CONFIGS["dynamic 36x44"])
    ours = patch.swin(copy.deepcopy(net), ratios=0.5)
    x = images(net.patch_embed.img_size)
    ref = ours(x)
    ours.set_grad_checkpointing(True)
    out = ours(x)
    out.sum().backward()
    assert (out - ref).abs().max() < 1e-6
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


# -------------------------------------------------------- window attention, per-head scale
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the kernels / the PyTorch path
@pytest.mark.parametrize("n", [16, 49])  # one query block and several (blocks of 32 rows)
def test_window_attention_per_head_scale(dtype, n):
    g = torch.Generator().manual_seed(3)
    M, H, D = 5, 3, 8
    q, k, v = (torch.randn(M, H, n, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    bias = torch.randn(H, n, n, generator=g, dtype=dtype).requires_grad_()
    mask = torch.randn(2, n, n, generator=g, dtype=dtype)
    ids = torch.randint(0, 2, (M,), generator=g)
    scale = (torch.rand(H, generator=g, dtype=dtype) * 3 + 0.5).requires_grad_()
    inputs = (q, k, v, bias, scale)
    out = sparse_ops.window_attention(q, k, v, ids, bias, mask, scale)
    ref = reference.window_attention(*(t.double() for t in (q, k, v)), ids, bias.double(), mask.double(),
                                     scale.double())
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    ours_grads = torch.autograd.grad(out, inputs, grad)
    ref_grads = torch.autograd.grad(ref, inputs, grad.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert (out - ref).abs().max() < tol
    for name, a, b in zip(("q", "k", "v", "bias", "scale"), ours_grads, ref_grads):
        assert a.dtype == dtype and (a - b).abs().max() < tol * (1 + b.abs().max()), name


def test_window_attention_scale_tensor_errors():
    q = torch.randn(2, 3, 16, 8)
    ids = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"scale must be a number or have one entry per head \(\[H\] = \[3\]\)"):
        sparse_ops.window_attention(q, q, q, ids, scale=torch.ones(2))
    with pytest.raises(ValueError, match="scale must be 1-D"):
        sparse_ops.window_attention(q, q, q, ids, scale=torch.ones(3, 1))


# ------------------------------------------------------------------------ unsupported
def test_unsupported_variants_raise():
    with pytest.raises(TypeError, match="SwinTransformerV2Cr .* not supported: .*SwinTransformerV2CrBlock"):
        patch.swin(timm.create_model("swinv2_cr_tiny_224", pretrained=False, embed_dim=16, depths=(2,),
                                     num_heads=(1,), img_size=32, window_size=4))
    net = make_swinv2(attn_drop_rate=0.1)
    with pytest.raises(TypeError, match=r"model.layers\[0\].blocks\[0\]: patch.swin needs timm's Mlp and no attention"):
        patch.swin(net)
    net = make_swinv2()
    net.layers[1].blocks[1].norm2 = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"model.layers\[1\].blocks\[1\]: norm1 and norm2 must be LayerNorms"):
        patch.swin(net)
    with pytest.raises(ValueError, match="ratios must be in"):
        patch.swin(make_swinv2(), ratios=1.0)


def test_naive_benchmark_block_is_timm_block_on_kept_windows():
    from benchmarks.baselines import sparsevit_block
    from benchmarks.flops import swin_windows
    net = make_swinv2(**CONFIGS["dynamic 36x44"])
    x = torch.randn(2, *net.layers[0].output_resolution, 16, generator=torch.Generator().manual_seed(4))
    blk = net.layers[0].blocks[0]  # unshifted: the dynamic model has no static shift mask for the baseline
    with torch.no_grad():
        naive = sparsevit_block(blk, x, kept_count(0.5, swin_windows(blk)[0]))
        assert (naive - reference.pruned_block_output(x, blk(x), x, blk.window_size, blk.shift_size, 0.5)).abs().max() < 1e-5
