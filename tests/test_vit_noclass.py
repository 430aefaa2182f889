"""patch.vit on ViTs without a class token (class_token=False, 'avg' or 'map' pooling, SigLIP's
attention-pool head), as tiny random-init timm configs. Without a class row, a token's score is
the attention it receives in the block before the prune layer (mean over its image's queries
and the heads), computed from the same softmax as that block's output: checked against the
plain softmax reference.received_attention, and whole pruned models against a per-image loop
of timm's own blocks on the tokens that rule keeps."""
import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import Block

from sparse_ops import patch, reference, select_tokens, set_sparsity
from sparse_ops.nn import Tokens
from sparse_ops.nn.vit import _received_attention
from test_patch import reference_vit
from test_vit_families import assert_zero_sparsity_is_timm, images, weights_that_matter

TINY = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5, dynamic_img_size=True)
MODELS = {  # name: (timm model, config); every one at the image sizes SIZES
    "avg": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg", init_values=0.5)),
    "siglip": ("vit_base_patch16_siglip_224", {}),
    "siglip-reg": ("vit_base_patch16_siglip_224", dict(reg_tokens=2, no_embed_class=True, init_values=0.5)),
}
SIZES = [(32, 32), (48, 32)]
LAYERS = (1, 3)
MODES = {"r0.5": dict(keep_rate=0.5), "m0.6": dict(mass=0.6)}


def make(name, dtype=torch.float32):
    model_name, config = MODELS[name]
    torch.manual_seed(0)
    net = weights_that_matter(timm.create_model(model_name, pretrained=False, img_size=32, **TINY, **config))
    with torch.no_grad():  # a query bias shared by all queries: some keys get much more attention
        for blk in net.blocks:  # than others (as in trained models), so mass keeps different counts
            blk.attn.qkv.bias[:32].add_(torch.randn(32) * 8)
    return net.to(dtype).eval()


def received_attention(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """[B, N]: per token, the attention it receives in timm block blk (reference.received_attention
    on the block's q, k, v)."""
    attn, (B, N, _) = blk.attn, x.shape
    q, k, v = attn.qkv(blk.norm1(x)).reshape(B * N, 3, attn.num_heads, -1).unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cu = torch.arange(B + 1, dtype=torch.int32) * N
    return reference.received_attention(q, k, v, cu, attn.scale)[1].view(B, N)


def reference_noclass(net, x, **mode):
    return reference_vit(net, x, LAYERS, token_scores=received_attention, **mode)


def test_models_have_what_they_claim():
    for name in MODELS:
        assert make(name).cls_token is None
    assert make("avg").global_pool == "avg" and make("siglip").global_pool == "map"
    assert type(make("siglip").attn_pool).__name__ == "AttentionPoolLatent"
    assert make("siglip-reg").num_prefix_tokens == 2 and hasattr(make("siglip-reg").blocks[0].ls1, "gamma")


# ------------------------------------------------------------------ the side output
def _random_qkv(lengths, dtype, heads=3, dim=8):
    g = torch.Generator().manual_seed(len(lengths))
    q, k, v = (torch.randn(sum(lengths), heads, dim, generator=g, dtype=dtype) * 2 for _ in range(3))
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("lengths", [[7, 7, 7], [5, 5, 1, 9, 9, 9, 3], [4]], ids=["equal", "unequal", "one"])
def test_received_attention_is_the_plain_softmax_reference(lengths, dtype, path):
    """Output, received attention and the output's gradients, packed as a pruned model packs
    them: through the Triton kernels (flash forward, then the second pass from its
    logsumexp), or in PyTorch (explicit probabilities, one run of equal lengths at a time)."""
    if path == "triton" and dtype == torch.float64:
        pytest.skip("float64 always takes the PyTorch path")
    q, k, v, cu = _random_qkv(lengths, dtype)
    equal = len(set(lengths)) == 1
    tokens = Tokens(q.new_empty(q.shape[0], 1), cu, max(lengths), len(lengths), lengths[0] if equal else None)
    leaves = [z.clone().requires_grad_() for z in (q, k, v)]
    out, received = _received_attention(*leaves, tokens, 0.3)
    high = [z.double().requires_grad_() for z in (q, k, v)]
    want_out, want_received = reference.received_attention(*high, cu, 0.3)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    assert received.dtype == dtype and not received.requires_grad
    torch.testing.assert_close(out.double(), want_out.detach(), **tol)
    torch.testing.assert_close(received.double(), want_received, **tol)
    grad = torch.randn_like(want_out)
    out.backward(grad.to(dtype))
    want_out.backward(grad)
    for got, want in zip(leaves, high):
        torch.testing.assert_close(got.grad.double(), want.grad, **tol)
    # each query row sums to 1, so an image's received attention sums to 1
    image = torch.repeat_interleave(torch.tensor(lengths))
    sums = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, image, received.double())
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_received_attention_op_registration(path):
    """The op: schema, fake implementation (torch.compile) and autograd, on both paths."""
    q, k, v, cu = (z.requires_grad_() if z.is_floating_point() else z
                   for z in _random_qkv([5, 5, 1, 9], torch.float32))
    torch.library.opcheck(torch.ops.sparse_ops.varlen_attention_received_fwd, (q, k, v, cu, 9, 0.3))


@pytest.mark.parametrize("name", MODELS)
def test_block_before_a_prune_layer_emits_received_attention(name):
    """Equal and unequal lengths (a packed batch after a mass-pruning block): the block's
    output is timm's Block per image, its scores are the reference's."""
    net = make(name)
    ours = patch.vit(copy.deepcopy(net), keep_rate=0.5, prune_layers=[2])
    blk = ours.blocks[1]
    assert blk.emit_cls_attn and blk.received_attention
    P = net.num_prefix_tokens
    x = torch.randn(3, P + 16, 32)
    equal = blk(Tokens.from_dense(x))
    torch.testing.assert_close(equal.dense(), Block.forward(net.blocks[1], x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(equal.cls_attn, received_attention(net.blocks[1], x).reshape(-1), atol=1e-6, rtol=1e-5)
    lengths = [P + 3, P + 16, P + 9]
    rows = torch.cat([torch.arange(n) + b * (P + 16) for b, n in enumerate(lengths)])
    cu = torch.tensor([0, *lengths]).cumsum(0).int()
    packed = blk(Tokens(x.reshape(-1, 32)[rows], cu, max(lengths), 3, None))
    for b, n in enumerate(lengths):
        own = slice(int(cu[b]), int(cu[b + 1]))
        image = x[b:b + 1, :n]
        torch.testing.assert_close(packed.x[own], Block.forward(net.blocks[1], image)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.cls_attn[own], received_attention(net.blocks[1], image)[0],
                                   atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------- whole models
@pytest.mark.parametrize("name", MODELS)
def test_zero_sparsity_is_timm(name):
    assert_zero_sparsity_is_timm(make(name), SIZES, prune_layers=LAYERS)


@pytest.mark.parametrize("mode", MODES.values(), ids=list(MODES))
@pytest.mark.parametrize("name", MODELS)
def test_pruned_is_timm_blocks_on_the_kept_tokens(name, mode):
    """float64 (the plain-PyTorch path), at both image sizes: outputs and every gradient."""
    net = make(name, torch.float64)
    ours = patch.vit(copy.deepcopy(net), prune_layers=LAYERS, **mode)
    for size in SIZES:
        x = images(size, 3, torch.float64)
        out, ref = ours(x), reference_noclass(net, x, **mode)
        torch.testing.assert_close(out, ref)
        ours.zero_grad()
        net.zero_grad()
        out.square().sum().backward()
        ref.square().sum().backward()
        for (param, a), b in zip(ours.named_parameters(), net.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=param)


def test_mass_keeps_different_counts_per_image():
    """The mass cases above run the packed (unequal lengths) path, not only equal batches."""
    ours = patch.vit(make("siglip"), mass=0.6, prune_layers=LAYERS)
    lengths = ours.forward_tokens(images(SIZES[0], 3)).cu_seqlens.diff()
    assert len(set(lengths.tolist())) > 1 and lengths.max() < 16


def test_kernels_match_the_torch_path_in_models(path):
    """float32 through the Triton kernels (interpreter) or plain PyTorch, against the float64
    reference; mass makes later blocks run on unequal lengths."""
    net = make("siglip-reg")
    x = images(SIZES[1], 3)
    for mode in MODES.values():
        with torch.no_grad():
            got = patch.vit(copy.deepcopy(net), prune_layers=LAYERS, **mode)(x)
            want = reference_noclass(copy.deepcopy(net).double(), x.double(), **mode)
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name,mode", [("avg", MODES["r0.5"]), ("siglip-reg", MODES["m0.6"])],
                         ids=["avg-r0.5", "siglip-reg-m0.6"])
def test_token_grids_keep_timms_contract(name, mode):
    """forward_features and forward_intermediates return timm's shapes; blocks before the first
    prune layer give timm's intermediates; forward_head(forward_features(x)) is forward(x)
    (the pool reads the kept tokens only)."""
    net = make(name)
    ours = patch.vit(copy.deepcopy(net), prune_layers=LAYERS, **mode)
    x = images(SIZES[1], 3)
    features = ours.forward_features(x)
    assert features.shape == net.forward_features(x).shape
    kept = features.kept_tokens
    assert kept[:, :net.num_prefix_tokens].all() and not kept.all()
    logits = ours(x)  # 'map' pools the packed rows, forward_head on the grid masks the pruned tokens
    torch.testing.assert_close(ours.forward_head(features), logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.forward_head(ours.forward_tokens(x)), logits, atol=1e-6, rtol=1e-5)
    got = ours.forward_intermediates(x, indices=[0, 2, 3], return_prefix_tokens=net.num_prefix_tokens > 0)
    want = net.forward_intermediates(x, indices=[0, 2, 3], return_prefix_tokens=net.num_prefix_tokens > 0)
    assert got[0].shape == want[0].shape
    flat = [torch.cat([z.flatten(1) for z in (i if isinstance(i, tuple) else (i,))], 1) for i in got[1]]
    ref = [torch.cat([z.flatten(1) for z in (i if isinstance(i, tuple) else (i,))], 1) for i in want[1]]
    assert [f.shape for f in flat] == [r.shape for r in ref]
    assert (flat[0] - ref[0]).abs().max() < 1e-5  # block 0: before any pruning


def test_set_sparsity_changes_density_on_the_same_weights():
    net = make("siglip-reg")
    ours = patch.vit(copy.deepcopy(net), prune_layers=[2])
    x = images(SIZES[0])
    lengths = {}
    for r in (1.0, 0.5, 0.25):
        set_sparsity(ours, keep_rate=r)
        lengths[r] = ours.forward_tokens(x).dense().shape[1]
    assert lengths == {1.0: 18, 0.5: 10, 0.25: 6}  # 2 register tokens + ceil(r * 16)
    set_sparsity(ours, mass=0.6)
    assert ours(x).shape == (2, 5)
    set_sparsity(ours, keep_rate=1.0)
    assert (ours(x) - net(x)).abs().max() < 1e-5


def test_compile_fixed_rate_without_graph_breaks():
    net = patch.vit(make("siglip"), keep_rate=0.5, prune_layers=LAYERS)
    x = images(SIZES[0])
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, fullgraph=True)(x), net(x))


def test_bad_input():
    with pytest.raises(ValueError, match="package=True needs global_pool 'token'"):
        patch.vit(make("siglip"), keep_rate=0.5, package=True)
    with pytest.raises(ValueError, match="package=True needs global_pool 'token'"):
        patch.vit(make("avg"), keep_rate=0.5, package=True)
    max_pool = timm.create_model("vit_tiny_patch16_224", img_size=32, class_token=False, global_pool="max",
                                 **{**TINY, "dynamic_img_size": False})
    with pytest.raises(ValueError, match="patch.vit supports global_pool 'token', 'avg', '' or 'map'"):
        patch.vit(max_pool, keep_rate=0.5)
    ours = patch.vit(make("siglip"), keep_rate=0.5)
    blk = ours.blocks[LAYERS[0]]
    with pytest.raises(ValueError, match="needs the token scores of the block before it"):
        blk(Tokens.from_dense(torch.randn(2, 17, 32)))
