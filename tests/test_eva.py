"""patch.eva / sparse_ops.nn.eva on tiny timm Eva models (EVA-02: rotary position embeddings,
SwiGLU, q/k norms, LayerScale with weights that matter): zero sparsity is timm's model; a
pruned block is timm's EvaBlock on the kept tokens with their own rope rows; a pruned model
(outputs and gradients) is a per-image loop of timm's blocks on the kept tokens; timm's
full-grid outputs, set_sparsity, torch.compile and unsupported variants."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models._features import FeatureGetterNet
from timm.models.eva import Eva, EvaBlock

import sparse_ops
from sparse_ops import patch, select_tokens
from sparse_ops.nn import SparseEva, Tokens
from sparse_ops.nn.eva import rope_rows

EVA = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
EVAS = {  # name -> (Eva arguments, input sizes)
    "eva02-avg": (dict(use_rot_pos_emb=True, swiglu_mlp=True, init_values=0.1, ref_feat_shape=4), [(32, 32)]),
    "qknorm-token-unfused-scalenorms": (dict(use_rot_pos_emb=True, swiglu_mlp=True, scale_mlp=True, qk_norm=True,
                                             scale_attn_inner=True, qkv_fused=False, global_pool="token",
                                             init_values=0.1, rope_rotate_half=True), [(32, 32)]),
    "registers-dynamic-gelu": (dict(use_rot_pos_emb=True, num_reg_tokens=2, dynamic_img_size=True, init_values=0.1,
                                    no_embed_class=True), [(32, 32), (40, 24)]),
    "dinov3-rope": (dict(use_rot_pos_emb=True, rope_type="dinov3", num_reg_tokens=1, swiglu_mlp=True,
                         init_values=0.1, use_abs_pos_emb=False), [(32, 32)]),
    "no-rope": (dict(swiglu_mlp=True, global_pool="token"), [(32, 32)]),
    # as timm's vit_*_rope_reg1_gap_*: ranked by the attention each token receives
    "no-class-token-register-avg": (dict(use_rot_pos_emb=True, class_token=False, num_reg_tokens=1,
                                         swiglu_mlp=True, init_values=0.1), [(32, 32)]),
}
LAYERS = (1, 3)


def make(name, **kw):
    torch.manual_seed(0)
    net = Eva(**{**EVA, **EVAS[name][0], **kw}).eval()
    with torch.no_grad():  # LayerScale starts at init_values: give it weights that matter
        for pname, p in net.named_parameters():
            if "gamma" in pname or "bias" in pname:
                p.copy_(torch.randn_like(p) * 0.5)
    return net


def images(size, batch=2):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


# -------------------------------------------------------------------------- references
def timm_qk(blk, x, rope):
    """q, k [B, H, N, D] of timm's EvaAttention in blk on x, after q/k norm and rope."""
    attn, (B, N, _) = blk.attn, x.shape
    h = blk.norm1(x)
    if attn.qkv is not None:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, _ = F.linear(h, attn.qkv.weight, bias).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    else:
        q, k = (p(h).reshape(B, N, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj))
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        P = attn.num_prefix_tokens
        q, k = (torch.cat([z[:, :, :P], apply_rot_embed_cat(z[:, :, P:], rope, half=attn.rotate_half)], 2)
                for z in (q, k))
    return q, k


def token_scores(blk, x, rope, class_token=True):
    """[B, N] in timm's EvaBlock blk: the class token's softmax attention row, mean over heads;
    without a class token the attention each token receives, mean over queries and heads."""
    q, k = timm_qk(blk, x, rope)
    if class_token:
        return ((q[:, :, :1] * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0]
    return ((q * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(2).mean(1)


def reference_eva(net, x, layers, **mode):
    """Image by image, timm's blocks on the kept tokens, each with its own rope row: before
    each prune layer, the tokens with the most class attention in the previous block."""
    P, outs = net.num_prefix_tokens, []
    for image in x:
        t, rope = net._pos_embed(net.patch_embed(image[None]))
        t, position = net.norm_pre(t), torch.arange(t.shape[1])  # each token's place in the grid
        scores = None
        for i, blk in enumerate(net.blocks):
            if i in layers:
                keep = select_tokens(scores, keep_prefix=P, **mode).index
                t, position = t[:, keep], position[keep]
            r = None if rope is None else rope[position[P:] - P]
            if i + 1 in layers:
                scores = token_scores(blk, t, r, net.cls_token is not None)
            t = EvaBlock.forward(blk, t, rope=r)
        outs.append(net.forward_head(net.norm(t)))
    return torch.cat(outs)


# ----------------------------------------------------------------------- whole models
@pytest.mark.parametrize("name", EVAS)
def test_zero_sparsity_is_timm(name):
    net = make(name)
    ours = patch.eva(copy.deepcopy(net), prune_layers=LAYERS)
    assert type(ours) is SparseEva and list(ours.state_dict()) == list(net.state_dict())
    for size in EVAS[name][1]:
        x = images(size)
        assert (ours(x) - net(x)).abs().max() < 1e-5
        sparse_ops.set_sparsity(ours, keep_rate=0.5)
        sparse_ops.set_sparsity(ours, keep_rate=1.0)
        assert (ours(x) - net(x)).abs().max() < 1e-5
        # mass 1 runs every block on Tokens (the packed path) and keeps every token
        sparse_ops.set_sparsity(ours, mass=1.0)
        assert (ours(x) - net(x)).abs().max() < 1e-5
        sparse_ops.set_sparsity(ours, keep_rate=1.0)


@pytest.mark.parametrize("mode", [dict(keep_rate=0.5), dict(mass=0.7)], ids=["keep_rate", "mass"])
@pytest.mark.parametrize("name", EVAS)
def test_pruned_is_timm_blocks_on_the_kept_tokens_with_their_rope(name, mode):
    net = make(name)
    ours = patch.eva(copy.deepcopy(net), prune_layers=LAYERS, **mode)
    for size in EVAS[name][1]:
        x = images(size, batch=3)
        got, want = ours(x), reference_eva(net, x, LAYERS, **mode)
        assert (got - want).abs().max() < 1e-5
        got.square().sum().backward()
        want.square().sum().backward()
        for (pname, p), q in zip(ours.named_parameters(), net.parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=pname)
        ours.zero_grad(), net.zero_grad()


def test_kept_counts_follow_keep_rate_and_mass():
    ours = patch.eva(make("eva02-avg"), keep_rate=0.5, prune_layers=LAYERS)
    x = images((32, 32), batch=3)
    tokens = ours.forward_tokens(x)
    assert tokens.dense().shape[1] == 1 + 4  # 16 patches -> 8 -> 4
    sparse_ops.set_sparsity(ours, mass=0.5)
    counts = ours.forward_tokens(x).cu_seqlens.diff()
    assert (counts < 17).all() and tokens.seq_len is not None and ours.forward_tokens(x).seq_len is None
    sparse_ops.set_sparsity(ours, mass=0.99)
    assert (ours.forward_tokens(x).cu_seqlens.diff() >= counts).all()


def test_full_grid_outputs():
    """forward_features / forward_intermediates: timm's shapes; tokens pause where pruned;
    blocks before the first prune layer are timm's; forward_head(forward_features) is forward."""
    net = make("eva02-avg")
    ours = patch.eva(copy.deepcopy(net), keep_rate=0.5, prune_layers=(2,))
    x = images((32, 32))
    feats = ours.forward_features(x)
    assert feats.shape == net.forward_features(x).shape and feats.kept_tokens.sum(1).tolist() == [9, 9]
    torch.testing.assert_close(ours.forward_head(feats), ours(x))
    final, inter = ours.forward_intermediates(x, indices=[0, 1, 2, 3])
    t_final, t_inter = net.forward_intermediates(x, indices=[0, 1, 2, 3])
    assert [y.shape for y in inter] == [y.shape for y in t_inter] == [(2, 48, 4, 4)] * 4
    for i in (0, 1):
        torch.testing.assert_close(inter[i], t_inter[i])
    torch.testing.assert_close(final, feats)
    pruned = ~feats.kept_tokens[:, 1:].reshape(2, 4, 4)  # paused at block 1's output
    torch.testing.assert_close(inter[3].permute(0, 2, 3, 1)[pruned], inter[1].permute(0, 2, 3, 1)[pruned])
    prefix = ours.forward_intermediates(x, indices=2, return_prefix_tokens=True, output_fmt="NLC",
                                        intermediates_only=True)
    assert [(a.shape, b.shape) for a, b in prefix] == [((2, 16, 48), (2, 1, 48))] * 2
    wrapper = patch.vit(FeatureGetterNet(copy.deepcopy(net), out_indices=(1, 3)), keep_rate=0.5, prune_layers=(2,))
    features = wrapper(x)
    torch.testing.assert_close(features[1], inter[3])


# ----------------------------------------------------------------------- single blocks
@pytest.mark.parametrize("mode", [dict(keep_rate=0.5), dict(mass=0.6)], ids=["keep_rate", "mass"])
@pytest.mark.parametrize("name", ["qknorm-token-unfused-scalenorms", "registers-dynamic-gelu",
                                  "no-class-token-register-avg"])
def test_pruned_block_is_timm_block_on_the_gathered_tokens_and_rope(name, mode):
    """A prune-layer block that also emits the class attention for the next one: each image's
    rows are timm's EvaBlock on its kept tokens with their rope rows, and the emitted scores
    are that block's class row."""
    net = make(name)
    ours = patch.eva(copy.deepcopy(net), prune_layers=(1, 2), **mode)
    blk, dense = ours.blocks[1], net.blocks[1]
    assert blk.emit_cls_attn and blk.prunes
    P = net.num_prefix_tokens
    x, scores = torch.randn(3, P + 16, 48), torch.rand(3, P + 16)
    rope = net.rope.get_embed(shape=net.patch_embed.grid_size)  # the 4 x 4 grid's table
    out = blk(Tokens.from_dense(x, cls_attn=scores), rope=rope)
    kept = select_tokens(scores, keep_prefix=P, **mode)
    cu = kept.cu_seqlens.tolist()
    for b in range(3):
        keep = kept.index[cu[b]:cu[b + 1]] - b * x.shape[1]
        r = rope[keep[P:] - P]
        torch.testing.assert_close(out.x[cu[b]:cu[b + 1]], EvaBlock.forward(dense, x[b:b + 1, keep], rope=r)[0])
        want = token_scores(dense, x[b:b + 1, keep], r, net.cls_token is not None)[0]
        torch.testing.assert_close(out.cls_attn[cu[b]:cu[b + 1]], want)
    assert torch.equal(out.index, kept.index)


def test_package_token_gets_no_rotation():
    net = make("qknorm-token-unfused-scalenorms")
    ours = patch.eva(copy.deepcopy(net), keep_rate=0.5, prune_layers=(2,), package=True)
    x, scores = torch.randn(2, 17, 48), torch.rand(2, 17)
    rope = net.rope.get_embed()
    out = ours.blocks[2](Tokens.from_dense(x, cls_attn=scores), rope=rope)
    kept = select_tokens(scores, keep_rate=0.5)
    L = kept.max_seqlen
    for b in range(2):
        keep = kept.index[b * L:(b + 1) * L] - b * 17
        pruned = torch.ones(17, dtype=torch.bool).index_fill_(0, keep, False)
        w = scores[b] * pruned
        package = (w[:, None] * x[b]).sum(0) / w.sum()
        seq = torch.cat([x[b, keep], package[None]])[None]
        half = rope.shape[1] // 2
        identity = torch.cat([torch.zeros(1, half), torch.ones(1, half)], 1)  # sin 0, cos 1
        want = EvaBlock.forward(net.blocks[2], seq, rope=torch.cat([rope[keep[1:] - 1], identity]))[0]
        torch.testing.assert_close(out.x[b * (L + 1):(b + 1) * (L + 1)], want)
    assert out.index.tolist().count(-1) == 2
    assert ours(images((32, 32))).shape == (2, 10)


def test_rope_rows_follow_positions():
    rope = torch.randn(4, 6)  # 4 patches, P = 1: grid of 5 tokens per image
    positions = torch.tensor([0, 3, 5, 9, -1])
    rows = rope_rows(rope, positions, 1)
    identity = torch.tensor([0.0, 0, 0, 1, 1, 1])
    assert torch.equal(rows, torch.stack([identity, rope[2], identity, rope[3], identity]))
    per_image = torch.randn(2, 1, 4, 6)
    rows = rope_rows(per_image, positions, 1)
    assert torch.equal(rows, torch.stack([identity, per_image[0, 0, 2], identity, per_image[1, 0, 3], identity]))


# ---------------------------------------------------------------- density and compile
def test_set_sparsity_and_compile_at_a_fixed_rate():
    net = patch.eva(make("eva02-avg"), prune_layers=LAYERS)
    x = images((32, 32))
    lengths = {}
    for r in (1.0, 0.5, 0.25):
        sparse_ops.set_sparsity(net, keep_rate=r)
        lengths[r] = net.forward_tokens(x).dense().shape[1]
    assert lengths == {1.0: 17, 0.5: 5, 0.25: 2}
    small = patch.eva(make("eva02-avg", depth=2), keep_rate=0.5, prune_layers=(1,))  # compiles faster
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(small, fullgraph=True)(x), small(x))


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,error,match", [
    (dict(use_post_norm=True), TypeError, "EvaBlockPostNorm"),
    (dict(rope_type="mrope"), TypeError, "RotaryEmbeddingMRope"),
    (dict(attn_drop_rate=0.1), ValueError, "attention dropout"),
    (dict(global_pool="max"), ValueError, "global_pool 'token', 'avg' or ''"),
    (dict(class_token=False, global_pool="map"), ValueError, "global_pool 'token', 'avg' or ''"),
])
def test_unsupported_variants_are_refused_before_any_change(kw, error, match):
    net = make("eva02-avg", **kw)
    classes = [type(m) for m in net.modules()]
    with pytest.raises(error, match=match):
        patch.eva(net, keep_rate=0.5)
    assert [type(m) for m in net.modules()] == classes


def test_bad_arguments():
    net = make("eva02-avg")
    with pytest.raises(ValueError, match=r"prune_layers must be distinct block indices in \[1, 4\)"):
        patch.eva(net, keep_rate=0.5, prune_layers=[0])
    with pytest.raises(ValueError, match="package=True needs global_pool 'token'"):
        patch.eva(net, keep_rate=0.5, package=True)
    with pytest.raises(ValueError, match="keep_rate must be in"):
        patch.eva(net, keep_rate=0.0)
    assert type(net) is Eva and type(net.blocks[0]) is EvaBlock  # restored after the failed set_sparsity
    with pytest.raises(TypeError, match="patch.eva takes timm's Eva"):
        patch.eva(torch.nn.Linear(2, 2))
    patched = patch.vit(net, keep_rate=0.5)  # patch.vit hands an Eva to patch.eva
    assert type(patched) is SparseEva and patched.prune_layers == (1, 2, 3)
