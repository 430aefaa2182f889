"""patch.vit on the ViT families people fine-tune, as tiny random-init timm configs: DeiT III
(LayerScale, no_embed_class), DINOv2 with and without register tokens (patch 14, dynamic image
size), CLIP (pre_norm: norm_pre). For each: zero sparsity is timm's model, the state_dict is
unchanged, and the pruned model equals a per-image loop of timm's own blocks run on the kept
tokens. LayerScale weights are set to values that matter (timm starts them near 0)."""
import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import Block

from sparse_ops import patch, select_tokens, set_sparsity
from sparse_ops.nn import Tokens
from test_patch import reference_vit as reference

TINY = dict(embed_dim=32, depth=4, num_heads=2)
FAMILIES = {  # name: (timm model, config, image sizes)
    "deit3": ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, **TINY), [(32, 32)]),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=28, dynamic_img_size=True, **TINY), [(28, 28), (42, 28)]),
    "dinov2-reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, dynamic_img_size=True, **TINY),
                   [(28, 28), (42, 28)]),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=32, patch_size=8, **TINY), [(32, 32)]),
}


def make(name, dtype=torch.float32):
    model_name, config, _ = FAMILIES[name]
    torch.manual_seed(0)
    net = timm.create_model(model_name, pretrained=False, num_classes=5, **config).to(dtype).eval()
    return weights_that_matter(net)


def weights_that_matter(net):
    """LayerScale weights randn * 0.5 (timm starts them near 0), biases and norms not at 0 / 1."""
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "gamma"):
                m.gamma.copy_(torch.randn_like(m.gamma) * 0.5)
        for name, p in net.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return net


def images(size, batch=2, dtype=torch.float32):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1)).to(dtype)


def test_families_have_what_they_claim():
    """The configs exercise the features this file is about (a timm change would not go unnoticed)."""
    assert make("deit3").no_embed_class and hasattr(make("deit3").blocks[0].ls1, "gamma")
    assert make("dinov2-reg").num_reg_tokens == 4 and make("dinov2").num_reg_tokens == 0
    assert make("dinov2").patch_embed.patch_size == (14, 14) and make("dinov2").dynamic_img_size
    assert not isinstance(make("clip").norm_pre, torch.nn.Identity)


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_sparsity_is_timm(name):
    assert_zero_sparsity_is_timm(make(name), FAMILIES[name][2])


def assert_zero_sparsity_is_timm(net, sizes, **patch_args):
    """patch.vit (keep rate 0.5) on a copy of net keeps its state_dict keys, and set back to
    keep rate 1 its forward and forward_features are timm's at every image size."""
    ours = patch.vit(copy.deepcopy(net), keep_rate=0.5, **patch_args)
    assert list(ours.state_dict()) == list(net.state_dict())
    set_sparsity(ours, keep_rate=1.0)
    for size in sizes:
        x = images(size)
        assert (ours(x) - net(x)).abs().max() < 1e-5
        assert (ours.forward_features(x) - net.forward_features(x)).abs().max() < 1e-5


@pytest.mark.parametrize("mode", [dict(keep_rate=0.5), dict(mass=0.7)], ids=["r0.5", "m0.7"])
@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_is_timm_blocks_on_the_kept_tokens(name, mode):
    """float64 (the plain-PyTorch path), at each image size: outputs and gradients."""
    net = make(name, torch.float64)
    ours = patch.vit(copy.deepcopy(net), prune_layers=[1, 3], **mode)
    for size in FAMILIES[name][2]:
        x = images(size, 3, torch.float64)
        out, ref = ours(x), reference(net, x, (1, 3), **mode)
        torch.testing.assert_close(out, ref)
        ours.zero_grad()
        net.zero_grad()
        out.square().sum().backward()
        ref.square().sum().backward()
        for (param, a), b in zip(ours.named_parameters(), net.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=param)


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_block_is_the_dense_block_on_the_kept_tokens(name):
    """fp32: a pruning block on [B, N, C] tokens with given scores equals timm's Block on the
    kept tokens; class and register tokens are among them."""
    net = make(name)
    ours = patch.vit(copy.deepcopy(net), keep_rate=0.5, prune_layers=[2])
    P, N = net.num_prefix_tokens, net.num_prefix_tokens + 16
    x = torch.randn(2, N, 32)
    scores = torch.rand(2, N)
    scores[:, :P] = 0  # prefix tokens kept even when they score lowest
    out = ours.blocks[2](Tokens.from_dense(x, cls_attn=scores))
    kept = select_tokens(scores, keep_rate=0.5, keep_prefix=P)
    assert (kept.index.view(2, -1)[:, :P] % N == torch.arange(P)).all()
    expected = Block.forward(net.blocks[2], x.reshape(2 * N, 32)[kept.index].view(2, -1, 32))
    assert (out.dense() - expected).abs().max() < 1e-5
