"""patch.vit / patch.eva on the ROPE-ViTs (timm's vit_*_patch16_rope_*: an Eva whose blocks'
attention is AttentionRope; 'mixed': one learnt rope table per block and head) and on a tiny
custom AttentionRope Eva (separate q/k/v, grouped-query attention, q/k norms, the inner
attention norm, no class token), at reduced width, depth and image size: zero sparsity is
timm's model; a pruned model (outputs and gradients) is a per-image loop of timm's blocks on
the kept tokens with their own rope rows; features_only, set_sparsity and the refusal of a gate."""
import copy

import pytest
import timm
import torch
from timm.layers.attention import AttentionRope
from timm.models._features import FeatureGetterNet
from timm.models.eva import Eva, EvaBlock

from sparse_ops import patch, select_tokens, set_sparsity
from sparse_ops.nn import SparseEva

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5)
MODELS = {  # name: (timm model or None for Eva(**config), config, image sizes)
    "rope": ("vit_small_patch16_rope_224", TINY, [(32, 32)]),
    "rope-ape": ("vit_small_patch16_rope_ape_224", TINY, [(32, 32)]),
    "rope-mixed": ("vit_small_patch16_rope_mixed_224", dict(TINY, dynamic_img_size=True), [(32, 32), (40, 24)]),
    "rope-mixed-ape": ("vit_small_patch16_rope_mixed_ape_224", TINY, [(32, 32)]),
    # 2 (block 1: 1, block 3: 4) kv heads of 4, ranked by the attention each token receives
    "custom-gqa": (None, dict(TINY, embed_dim=64, num_heads=4, num_kv_heads=(2, 1, 2, 4), attn_type="rope",
                              qkv_fused=False, qk_norm=True, scale_attn_inner=True, use_rot_pos_emb=True,
                              use_abs_pos_emb=False, rope_rotate_half=True, init_values=0.1, class_token=False,
                              num_reg_tokens=1, global_pool="avg"), [(32, 32)]),
}
LAYERS = (1, 3)


def make(name):
    model_name, config, _ = MODELS[name]
    torch.manual_seed(0)
    net = (Eva(**config) if model_name is None else timm.create_model(model_name, **config)).eval()
    # Weights that matter: timm starts LayerScale and the head (head_init_scale) near 0, norms
    # at 1 / 0, and its small weights leave q, k and v to their biases (attention that no
    # choice of tokens changes)
    with torch.no_grad():
        for pname, p in net.named_parameters():
            if "gamma" in pname:
                p.copy_(torch.randn_like(p) * 0.5)
            elif "norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() > 1:  # Linear and patch embedding weights, unit gain
                p.normal_(std=p[0].numel() ** -0.5)
    return net


def images(size, batch=2):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def reference(net, x, layers, **mode):
    """Image by image, timm's blocks on the kept tokens, each with its own rope rows (of its
    block's table, for 'mixed'): before each prune layer, the tokens with the most class
    attention (without a class token: the most attention received) in the previous block,
    read from timm's softmax (its unfused attention, where attn_drop receives it)."""
    net = copy.deepcopy(net)
    for blk in net.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, args, out, attn=blk.attn: setattr(attn, "probs", args[0]))
    P, outs = net.num_prefix_tokens, []
    for image in x:
        t, rope = net._pos_embed(net.patch_embed(image[None]))
        t, position = net.norm_pre(t), torch.arange(t.shape[1])  # each token's place in the grid
        for i, blk in enumerate(net.blocks):
            if i in layers:
                keep = select_tokens(scores, keep_prefix=P, **mode).index
                t, position = t[:, keep], position[keep]
            table = rope[i] if net.rope_mixed else rope
            t = EvaBlock.forward(blk, t, rope=table[..., position[P:] - P, :])
            probs = blk.attn.probs  # [1, H, L, L]
            scores = probs[:, :, 0].mean(1) if net.cls_token is not None else probs.mean(2).mean(1)
        outs.append(net.forward_head(net.norm(t)))
    return torch.cat(outs), net


def test_models_have_what_they_claim():
    """The configs exercise what this file is about (a timm change would not go unnoticed)."""
    for name in MODELS:
        assert all(type(blk.attn) is AttentionRope for blk in make(name).blocks), name
    assert make("rope").rope_mixed is False and make("rope").pos_embed is None
    assert make("rope-mixed").rope_mixed and make("rope-mixed-ape").pos_embed is not None
    custom = make("custom-gqa")
    assert [blk.attn.num_kv_heads for blk in custom.blocks] == [2, 1, 2, 4] and custom.blocks[0].attn.qkv is None
    attn = custom.blocks[0].attn
    assert not isinstance(attn.q_norm, torch.nn.Identity) and not isinstance(attn.norm, torch.nn.Identity)


@pytest.mark.parametrize("name", MODELS)
def test_zero_sparsity_is_timm(name):
    net = make(name)
    ours = patch.vit(copy.deepcopy(net), prune_layers=LAYERS)
    assert type(ours) is SparseEva and list(ours.state_dict()) == list(net.state_dict())
    for size in MODELS[name][2]:
        x = images(size)
        assert torch.equal(ours(x), net(x))
        want_final, want = net.forward_intermediates(x, indices=[0, 1, 2, 3])
        final, got = ours.forward_intermediates(x, indices=[0, 1, 2, 3])
        assert torch.equal(final, want_final) and all(torch.equal(a, b) for a, b in zip(got, want))
        set_sparsity(ours, mass=1.0)  # every block on Tokens (the packed path), every token kept
        torch.testing.assert_close(ours(x), net(x), atol=1e-5, rtol=1e-5)
        final, got = ours.forward_intermediates(x, indices=[0, 1, 2, 3])
        torch.testing.assert_close(final, want_final, atol=1e-5, rtol=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        set_sparsity(ours, keep_rate=1.0)


@pytest.mark.parametrize("mode", [dict(keep_rate=0.5), dict(mass=0.7)], ids=["keep_rate", "mass"])
@pytest.mark.parametrize("name", MODELS)
def test_pruned_is_timm_blocks_on_the_kept_tokens_with_their_rope(name, mode):
    net = make(name)
    ours = patch.vit(copy.deepcopy(net), prune_layers=LAYERS, **mode)
    for size in MODELS[name][2]:
        x = images(size, batch=3)
        got, (want, ref) = ours(x), reference(net, x, LAYERS, **mode)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        got.square().sum().backward()
        want.square().sum().backward()
        for (pname, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert p.grad is not None and p.grad.isfinite().all(), pname
            scale = q.grad.abs().max().item()  # gradients up to 40 here: float32 sums round at 1e-5 of that
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * scale, rtol=1e-4, msg=lambda m: f"{pname}: {m}")
        ours.zero_grad()


@pytest.mark.parametrize("name", ["rope-mixed", "custom-gqa"])
def test_features_only(name):
    """The features_only wrapper (FeatureGetterNet, blocks cut after the last out index):
    timm's features at zero sparsity, the patched model's intermediates when pruned."""
    net = make(name)
    x = images((32, 32))
    wrapper = FeatureGetterNet(copy.deepcopy(net), out_indices=(0, 2))
    want = wrapper(x)
    patch.vit(wrapper, prune_layers=(2,))
    assert len(wrapper.model.blocks) == 3 and all(torch.equal(a, b) for a, b in zip(wrapper(x), want))
    set_sparsity(wrapper, keep_rate=0.5)
    ours = patch.vit(copy.deepcopy(net), keep_rate=0.5, prune_layers=(2,))
    want = ours.forward_intermediates(x, indices=(0, 2), intermediates_only=True)
    got = wrapper(x)
    assert [f.shape for f in got] == [(2, net.embed_dim, 4, 4)] * 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["rope-mixed", "custom-gqa"])
def test_set_sparsity_changes_density(name):
    ours = patch.vit(make(name), prune_layers=LAYERS)
    x = images((32, 32))
    lengths = {}
    for rate in (1.0, 0.5, 0.25):
        set_sparsity(ours, keep_rate=rate)
        lengths[rate] = ours.forward_tokens(x).dense().shape[1]
    assert lengths == {1.0: 17, 0.5: 5, 0.25: 2}  # 1 prefix token + 16 -> 8 -> 4 (-> 4 -> 1) patches


def test_gated_attention_is_refused_before_any_change():
    net = make("rope")
    net.blocks[2] = EvaBlock(48, 3, attn_type="rope", gated_attn=True)
    classes = [type(m) for m in net.modules()]
    with pytest.raises(TypeError, match=r"model.blocks\[2\].attn has a gate \(gated_attn=True"):
        patch.vit(net, keep_rate=0.5)
    assert [type(m) for m in net.modules()] == classes
