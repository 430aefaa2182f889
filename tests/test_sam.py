"""patch.sam (and patch.vit handing SAM models to it) on small timm VisionTransformerSAM encoders:
zero sparsity is timm's model; with pruning, forward, forward_intermediates, the neck and
features_only match a reference written with timm's own blocks (a pruned block's output is
timm's block output on its kept windows and its input elsewhere, ranked on its run's input),
as do gradients; hooks see true activations; query-pruned global blocks; set_sparsity,
LatencyTable, training steps, saving and bad input."""
import copy
import io
import math
import pickle

import pytest
import timm
import torch
from timm.models.vision_transformer_sam import Block, VisionTransformerSAM

import sparse_ops
from sparse_ops import patch, reference
from sparse_ops.nn import SparseSamBlock, SparseVisionTransformerSAM
from sparse_ops.search import LatencyTable, evolutionary_search
from sparse_ops.train import dense_sparse_step, sample_swin_ratios

# 16x16 tokens: windows of 5 need padding (4x4 windows of a 20x20 frame); 120 px: 15x15, no padding
SAM = dict(img_size=128, patch_size=8, embed_dim=32, depth=6, num_heads=2, window_size=5, global_attn_indexes=(2, 5),
           use_rel_pos=True, neck_chans=16, num_classes=0)
SIZES = {"128-padded": 128, "120-exact": 120, "136x104": (136, 104)}
RATIOS = [0.5, 0.7, 0.0, 0.3, 0.3, 0.0]


def make_sam(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    net = VisionTransformerSAM(**{**SAM, **kw})
    for name, p in net.named_parameters():  # timm zero-inits the rel-pos tables and pos_embed: no test could fail
        if "rel_pos" in name or "pos_embed" in name:
            torch.nn.init.normal_(p, std=0.5)
    return net.to(dtype).eval()


def images(size=128, batch=2, dtype=torch.float32):
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1)).to(dtype)


def reference_blocks(net, x, ratios, query_pruned=False):
    """timm's blocks on the whole map; a pruned block's output then kept only on its kept
    windows (reference.pruned_block_output), ranked on its run's input (a run: consecutive
    windowed blocks; a query-pruned global block ranks its own input). -> every block's output."""
    ws = max(blk.window_size for blk in net.blocks)
    t = net.patch_embed(x)
    if net.pos_embed is not None:
        t = t + timm.layers.resample_abs_pos_embed_nhwc(net.pos_embed, t.shape[1:3])
    t = net.norm_pre(t)
    outputs, run_input = [], None
    for i, (blk, ratio) in enumerate(zip(net.blocks, ratios)):
        if blk.window_size and (i == 0 or not net.blocks[i - 1].window_size):
            run_input = t
        out = Block.forward(blk, t)  # Block.forward: hooks see only the model under test
        if ratio > 0:
            ranked_on = run_input if blk.window_size else t
            assert blk.window_size or query_pruned
            out = reference.pruned_block_output(t, out, ranked_on, ws, 0, ratio)
        outputs.append(out)
        t = out
    return outputs


def neck(net, t):
    return net.neck(t.permute(0, 3, 1, 2))


# ----------------------------------------------------------------------- zero sparsity
@pytest.mark.parametrize("size", SIZES.values(), ids=list(SIZES))
def test_zero_sparsity_is_timm(size):
    net = make_sam()
    x = images(size)
    ours = patch.vit(copy.deepcopy(net))
    assert type(ours) is SparseVisionTransformerSAM and all(type(b) is SparseSamBlock for b in ours.blocks)
    assert list(ours.state_dict()) == list(net.state_dict())
    with torch.no_grad():
        assert torch.equal(ours(x), net(x))
        final, inter = ours.forward_intermediates(x)
        final_t, inter_t = net.forward_intermediates(x)
        assert torch.equal(final, final_t) and all(torch.equal(a, b) for a, b in zip(inter, inter_t))
        sparse_ops.set_sparsity(ours, ratios=0.5)
        sparse_ops.set_sparsity(ours, ratios=0.0)
        assert torch.equal(ours.forward_features(x), net.forward_features(x))


# --------------------------------------------------------------------------- pruned
@pytest.mark.parametrize("size", SIZES.values(), ids=list(SIZES))
def test_pruned_matches_reference(size):
    net = make_sam()
    x = images(size)
    ours = patch.sam(copy.deepcopy(net), ratios=RATIOS)
    with torch.no_grad():
        expected = reference_blocks(net, x, RATIOS)
        assert (ours.forward_features(x) - neck(net, expected[-1])).abs().max() < 1e-4
        final, inter = ours.forward_intermediates(x, indices=[0, 1, 3, 5])
        for got, i in zip(inter, [0, 1, 3, 5]):
            assert got.shape == (2, 32, *expected[i].shape[1:3])
            assert (got - expected[i].permute(0, 3, 1, 2)).abs().max() < 1e-4
        normed = ours.forward_intermediates(x, indices=2, norm=True, intermediates_only=True)
        assert (normed[-1] - neck(net, expected[5])).abs().max() < 1e-4
        early = ours.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert (early[0] - expected[1].permute(0, 3, 1, 2)).abs().max() < 1e-4
        # pruning changed something, and pruned windows kept their input
        dense = reference_blocks(net, x, [0.0] * 6)
        assert (expected[-1] - dense[-1]).abs().max() > 1e-2


def test_run_ranks_on_its_input_past_a_dense_block():
    """A run whose first block keeps every window: the second still keeps the windows ranked
    on the run's input (the first block's), not on its own."""
    net = make_sam()
    x = images()
    ratios = [0.0, 0.5, 0.0, 0.0, 0.7, 0.0]
    ours = patch.sam(copy.deepcopy(net), ratios=ratios)
    with torch.no_grad():
        expected = reference_blocks(net, x, ratios)
        assert (ours.forward_features(x) - neck(net, expected[-1])).abs().max() < 1e-4


def test_ratio_one_float_prunes_windowed_blocks_only():
    net = make_sam()
    ours = patch.sam(copy.deepcopy(net), ratios=0.4)
    assert [b.sparsity for b in ours.blocks] == [0.4, 0.4, 0.0, 0.4, 0.4, 0.0]
    x = images()
    with torch.no_grad():
        expected = neck(net, reference_blocks(net, x, [0.4, 0.4, 0.0, 0.4, 0.4, 0.0])[-1])
        assert (ours.forward_features(x) - expected).abs().max() < 1e-4


def count_attention_rows(net):
    """A list that collects how many rows each block's attention projection computes."""
    rows = []
    for blk in net.blocks:
        blk.attn.proj.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    return rows


def test_pruned_blocks_compute_kept_windows_only():
    ours = patch.sam(make_sam(), ratios=[0.5, 0.75, 0.0, 0.0, 0.25, 0.0])
    rows = count_attention_rows(ours)
    with torch.no_grad():
        ours(images(120, batch=1))
    # 9 windows of 25 tokens (15x15 map); a dense block: all 225
    assert rows == [5 * 25, 3 * 25, 225, 225, 7 * 25, 225]
    # a padded frame (16x16 tokens, 16 windows): proj and MLP on the kept windows' real tokens only
    rows.clear()
    sparse_ops.set_sparsity(ours, ratios=[0.25, 0.0, 0.0, 0.0, 0.0, 0.0])
    x = images(batch=1)
    with torch.no_grad():
        ours(x)
        t = ours.patch_embed(x) + ours.pos_embed
        kept = reference.window_scores(t, 5, 0).topk(12, dim=1).indices  # 9 windows are whole: 3 or more are not
    real = (reference.window_rows(kept, 16, 16, 5, 0) >= 0).sum().item()
    assert rows[0] == real < 12 * 25


def test_query_pruned_global_blocks():
    net = make_sam()
    x = images()
    ratios = [0.5, 0.5, 0.5, 0.3, 0.3, 0.6]
    ours = patch.sam(copy.deepcopy(net), ratios=ratios, query_pruned_global=True)
    with torch.no_grad():
        expected = reference_blocks(net, x, ratios, query_pruned=True)
        assert (ours.forward_features(x) - neck(net, expected[-1])).abs().max() < 1e-4
        rows = count_attention_rows(ours)
        ours(images(120))
    assert rows[2] == 2 * 5 * 25 and rows[5] == 2 * 4 * 25  # queries: the kept windows' tokens
    with pytest.raises(ValueError, match="global block"):
        patch.sam(copy.deepcopy(net), ratios=ratios)


def test_gradients_match_reference():
    net = make_sam(torch.float64)
    net.train()
    ours = patch.sam(copy.deepcopy(net), ratios=RATIOS)
    x = images(dtype=torch.float64)
    weight = torch.randn(2, 16, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (ours.forward_features(x) * weight).sum().backward()
    (neck(net, reference_blocks(net, x, RATIOS)[-1]) * weight).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), net.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert torch.allclose(p.grad, q.grad, atol=1e-8, rtol=1e-6), name


def test_hooks_see_true_activations():
    ours = patch.sam(make_sam(), ratios=RATIOS)
    x = images()
    seen = []
    for blk in ours.blocks:
        blk.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), args[0], out.clone(), out)))
    with torch.no_grad():
        final = ours.forward_intermediates(x, intermediates_only=True)
    for (inp_copy, inp, out_copy, out), nxt in zip(seen, seen[1:] + [None]):
        assert torch.equal(inp, inp_copy) and torch.equal(out, out_copy)  # nobody wrote into them later
        if nxt is not None:
            assert torch.equal(nxt[0], out)
    assert torch.equal(final[-1], seen[-1][3].permute(0, 3, 1, 2))


def test_features_only():
    torch.manual_seed(0)
    feats = timm.create_model("samvit_base_patch16", pretrained=False, features_only=True, out_indices=(1, 3, 5),
                              **{k: v for k, v in SAM.items() if k != "num_classes"}).eval()
    for name, p in feats.named_parameters():
        if "rel_pos" in name or "pos_embed" in name:
            torch.nn.init.normal_(p, std=0.5)
    net = copy.deepcopy(feats.model)
    x = images()
    with torch.no_grad():
        dense = feats(x)
        patch.vit(feats)
        assert all(torch.equal(a, b) for a, b in zip(feats(x), dense))
        sparse_ops.set_sparsity(feats, ratios=RATIOS)
        got = feats(x)
        expected = reference_blocks(net, x, RATIOS)
    assert len(got) == 3
    for g, i in zip(got, (1, 3, 5)):
        assert (g - expected[i].permute(0, 3, 1, 2)).abs().max() < 1e-4


def test_rope_windows():
    net = make_sam(use_rel_pos=False, use_rope=True, use_abs_pos=False)
    x = images()
    ours = patch.sam(copy.deepcopy(net), ratios=[0.5, 0.5, 0.5, 0.3, 0.3, 0.5], query_pruned_global=True)
    with torch.no_grad():
        assert torch.equal(patch.sam(copy.deepcopy(net)).forward_features(x), net.forward_features(x))
        expected = reference_blocks(net, x, [0.5, 0.5, 0.5, 0.3, 0.3, 0.5], query_pruned=True)
        assert (ours.forward_features(x) - neck(net, expected[-1])).abs().max() < 1e-4


def test_layerscale_and_qk_norm():
    net = make_sam(init_values=0.5, qk_norm=True)
    x = images()
    ours = patch.sam(copy.deepcopy(net), ratios=RATIOS)
    with torch.no_grad():
        expected = reference_blocks(net, x, RATIOS)
        assert (ours.forward_features(x) - neck(net, expected[-1])).abs().max() < 1e-4


def test_samvit_base_1024():
    """timm's samvit_base_patch16 at its own 1024x1024 (64x64 tokens, 14x14 windows on a padded
    70x70 frame), three blocks: zero sparsity is timm's, pruned blocks match the reference."""
    torch.manual_seed(0)
    net = timm.create_model("samvit_base_patch16", pretrained=False, depth=3, global_attn_indexes=(2,)).eval()
    for name, p in net.named_parameters():
        if "rel_pos" in name:
            torch.nn.init.normal_(p, std=0.1)
    x = images(1024, batch=1)
    ours = patch.vit(copy.deepcopy(net), ratios=[0.5, 0.7, 0.0])
    with torch.no_grad():
        expected = reference_blocks(net, x, [0.5, 0.7, 0.0])
        assert (ours.forward_features(x) - neck(net, expected[-1])).abs().max() < 1e-3
        sparse_ops.set_sparsity(ours, ratios=0.0)
        assert torch.equal(ours.forward_features(x), net.forward_features(x))


# ----------------------------------------------------------------- training and tools
def test_dense_sparse_step_trains():
    torch.manual_seed(0)
    net = patch.sam(make_sam(num_classes=5, neck_chans=16))
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = images(batch=4), torch.tensor([0, 1, 2, 3])
    ratios = sample_swin_ratios(net, generator=torch.Generator().manual_seed(0))
    assert [r for r, b in zip(ratios, net.blocks) if not b.window_size] == [0.0, 0.0]
    before = [p.detach().clone() for p in net.parameters()]
    losses = [dense_sparse_step(net, x, y, dict(ratios=[0.5, 0.5, 0.0, 0.5, 0.5, 0.0]), optimizer=opt).total
              for _ in range(5)]
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, p) for a, p in zip(before, net.parameters()) if p.requires_grad)
    assert [b.sparsity for b in net.blocks] == [0.0] * 6  # restored


def test_latency_table_and_search():
    ours = patch.sam(make_sam(), ratios=0.0)
    table = LatencyTable(ours, images(batch=1), choices=(0.0, 0.5), repeats=1, warmup=0)
    assert [sorted(row) for row in table.table] == [[0.0, 0.5], [0.0, 0.5], [0.0], [0.0, 0.5], [0.0, 0.5], [0.0]]
    assert table([0.5, 0.5, 0.0, 0.5, 0.5, 0.0]) > 0
    with pytest.raises(ValueError, match="choices"):
        table([0.5, 0.5, 0.5, 0.5, 0.5, 0.0])
    # the search over the windowed blocks' ratios (the global blocks' space: 0 only)
    space = [[0.0] if not blk.window_size else [0.0, 0.5] for blk in ours.blocks]
    result = evolutionary_search(space, lambda c: -sum(c), table, (0.0, math.inf), population=4, parents=2,
                                 crossover=1, mutations=1, iterations=2, progress=False)
    best = result.best[0].config
    assert len(best) == 6 and best[2] == best[5] == 0.0 and result.best[0].latency == table(best)
    sparse_ops.set_sparsity(ours, ratios=list(best))


def test_saving_round_trips():
    ours = patch.sam(make_sam(), ratios=RATIOS)
    x = images()
    with torch.no_grad():
        expected = ours(x)
        buffer = io.BytesIO()
        torch.save(ours, buffer)
        buffer.seek(0)
        for copy_ in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
            assert [b.sparsity for b in copy_.blocks] == RATIOS
            assert torch.equal(copy_(x), expected)
        fresh = make_sam()
        fresh.load_state_dict(ours.state_dict())
        assert torch.equal(patch.sam(fresh, ratios=RATIOS)(x), expected)


def test_autocast_bfloat16():
    net = make_sam()
    ours = patch.sam(copy.deepcopy(net), ratios=RATIOS)
    x = images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, timm_out = ours.forward_features(x), net.forward_features(x)
    with torch.no_grad():
        full = ours.forward_features(x)
    assert out.dtype == timm_out.dtype and torch.isfinite(out).all()
    assert (out - full).abs().max() < 0.1 * full.abs().max()


# ------------------------------------------------------------------------- bad input
def test_bad_input():
    net = make_sam()
    with pytest.raises(ValueError, match="ratios must be in"):
        patch.sam(copy.deepcopy(net), ratios=1.0)
    with pytest.raises(ValueError, match="one per block"):
        patch.sam(copy.deepcopy(net), ratios=[0.5, 0.5])
    with pytest.raises(ValueError, match="prunes windows"):
        patch.vit(copy.deepcopy(net), keep_rate=0.5)
    with pytest.raises(TypeError, match="VisionTransformerSAM"):
        patch.sam(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1))
    with pytest.raises(ValueError, match="ratios is for window pruning"):
        patch.vit(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1), ratios=0.5)
    dropped = copy.deepcopy(net)
    dropped.blocks[3].attn.attn_drop.p = 0.1
    with pytest.raises(ValueError, match=r"model.blocks\[3\].attn has attention dropout"):
        patch.sam(dropped)
    assert type(dropped) is VisionTransformerSAM and type(dropped.blocks[0]) is Block  # left as it was
    ours = patch.sam(copy.deepcopy(net))
    with pytest.raises(ValueError, match="keep_rate and mass are for token pruning"):
        sparse_ops.set_sparsity(ours, keep_rate=0.5)
    with pytest.raises(ValueError, match="global block"):
        sparse_ops.set_sparsity(ours, ratios=[0.5] * 6)
    assert [b.sparsity for b in ours.blocks] == [0.0] * 6
