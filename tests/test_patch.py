"""sparse_ops.patch and sparse_ops.nn on small timm ViT and Swin models: zero sparsity is timm's
model; with pruning, whole models (outputs and gradients) match per-image reference loops
written with timm's own blocks, and single blocks match timm's block on the kept tokens or
windows; checkpoints, set_sparsity, torch.compile and bad input."""
import copy

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block

import sparse_ops
from sparse_ops import patch, reference, select_tokens
from sparse_ops.nn import Tokens
from sparse_ops.select import kept_count

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
VITS = {
    "cls": {},
    "registers-avg-layerscale": dict(reg_tokens=2, global_pool="avg", init_values=0.5),
    "no-cls-token": dict(class_token=False, global_pool="avg"),
}
SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7)
SWINS = {  # 72: an 18x18 first stage, not a multiple of the window; 88x56 is not square either
    "72": dict(img_size=72),
    "88x56": dict(img_size=(88, 56)),
}
SPARSEVIT = (0.6, 0.6, 0.0, 0.0, 0.2, 0.4, 0.5, 0.5)


def make_vit(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**VIT, **kw}).to(dtype).eval()


def make_swin(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **{**SWIN, **kw}).to(dtype).eval()


def images(net, batch=2, dtype=torch.float32):
    return torch.randn(batch, 3, *net.patch_embed.img_size, generator=torch.Generator().manual_seed(1)).to(dtype)


# -------------------------------------------------------------------------- references
def class_attention(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """[B, N]: the class token's softmax attention row in timm block blk, mean over heads."""
    attn, (B, N, _) = blk.attn, x.shape
    q, k, _ = attn.qkv(blk.norm1(x)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0]


def reference_vit(net, x, layers, token_scores=class_attention, **mode):
    """Image by image, timm's blocks on the kept tokens: before each prune layer, the tokens
    with the highest token_scores(block, tokens) [1, N] in the previous block (default: class
    attention)."""
    outs = []
    for image in x:
        t = net.norm_pre(net._pos_embed(net.patch_embed(image[None])))
        scores = None
        for i, blk in enumerate(net.blocks):
            if i in layers:
                t = t[:, select_tokens(scores, keep_prefix=net.num_prefix_tokens, **mode).index]
            if i + 1 in layers:
                scores = token_scores(blk, t)
            t = Block.forward(blk, t)
        outs.append(net.forward_head(net.norm(t)))
    return torch.cat(outs)


def swin_parts(net):
    """patch_embed and stages of a Swin (v1 or v2) or of a features_only wrapper's flat modules."""
    if hasattr(net, "layers"):
        return net.patch_embed, list(net.layers)
    return net.patch_embed, [module for name, module in net.items() if name.startswith("layers_")]


def per_image_swin_reference(net, x, ratios, block_forward=SwinTransformerBlock.forward):
    """Image by image, timm's blocks (block_forward: v1's or v2's) on every window, each pruned
    block's output then kept only on its kept windows (reference.pruned_block_output, ranked
    on its stage's input). Returns every block's input and output, and every stage's output,
    as lists over blocks and stages."""
    patch_embed, stages = swin_parts(net)
    per_image = []
    for image in x.split(1):
        t, r, inputs, outputs, stage_outputs = patch_embed(image), iter(ratios), [], [], []
        for stage in stages:
            t = stage.downsample.forward(t)  # .forward: hooks see only the model under test
            stage_input = t
            for blk in stage.blocks:
                out, ratio = block_forward(blk, t), next(r)
                if ratio > 0:
                    out = reference.pruned_block_output(t, out, stage_input, blk.window_size, blk.shift_size, ratio)
                inputs.append(t)
                outputs.append(out)
                t = out
            stage_outputs.append(t)
        per_image.append((inputs, outputs, stage_outputs))
    return [[torch.cat(images) for images in zip(*lists)] for lists in zip(*per_image)]


def reference_swin(net, x, ratios, block_forward=SwinTransformerBlock.forward):
    """The logits of per_image_swin_reference."""
    return net.forward_head(net.norm(per_image_swin_reference(net, x, ratios, block_forward)[2][-1]))


# ----------------------------------------------------------------------- zero sparsity
@pytest.mark.parametrize("config", VITS, ids=list(VITS))
def test_vit_zero_sparsity_is_timm(config):
    net = make_vit(**VITS[config])
    x = images(net)
    ours = patch.vit(copy.deepcopy(net))
    assert (ours(x) - net(x)).abs().max() < 1e-5
    assert list(ours.state_dict()) == list(net.state_dict())
    if net.cls_token is not None:
        sparse_ops.set_sparsity(ours, keep_rate=0.5)
        sparse_ops.set_sparsity(ours, keep_rate=1.0)
        assert (ours(x) - net(x)).abs().max() < 1e-5


@pytest.mark.parametrize("config", SWINS, ids=list(SWINS))
def test_swin_zero_sparsity_is_timm(config):
    net = make_swin(**SWINS[config])
    x = images(net)
    ours = patch.swin(copy.deepcopy(net))
    assert (ours(x) - net(x)).abs().max() < 1e-5
    assert list(ours.state_dict()) == list(net.state_dict())


def test_timm_checkpoints_load_into_patched_models():
    for make, apply in ((make_vit, lambda m: patch.vit(m, keep_rate=0.5)), (make_swin, lambda m: patch.swin(m, 0.5))):
        net = make()
        ours = apply(make())
        for p in ours.parameters():
            torch.nn.init.zeros_(p)
        ours.load_state_dict(net.state_dict(), strict=True)
        for a, b in zip(ours.parameters(), net.parameters()):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------- whole models
@pytest.mark.parametrize("mode", [dict(keep_rate=0.5), dict(keep_rate=0.7), dict(mass=0.7)], ids=["r0.5", "r0.7", "m0.7"])
@pytest.mark.parametrize("config,checkpointing", [("cls", False), ("registers-avg-layerscale", False), ("cls", True)],
                         ids=["cls", "registers-avg-layerscale", "cls-checkpointing"])
def test_vit_pruned_matches_reference_with_gradients(config, checkpointing, mode):
    """float64 (the plain-PyTorch path): outputs and every parameter's gradient."""
    net = make_vit(torch.float64, **VITS[config])
    ours = patch.vit(copy.deepcopy(net), prune_layers=[1, 3], **mode)
    ours.set_grad_checkpointing(checkpointing)
    x = images(net, 3, torch.float64)
    out, ref = ours(x), reference_vit(net, x, (1, 3), **mode)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("config,checkpointing", [("72", False), ("88x56", False), ("72", True)],
                         ids=["72", "88x56", "72-checkpointing"])
def test_swin_pruned_matches_reference_with_gradients(config, checkpointing):
    net = make_swin(torch.float64, **SWINS[config])
    ours = patch.swin(copy.deepcopy(net), ratios=SPARSEVIT)
    ours.set_grad_checkpointing(checkpointing)
    x = images(net, 2, torch.float64)
    out, ref = ours(x), reference_swin(net, x, SPARSEVIT)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_kernels_match_the_torch_path_in_models(path):
    """float32 through the Triton kernels (interpreter) or plain PyTorch: both against the
    float64 reference."""
    for net, ours, ref_fn in (
        (make_vit(), lambda n: patch.vit(n, keep_rate=0.5, prune_layers=[1, 3]),
         lambda n, x: reference_vit(n, x, (1, 3), keep_rate=0.5)),
        (make_swin(**SWINS["72"]), lambda n: patch.swin(n, ratios=SPARSEVIT), lambda n, x: reference_swin(n, x, SPARSEVIT)),
    ):
        x = images(net)
        with torch.no_grad():
            got = ours(copy.deepcopy(net))(x)
            want = ref_fn(copy.deepcopy(net).double(), x.double())
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


def test_mass_prunes_per_image_and_package_token():
    net = make_vit()
    x = images(net, 3)
    ours = patch.vit(copy.deepcopy(net), mass=0.6, prune_layers=[1, 2])
    tokens = Tokens.from_dense(ours.norm_pre(ours._pos_embed(ours.patch_embed(x))))
    for blk in ours.blocks:
        tokens = blk(tokens)
    lengths = tokens.cu_seqlens.diff()
    assert tokens.seq_len is None and lengths.max() < 17 and int(lengths.sum()) == tokens.x.shape[0]
    packaged = patch.vit(copy.deepcopy(net), keep_rate=0.5, prune_layers=[2], package=True)
    features = packaged.forward_tokens(x)
    assert features.dense().shape == (3, 1 + kept_count(0.5, 16) + 1, 32)  # class, kept, package
    assert (features.index.view(3, -1)[:, -1] == -1).all()  # the package token has no grid position
    assert packaged(x).shape == (3, net.num_classes)


# ----------------------------------------------------------------------- single blocks
def test_emitted_class_attention_is_varlen_attentions():
    """A block before a prune layer returns the class row's attention (on equal lengths
    computed beside SDPA; varlen batches take varlen_attention's side output)."""
    net = patch.vit(make_vit(), keep_rate=0.5, prune_layers=[2])
    blk = net.blocks[1]
    x = torch.randn(3, 17, 32)
    got = blk(Tokens.from_dense(x))
    with torch.no_grad():
        qkv = blk.attn.qkv(blk.norm1(x)).view(51, 3, blk.attn.num_heads, blk.attn.head_dim)
    cu = torch.arange(4, dtype=torch.int32) * 17
    _, want = reference.varlen_attention(*(z.double() for z in qkv.unbind(1)), cu, 17, return_cls_attn=True)
    torch.testing.assert_close(got.cls_attn.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.dense(), Block.forward(blk, x), atol=1e-5, rtol=1e-5)


def test_vit_block_on_kept_tokens_is_timm_block_on_the_shorter_sequence():
    net = make_vit()
    ours = patch.vit(copy.deepcopy(net), keep_rate=0.5, prune_layers=[2])
    x = torch.randn(2, 17, 32)
    scores = torch.rand(2, 17)
    out = ours.blocks[2](Tokens.from_dense(x, cls_attn=scores))
    kept = select_tokens(scores, keep_rate=0.5)
    expected = Block.forward(net.blocks[2], x.reshape(34, 32)[kept.index].view(2, -1, 32))
    torch.testing.assert_close(out.dense(), expected)
    assert out.cls_attn is None and ours.blocks[1](Tokens.from_dense(x)).cls_attn.shape == (34,)


def test_swin_block_prunes_windows():
    """Kept windows equal timm's block there; pruned windows are the input, bit for bit."""
    net = make_swin(**SWINS["72"])
    ours = patch.swin(copy.deepcopy(net), ratios=0.5)
    blk, dense = ours.layers[0].blocks[1], net.layers[0].blocks[1]
    x = torch.randn(2, 18, 18, 16)
    out, expected = blk(x), dense(x)
    kept = reference.window_scores(x, 7, 3).topk(kept_count(0.5, 9), dim=1).indices
    inside = reference.scatter_windows(x.new_ones(2 * 5, 49, 1), x.new_zeros(2, 18, 18, 1), kept, 7, 3)[..., 0].bool()
    torch.testing.assert_close(out[inside], expected[inside])
    assert torch.equal(out[~inside], x[~inside]) and 0.3 < inside.float().mean() < 0.8


def test_inference_writes_in_place_only_inside_a_stage():
    """A stage may overwrite the tensors it made, never its input."""
    net = make_swin(**SWINS["72"])
    ours = patch.swin(copy.deepcopy(net), ratios=0.5)
    x = torch.randn(2, 18, 18, 16)
    before = x.clone()
    with torch.no_grad():
        ours.layers[0](x)
    assert torch.equal(x, before)


# ---------------------------------------------------------------- density and compile
def test_set_sparsity_changes_density_on_the_same_weights():
    net = make_vit()
    ours = patch.vit(copy.deepcopy(net), prune_layers=[2])
    x = images(net)
    outs = {}
    for r in (1.0, 0.5, 0.25):
        sparse_ops.set_sparsity(ours, keep_rate=r)
        outs[r] = ours.forward_tokens(x).dense().shape[1]
    assert outs == {1.0: 17, 0.5: 9, 0.25: 5}
    swin = patch.swin(make_swin(**SWINS["72"]))
    sparse_ops.set_sparsity(swin, ratios=[0.5, 0.5, 0, 0])
    assert [b.sparsity for s in swin.layers for b in s.blocks] == [0.5] * 4 + [0.0] * 4  # per stage


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_compile_fixed_rate_without_graph_breaks(kind):
    if kind == "vit":
        net = patch.vit(make_vit(), keep_rate=0.5, prune_layers=[1, 3])
    else:
        net = patch.swin(make_swin(**SWINS["72"]), ratios=SPARSEVIT)
    x = images(net)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, fullgraph=True)(x), net(x))


# --------------------------------------------------------------------------- bad input
def test_bad_input():
    with pytest.raises(TypeError, match="model must be a timm VisionTransformer"):
        patch.vit(make_swin())
    with pytest.raises(TypeError, match="model must be a timm SwinTransformer"):
        patch.swin(make_vit())
    with pytest.raises(ValueError, match=r"prune_layers must be distinct block indices in \[1, 4\)"):
        patch.vit(make_vit(), keep_rate=0.5, prune_layers=[0])
    with pytest.raises(ValueError, match="keep_rate must be in"):
        patch.vit(make_vit(), keep_rate=0.0)
    with pytest.raises(ValueError, match="pass exactly one of keep_rate and mass"):
        patch.vit(make_vit(), keep_rate=0.5, mass=0.5)
    with pytest.raises(ValueError, match="ratios must be a float, one per stage"):
        patch.swin(make_swin(), ratios=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"ratios must be in \[0, 1\)"):
        patch.swin(make_swin(), ratios=1.0)
    with pytest.raises(TypeError, match="must be patched by sparse_ops.patch"):
        sparse_ops.set_sparsity(make_vit(), keep_rate=0.5)
    with pytest.raises(ValueError, match="ratios is for Swin models"):
        sparse_ops.set_sparsity(patch.vit(make_vit()), ratios=0.5)
