"""The patched ViT under the calls users make (issues 14 and 18): `import sparse_ops` then
sparse_ops.patch.vit, timm's distilled DeiT and other VisionTransformer subclasses, a patch
that fails leaving the model untouched, an empty batch, forward_features' tensor contract,
forward_intermediates and features_only backbones. Pruned results are compared with per-image
references built from timm's own blocks on the kept tokens."""
import copy
import subprocess
import sys

import pytest
import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer

import sparse_ops
from sparse_ops import patch, select_tokens
from sparse_ops.nn import Tokens
from test_patch import VIT, class_attention, images, make_vit

LAYERS = (1, 3)


def make_deit(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return timm.create_model("deit_small_distilled_patch16_224", pretrained=False, **{**VIT, **kw}).to(dtype).eval()


def reference(net, x, layers, **mode):
    """Image by image, timm's blocks on the kept tokens (before each prune layer, those with
    the most class attention in the block before). -> (logits, [the [B, N, C] token grid
    after each block, each token holding its output of the last block it ran in], kept
    [B, N] bool after the last block)."""
    logits, grids, kept = [], [], []
    for image in x:
        t = net.norm_pre(net._pos_embed(net.patch_embed(image[None])))
        position, grid, scores, image_grids = torch.arange(t.shape[1]), t[0], None, []
        for i, blk in enumerate(net.blocks):
            if i in layers:
                keep = select_tokens(scores, keep_prefix=net.num_prefix_tokens, **mode).index
                t, position = t[:, keep], position[keep]
            if i + 1 in layers:
                scores = class_attention(blk, t)
            t = Block.forward(blk, t)
            grid = grid.index_copy(0, position, t[0])
            image_grids.append(grid)
        logits.append(net.forward_head(net.norm(t)))
        grids.append(image_grids)
        kept.append(torch.zeros(grid.shape[0], dtype=torch.bool).index_fill_(0, position, True))
    # distilled training: (class head, distillation head) logits per image
    logits = tuple(map(torch.cat, zip(*logits))) if isinstance(logits[0], tuple) else torch.cat(logits)
    return logits, [torch.stack(g) for g in zip(*grids)], torch.stack(kept)


# ------------------------------------------------------------------------- import
def test_patch_is_an_attribute_of_sparse_ops_without_importing_timm():
    code = ("import sys, sparse_ops\n"
            "assert 'timm' not in sys.modules, 'import sparse_ops imported timm'\n"
            "import timm\n"
            "net = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)\n"
            "assert sparse_ops.patch.vit(net, keep_rate=0.5) is net\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- batch zero
@pytest.mark.parametrize("mode", [dict(keep_rate=0.5), dict(mass=0.7), dict(keep_rate=1.0)], ids=["r0.5", "m0.7", "dense"])
def test_empty_batch_returns_what_timm_returns(mode):
    net = make_vit()
    ours = patch.vit(copy.deepcopy(net), prune_layers=LAYERS, **mode)
    x = images(net, 0)
    with torch.no_grad():
        assert ours(x).shape == net(x).shape == (0, net.num_classes)
        assert ours.forward_features(x).shape == net.forward_features(x).shape
        # NLC: timm's own NCHW reshape fails on an empty batch
        assert [y.shape for y in ours.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)] == \
            [y.shape for y in net.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)]


# ---------------------------------------------------------------- distilled DeiT
def test_distilled_deit_zero_sparsity_is_timm():
    net = make_deit()
    x = images(net, 3)
    ours = patch.vit(copy.deepcopy(net))
    assert isinstance(ours, timm.models.deit.VisionTransformerDistilled)
    assert (ours(x) - net(x)).abs().max() < 1e-5
    assert list(ours.state_dict()) == list(net.state_dict())


@pytest.mark.parametrize("mode", [dict(keep_rate=0.5), dict(mass=0.7)], ids=["r0.5", "m0.7"])
def test_distilled_deit_pruned_keeps_both_tokens_and_heads(mode):
    net = make_deit(torch.float64)
    ours = patch.vit(copy.deepcopy(net), prune_layers=LAYERS, **mode)
    x = images(net, 3, torch.float64)
    out, (ref, _, kept) = ours(x), reference(net, x, LAYERS, **mode)
    torch.testing.assert_close(out, ref)  # eval: the mean of the two heads
    assert kept[:, :2].all() and ours.forward_features(x).kept_tokens.equal(kept)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for model in (net, ours):  # timm's distilled training: the two heads' logits apart
        model.train().set_distilled_training(True)
    out, ref = ours(x), reference(net, x, LAYERS, **mode)[0]
    assert isinstance(out, tuple) and isinstance(ref, tuple) and len(out) == 2
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ subclasses
class OwnForwardFeatures(VisionTransformer):
    def forward_features(self, x, attn_mask=None, is_causal=False):
        return super().forward_features(x) * 2


class OnlyNewInit(VisionTransformer):
    def describe(self):
        return "kept"


def test_subclass_with_its_own_forward_is_refused_before_any_change():
    torch.manual_seed(0)
    net = OwnForwardFeatures(**VIT).eval()
    blocks_before = [type(b) for b in net.blocks]
    with pytest.raises(TypeError, match="cannot patch OwnForwardFeatures: .*forward_features"):
        patch.vit(net, keep_rate=0.5)
    assert type(net) is OwnForwardFeatures and [type(b) for b in net.blocks] == blocks_before
    assert not hasattr(net, "prune_layers")


def test_subclass_that_keeps_the_forward_methods_is_patched_exactly():
    torch.manual_seed(0)
    net = OnlyNewInit(**VIT).eval()
    ours = patch.vit(copy.deepcopy(net), keep_rate=0.5, prune_layers=LAYERS)
    assert isinstance(ours, OnlyNewInit) and ours.describe() == "kept"
    x = images(net, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(net, x, LAYERS, keep_rate=0.5)[0], atol=1e-5, rtol=1e-5)
        sparse_ops.set_sparsity(patch.vit(ours), keep_rate=1.0)  # patching again is fine
        assert (ours(x) - net(x)).abs().max() < 1e-5


def _state(net):
    return [(m, type(m), dict(vars(m))) for m in (net, *net.blocks)]


@pytest.mark.parametrize("failure", ["injected", "bad keep_rate"])
def test_a_failed_patch_leaves_the_model_as_it_was(failure, monkeypatch):
    net = make_vit()
    x = images(net)
    with torch.no_grad():
        before_out, before = net(x), _state(net)
    if failure == "injected":  # fails after the classes are swapped, before the sparsity is set
        def broken(*args, **kwargs):
            raise RuntimeError("injected failure")
        monkeypatch.setattr(patch, "set_sparsity", broken)
        with pytest.raises(RuntimeError, match="injected failure"):
            patch.vit(net, keep_rate=0.5)
    else:
        with pytest.raises(ValueError, match="keep_rate must be in"):
            patch.vit(net, keep_rate=0.0)
    assert [(m, t, a) for m, t, a in _state(net)] == before
    with torch.no_grad():
        assert torch.equal(net(x), before_out)


# --------------------------------------------------------------- forward_features
@pytest.mark.parametrize("mode", [dict(keep_rate=0.5), dict(mass=0.7)], ids=["r0.5", "m0.7"])
@pytest.mark.parametrize("config", [{}, dict(reg_tokens=2, global_pool="avg", init_values=0.5)], ids=["cls", "registers-avg"])
def test_forward_features_is_the_full_grid_and_forward_head_of_it_is_forward(config, mode):
    net = make_vit(torch.float64, **config)
    ours = patch.vit(copy.deepcopy(net), prune_layers=LAYERS, **mode)
    x = images(net, 3, torch.float64)
    ref_logits, ref_grids, ref_kept = reference(net, x, LAYERS, **mode)
    features = ours.forward_features(x)
    assert type(features) is torch.Tensor and features.shape == net.forward_features(x).shape
    torch.testing.assert_close(features, net.norm(ref_grids[-1]))
    assert features.kept_tokens.equal(ref_kept)
    torch.testing.assert_close(ours.forward_head(features), ours(x))
    torch.testing.assert_close(ours(x), ref_logits)
    tokens = ours.forward_tokens(x)  # the packed form: the kept rows, at their grid positions
    assert isinstance(tokens, Tokens)
    torch.testing.assert_close(tokens.x, features.reshape(-1, features.shape[-1])[tokens.index])
    torch.testing.assert_close(ours.forward_head(tokens), ref_logits)
    features.square().sum().backward()  # through the restoring scatter: paused rows included
    net.norm(ref_grids[-1]).square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# ---------------------------------------------------------- forward_intermediates
@pytest.mark.parametrize("mode", [dict(keep_rate=0.5), dict(mass=0.7)], ids=["r0.5", "m0.7"])
def test_forward_intermediates_are_restored_grids(mode):
    net = make_vit(torch.float64, reg_tokens=1)
    ours = patch.vit(copy.deepcopy(net), prune_layers=[2, 3], **mode)
    x = images(net, 3, torch.float64)
    _, ref_grids, _ = reference(net, x, (2, 3), **mode)
    P = net.num_prefix_tokens
    final, got = ours.forward_intermediates(x, indices=[0, 1, 2, 3], norm=True, return_prefix_tokens=True)
    torch.testing.assert_close(final, net.norm(ref_grids[-1]))
    dense = net.forward_intermediates(x, indices=[0, 1], norm=True, return_prefix_tokens=True, intermediates_only=True)
    for i, ((spatial, prefix), grid) in enumerate(zip(got, ref_grids)):
        grid = net.norm(grid)
        assert spatial.shape == (3, 32, 4, 4) and prefix.shape == (3, P, 32)
        torch.testing.assert_close(prefix, grid[:, :P])
        torch.testing.assert_close(spatial, grid[:, P:].reshape(3, 4, 4, 32).permute(0, 3, 1, 2))
        if i < 2:  # before the first prune layer: timm's dense intermediates, bit for bit
            assert torch.equal(spatial, dense[i][0]) and torch.equal(prefix, dense[i][1])
    nlc = ours.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True, stop_early=True)
    for y, grid in zip(nlc, ref_grids[2:]):
        torch.testing.assert_close(y, grid[:, P:])
    as_dict = ours.forward_intermediates(x, indices=[3], output_dict=True, return_prefix_tokens=True)
    torch.testing.assert_close(as_dict["image_intermediates"][0], ref_grids[3][:, P:].reshape(3, 4, 4, 32).permute(0, 3, 1, 2))
    torch.testing.assert_close(as_dict["image_intermediates_prefix"][0], ref_grids[3][:, :P])
    torch.testing.assert_close(as_dict["image_features"], final)


def test_one_scatter_per_returned_block_after_the_first_prune_layer(monkeypatch):
    from sparse_ops.nn import vit as sparse_vit
    ours = patch.vit(make_vit(depth=6), keep_rate=0.5, prune_layers=[2, 4])
    calls = []
    real_kernel = sparse_vit.kernel

    def counting(name, device_type):
        calls.append(name)
        return real_kernel(name, device_type)
    monkeypatch.setattr(sparse_vit, "kernel", counting)
    with torch.no_grad():
        ours.forward_intermediates(images(ours), indices=[0, 1, 3, 4, 5], intermediates_only=True)
    assert calls.count("scatter_rows") == 3  # blocks 3, 4, 5; blocks 0 and 1 are the dense output


def test_prune_intermediate_layers_keeps_working():
    net = make_vit(torch.float64)
    ours = patch.vit(copy.deepcopy(net), keep_rate=0.5, prune_layers=[1, 3])
    x = images(net, 2, torch.float64)
    _, ref_grids, _ = reference(net, x, (1, 3), keep_rate=0.5)
    assert ours.prune_intermediate_layers([1, 2]) == [1, 2] and len(ours.blocks) == 3
    got = ours.forward_intermediates(x, indices=[1, 2], output_fmt="NLC", intermediates_only=True)
    for y, grid in zip(got, ref_grids[1:3]):
        torch.testing.assert_close(y, grid[:, 1:])


# ------------------------------------------------------------------- features_only
@pytest.mark.parametrize("size", [(32, 32), (40, 24)], ids=["32", "40x24-dynamic"])
def test_features_only_zero_sparsity_is_timm(size):
    kw = dict(features_only=True, out_indices=(1, 3), **({} if size == (32, 32) else dict(dynamic_img_size=True)))
    net = make_vit(**kw)
    ours = patch.vit(copy.deepcopy(net))
    x = torch.randn(2, 3, *size)
    got, want = ours(x), net(x)
    assert [y.shape for y in got] == [y.shape for y in want] == [(2, 32, size[0] // 8, size[1] // 8)] * 2
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-5
    forward_want = net.model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", intermediates_only=True)
    for a, b in zip(ours.model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", intermediates_only=True),
                    forward_want):
        assert (a - b).abs().max() < 1e-5


def test_features_only_pruned_is_the_restored_grid():
    net = make_vit(torch.float64)
    wrapper = patch.vit(make_vit(torch.float64, features_only=True, out_indices=(1, 3)), keep_rate=0.5, prune_layers=[2])
    x = images(net, 2, torch.float64)
    _, ref_grids, _ = reference(net, x, (2,), keep_rate=0.5)
    for y, grid in zip(wrapper(x), (ref_grids[1], ref_grids[3])):
        torch.testing.assert_close(y, grid[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
    sparse_ops.set_sparsity(wrapper, keep_rate=1.0)
    for y, grid in zip(wrapper(x), net.forward_intermediates(x, indices=[1, 3], intermediates_only=True)):
        torch.testing.assert_close(y, grid)
