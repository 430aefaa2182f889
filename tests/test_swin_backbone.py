"""A patched Swin as a backbone: timm's features_only wrappers and forward_intermediates return
timm's feature maps (unchanged at zero sparsity, pruned like forward otherwise, matching a
per-image reference written with timm's own blocks); forward hooks on blocks see their true
inputs and outputs although inference writes in place; batch 0; bad input."""
import copy

import pytest
import timm
import torch
import sparse_ops
import sparse_ops.fused as fused
from sparse_ops import patch
from test_patch import per_image_swin_reference

# strict_img_size=False: timm's Swin takes any input size (shift masks built per input)
SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7, img_size=56,
            strict_img_size=False)
SIZES = {"56": (56, 56), "72x64": (72, 64)}  # 14x14 tokens (two windows a side); 18x16: not a multiple of 7
RATIOS = (0.6, 0.6, 0.3, 0.5, 0.2, 0.4, 0.5, 0.5)
WRAPPERS = ("list", "dict", "hook", "getter")


def make_swin(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **{**SWIN, **kw}).to(dtype).eval()


def images(size, batch=2, dtype=torch.float32):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1)).to(dtype)


def as_list(features):
    return list(features.values()) if isinstance(features, dict) else list(features)


def count_window_rows(net):
    """A list that collects how many rows each block's attention projection computes."""
    rows = []
    for stage in net.layers:
        for blk in stage.blocks:
            blk.attn.proj.register_forward_hook(lambda m, args, out: rows.append(args[0].reshape(-1, m.in_features).shape[0]))
    return rows


# ------------------------------------------------------------------------ zero sparsity
@pytest.mark.parametrize("size", SIZES, ids=list(SIZES))
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_features_only_zero_sparsity_is_timm(wrapper, size):
    net = make_swin(features_only=True, out_indices=(0, 2, 3), feature_cls=wrapper)
    ours = patch.swin(copy.deepcopy(net))
    assert type(ours) is type(net) and list(ours.state_dict()) == list(net.state_dict())
    x = images(SIZES[size])
    expected, out = as_list(net(x)), as_list(ours(x))
    assert [f.shape for f in out] == [f.shape for f in expected]
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(out, expected))
    sparse_ops.set_sparsity(ours, ratios=0.5)  # the same weights, pruned, then dense again
    sparse_ops.set_sparsity(ours, ratios=0.0)
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(as_list(ours(x)), expected))


@pytest.mark.parametrize("size", SIZES, ids=list(SIZES))
def test_forward_intermediates_zero_sparsity_is_timm(size):
    net = make_swin()
    ours = patch.swin(copy.deepcopy(net))
    x = images(SIZES[size])
    for kw in (dict(indices=[0, 1, 3], norm=True), dict(indices=2, intermediates_only=True)):
        expected, out = net.forward_intermediates(x, **kw), ours.forward_intermediates(x, **kw)
        if not kw.get("intermediates_only"):
            assert (out[0] - expected[0]).abs().max() < 1e-5
            expected, out = expected[1], out[1]
        assert [f.shape for f in out] == [f.shape for f in expected]  # NCHW
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(out, expected))


# ------------------------------------------------------------------------------ pruned
@pytest.mark.parametrize("size", SIZES, ids=list(SIZES))
@pytest.mark.parametrize("wrapper", ["list", "getter"])
def test_pruned_features_only_matches_reference(wrapper, size):
    net = make_swin(torch.float64)
    ours = patch.swin(make_swin(torch.float64, features_only=True, out_indices=(0, 1, 2, 3), feature_cls=wrapper),
                      ratios=RATIOS)
    x = images(SIZES[size], dtype=torch.float64)
    _, _, stages = per_image_swin_reference(net, x, RATIOS)
    out = as_list(ours(x))
    if wrapper == "getter":  # forward_intermediates: NCHW
        stages = [s.permute(0, 3, 1, 2) for s in stages]
    for feature, expected in zip(out, stages):
        assert feature.shape == expected.shape
        torch.testing.assert_close(feature, expected)
    assert (out[0] - as_list(make_swin(torch.float64, features_only=True, feature_cls=wrapper)(x))[0]).abs().max() > 1e-3


def test_pruned_forward_intermediates_prunes_as_forward():
    net = make_swin(torch.float64)
    ours = patch.swin(copy.deepcopy(net), ratios=RATIOS)
    x = images(SIZES["72x64"], dtype=torch.float64)
    _, _, stages = per_image_swin_reference(net, x, RATIOS)
    rows = count_window_rows(ours)
    final, inter = ours.forward_intermediates(x, indices=[0, 2, 3], norm=True)
    torch.testing.assert_close(final, ours.norm(stages[3]))
    for feature, expected in zip(inter, [stages[0], stages[2], ours.norm(stages[3])]):
        torch.testing.assert_close(feature, expected.permute(0, 3, 1, 2))
    intermediate_rows, rows[:] = list(rows), []
    ours(x)
    assert intermediate_rows == rows  # the rows forward computes, fewer than every window's
    sparse_ops.set_sparsity(ours, ratios=0.0)
    rows[:] = []
    ours.forward_intermediates(x)
    assert all(pruned <= dense for pruned, dense in zip(intermediate_rows, rows))
    assert intermediate_rows[0] < rows[0] and sum(intermediate_rows) < sum(rows)

    # prune_intermediate_layers keeps the patched stages; set_sparsity then counts two stages
    assert ours.prune_intermediate_layers([0, 1]) == [0, 1]
    sparse_ops.set_sparsity(ours, ratios=RATIOS[:4])
    inter = ours.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for feature, expected in zip(inter, stages[:2]):
        torch.testing.assert_close(feature, expected.permute(0, 3, 1, 2))


def test_batch_zero():
    """An empty batch gives empty maps of timm's shapes (timm's own blocks fail on it)."""
    net = make_swin(torch.float64, features_only=True)
    shapes = [(0, *f.shape[1:]) for f in net(images((72, 64), batch=1, dtype=torch.float64))]
    ours = patch.swin(net, ratios=0.5)
    x = torch.randn(0, 3, 72, 64, dtype=torch.float64, requires_grad=True)
    for ratios in (0.5, 0.0):
        sparse_ops.set_sparsity(ours, ratios=ratios)
        assert [f.shape for f in ours(x)] == shapes
        with torch.no_grad():
            assert [f.shape for f in ours(x)] == shapes
    sum(f.sum() for f in ours(x)).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("wrapper", ["list", "getter"])
def test_swinv2_features_only(wrapper):
    """Swin V2's backbones too: timm's maps at zero sparsity, pruned maps of the same shapes."""
    torch.manual_seed(0)
    net = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=64, embed_dim=16, window_size=4,
                            depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), features_only=True,
                            feature_cls=wrapper).to(torch.float64).eval()
    with torch.no_grad():  # timm starts V2's res-post-norms at zero (every block the identity)
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
    ours = patch.swin(copy.deepcopy(net))
    x = images((64, 64), dtype=torch.float64)
    expected = net(x)
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(ours(x), expected, strict=True))
    sparse_ops.set_sparsity(ours, ratios=0.5)
    pruned = ours(x)
    assert [f.shape for f in pruned] == [f.shape for f in expected]
    assert (pruned[0] - expected[0]).abs().max() > 1e-3


# ------------------------------------------------------------------- hooks and in place
@pytest.mark.parametrize("mode", ["inference", "training"])
def test_block_hooks_see_true_inputs_and_outputs(mode):
    """Hooks on every block (and the downsamples) keep references, no clones; after forward
    each still holds what that block took and returned, as a reference recomputes it."""
    net = patch.swin(make_swin(torch.float64, features_only=True, drop_path_rate=0.0), ratios=RATIOS)  # deterministic
    x = images(SIZES["72x64"], dtype=torch.float64)
    seen, handles = [], []
    for stage in (net[f"layers_{s}"] for s in range(4)):
        handles.append(stage.downsample.register_forward_hook(lambda m, args, out: seen.append(("down", out))))
        for blk in stage.blocks:
            handles.append(blk.register_forward_hook(lambda m, args, out: seen.append((args[0], out))))
    if mode == "training":
        net.train()
        features = net(x)
    else:
        with torch.no_grad():
            features = net(x)
    inputs, blocks, stages = per_image_swin_reference(net, x, RATIOS)
    seen_blocks = [s for s in seen if s[0] != "down"]
    for (inp, out), expected_in, expected_out in zip(seen_blocks, inputs, blocks, strict=True):
        torch.testing.assert_close(inp, expected_in)
        torch.testing.assert_close(out, expected_out)
    downsampled = [out for tag, out in seen if tag == "down"]
    torch.testing.assert_close(downsampled[1], net.layers_1.downsample.forward(stages[0]))
    for feature, expected in zip(features, stages):
        torch.testing.assert_close(feature, expected)


def test_in_place_only_where_no_hook_can_see(monkeypatch):
    """Without hooks, every sparse block but a stage's first after an Identity downsample
    writes in place; a hooked block neither writes into its input nor has its output
    overwritten; a global hook or inplace=False turns in-place writes off."""
    calls = []
    inplace_op = fused.linear_scatter_
    monkeypatch.setattr(fused, "linear_scatter_", lambda *a: calls.append(1) or inplace_op(*a))
    net = make_swin(torch.float64, window_size=2, img_size=128)  # every block has windows to prune
    x = images((128, 128), dtype=torch.float64)
    ours = patch.swin(copy.deepcopy(net), ratios=0.5)
    with torch.no_grad():
        expected = ours(x)
        assert len(calls) == 7  # 8 blocks, stage 0's first reads the caller's tensor
        handle = ours.layers[2].blocks[0].register_forward_hook(lambda *a: None)
        calls.clear()
        torch.testing.assert_close(ours(x), expected)
        assert len(calls) == 5  # neither the hooked block nor the one after it
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
        calls.clear()
        try:
            torch.testing.assert_close(ours(x), expected)
        finally:
            handle.remove()
        assert calls == []
        patch.swin(ours, ratios=0.5, inplace=False)
        torch.testing.assert_close(ours(x), expected)
        assert calls == []


# --------------------------------------------------------------------------- bad input
def test_bad_input():
    with pytest.raises(TypeError, match="model is a FeatureListNet holding"):
        patch.swin(timm.create_model("resnet18", pretrained=False, features_only=True))
    with pytest.raises(TypeError, match="got FeatureGetterNet around a VisionTransformer"):
        patch.swin(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                                     features_only=True, out_indices=(1,)))
    with pytest.raises(TypeError, match=r"model.layers_0.blocks\[0\]: patch.swin needs timm's Mlp"):
        patch.swin(make_swin(features_only=True, attn_drop_rate=0.1))
    getter = make_swin(features_only=True, feature_cls="getter", out_indices=(0, 1))
    getter.out_indices = (0, 3)  # the getter pruned the model to two stages
    with pytest.raises(ValueError, match=r"out_indices \(0, 3\) of the FeatureGetterNet are out of range"):
        patch.swin(getter)
    with pytest.raises(ValueError, match="ratios must be a float, one per stage"):
        patch.swin(make_swin(features_only=True, out_indices=(0, 1)), ratios=(0.1, 0.2, 0.3))
    with pytest.raises(TypeError, match="inplace must be a bool"):
        patch.swin(make_swin(), inplace=None)
