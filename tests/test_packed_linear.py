"""The Linears of pruned blocks in CPU inference run on weights packed once for oneDNN
(sparse_ops._packed_linear): the packed copy must give F.linear's result, follow every change
of its weight, and never be used where autograd records, under torch.compile, with oneDNN
turned off, or for tensors that are not model weights."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_ops import _packed_linear, patch
from test_patch import images, make_swin

pytestmark = pytest.mark.skipif(not _packed_linear._AVAILABLE, reason="torch built without oneDNN")


def layer(in_features=24, out_features=40, bias=True):
    return nn.Linear(in_features, out_features, bias=bias)


def reference(x, weight, bias, residual=None):
    out = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return (out if residual is None else out + residual.double()).float()


def is_packed(weight) -> bool:
    return weight in _packed_linear._packed


@pytest.mark.parametrize("rows", [0, 1, 49, 130])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_f_linear(rows, bias, with_residual):
    lin = layer(bias=bias)
    x = torch.randn(rows, 24)
    residual = torch.randn(rows, 40) if with_residual else None
    with torch.no_grad():
        out = _packed_linear.linear(x, lin.weight, lin.bias, residual)
    assert is_packed(lin.weight)
    torch.testing.assert_close(out, reference(x, lin.weight, lin.bias, residual), rtol=1e-5, atol=1e-5)


def test_non_contiguous_rows_and_inference_mode():
    lin = layer()
    x = torch.randn(24, 33).t()  # [33, 24], column stride 33
    with torch.inference_mode():
        first = _packed_linear.linear(x, lin.weight, lin.bias)
    with torch.no_grad():  # the copy packed in inference mode serves outside it
        second = _packed_linear.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(first, reference(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    residual = torch.randn(40, 33).t()  # a transposed residual, and rows with an inner stride
    with torch.no_grad():
        out = _packed_linear.linear(x, lin.weight, lin.bias, residual)
        rows = torch.randn(33, 48)[:, ::2]
        strided = _packed_linear.linear(rows, lin.weight, None)
    torch.testing.assert_close(out, reference(x, lin.weight, lin.bias, residual), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(strided, reference(rows, lin.weight, None), rtol=1e-5, atol=1e-5)


def test_follows_its_weight():
    lin = layer()
    x = torch.randn(7, 24)
    with torch.no_grad():
        before = _packed_linear.linear(x, lin.weight, lin.bias)
        lin.weight.add_(torch.randn_like(lin.weight))  # in place: the version counter moves
        changed = _packed_linear.linear(x, lin.weight, lin.bias)
        assert not torch.allclose(changed, before)
        torch.testing.assert_close(changed, reference(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.weight.data = torch.randn_like(lin.weight)  # the same Parameter on other memory
        moved = _packed_linear.linear(x, lin.weight, lin.bias)
        torch.testing.assert_close(moved, reference(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin.bias.add_(1.0)  # the bias is not packed: read at every call
        torch.testing.assert_close(_packed_linear.linear(x, lin.weight, lin.bias), moved + 1.0, rtol=1e-5, atol=1e-5)


def test_entry_dies_with_its_weight():
    lin = layer()
    with torch.no_grad():
        _packed_linear.linear(torch.randn(3, 24), lin.weight, lin.bias)
    count = len(_packed_linear._packed)
    del lin
    assert len(_packed_linear._packed) == count - 1


def test_not_where_autograd_records():
    lin = layer()
    x, residual = torch.randn(5, 24, requires_grad=True), torch.randn(5, 40)
    _packed_linear.linear(x, lin.weight, lin.bias, residual).square().sum().backward()
    assert not is_packed(lin.weight)
    ref = [t.detach().clone().requires_grad_() for t in (x, lin.weight, lin.bias)]
    (F.linear(*ref) + residual).square().sum().backward()
    for got, want in zip((x, lin.weight, lin.bias), ref):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("case", ["plain tensor", "float64", "oneDNN off", "compiling"])
def test_falls_back(case, monkeypatch):
    lin = layer()
    weight, x = lin.weight, torch.randn(4, 24)
    if case == "plain tensor":  # e.g. the transposed weight a backward pass multiplies by
        weight = lin.weight.detach().clone()
    elif case == "float64":
        lin.double()
        weight, x = lin.weight, x.double()
    elif case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif case == "oneDNN off":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    with torch.no_grad():
        out = _packed_linear.linear(x, weight, lin.bias)
    assert not is_packed(lin.weight) and not is_packed(weight)
    torch.testing.assert_close(out, F.linear(x, weight, lin.bias), rtol=0, atol=0)


def test_pruned_block_packs_and_keeps_projection_hooks():
    """A pruned Swin block's Linears are packed in inference; a forward hook on its attention
    projection (a plain module call in timm) still sees that module's input and output."""
    model = patch.swin(make_swin(img_size=72), ratios=0.5).eval()
    block = model.layers[0].blocks[1]
    seen = []
    with torch.no_grad():
        model(images(model))
        assert all(is_packed(m.weight) for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2))
        handle = block.attn.proj.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
        model(images(model))
        handle.remove()
    assert len(seen) == 1
    x, out = seen[0]
    torch.testing.assert_close(out, F.linear(x, block.attn.proj.weight, block.attn.proj.bias))


VITS = {  # timm model name -> its arguments (tiny), input size
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2), 32),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=4,
                                                               num_heads=2), 32),
    "registers-layerscale": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=4,
                                                          num_heads=2, reg_tokens=2, init_values=0.5), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=4), 28),
    "eva02-unfused-qkv": ("eva02_tiny_patch14_224", dict(img_size=28, depth=4, qkv_fused=False), 28),
}


@pytest.mark.parametrize("grad", ["no_grad", "inference_mode", "grad"])
@pytest.mark.parametrize("name", sorted(VITS))
def test_intermediates_before_the_first_prune_layer_are_timms(name, grad):
    """Bit for bit: the block that emits the first token scores runs on the full grid with
    timm's Linears, not the packed ones (which round differently)."""
    import copy
    import timm

    model_name, kwargs, size = VITS[name]
    torch.manual_seed(0)
    net = timm.create_model(model_name, pretrained=False, **kwargs).eval()
    ours = patch.vit(copy.deepcopy(net), keep_rate=0.5, prune_layers=[3])
    x = torch.randn(2, 3, size, size)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[grad]
    with context():
        got = ours.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
        want = net.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"block {i}: {(a - b).abs().max()}"


def test_intermediates_without_a_class_token_are_timms_but_the_emitting_blocks_attention():
    """Without a class token the block before the first prune layer takes each token's received
    attention from explicit softmax probabilities, not SDPA's: its output is timm's to float32
    rounding (about 1e-7 relative), every block before it is timm's bit for bit."""
    import copy
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                            depth=4, num_heads=2, class_token=False, global_pool="avg").eval()
    ours = patch.vit(copy.deepcopy(net), keep_rate=0.5, prune_layers=[3])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = ours.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
        want = net.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-6 * want[2].abs().max().item())


def _dense_again_case(name):
    """-> (a timm model, its patch function, pruned settings, dense settings, input size)."""
    from test_eva import make as make_eva
    from test_swinv2 import make_swinv2

    vit, swin = (patch.vit, dict(keep_rate=0.5), dict(keep_rate=1.0)), (patch.swin, dict(ratios=0.5), dict(ratios=0.0))
    make, (patch_model, pruned, dense), size = {
        "vit": (make_vit_tiny, vit, 32),
        "vit-features": (lambda: make_vit_tiny(features_only=True, out_indices=(1, 3)), vit, 32),
        "eva": (lambda: make_eva("eva02-avg"), vit, 32),
        "swin": (lambda: make_swin(img_size=56), swin, 56),
        "swin-features": (lambda: make_swin(img_size=56, features_only=True, out_indices=(0, 1)), swin, 56),
        "swinv2": (lambda: make_swinv2(img_size=32), swin, 32),
    }[name]
    return make(), patch_model, pruned, dense, size


def make_vit_tiny(**kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=4, num_heads=2, **kw).eval()


@pytest.mark.parametrize("name", ["vit", "vit-features", "eva", "swin", "swin-features", "swinv2"])
def test_dense_again_is_timm_bit_for_bit(name):
    """set_sparsity back to no pruning (after a pruned inference, packed weights and caches
    filled): exactly timm's outputs, as the README says."""
    import copy

    import sparse_ops

    net, patch_model, pruned, dense, size = _dense_again_case(name)
    ours = patch_model(copy.deepcopy(net), **pruned)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours(x)
        sparse_ops.set_sparsity(ours, **dense)
        got, want = ours(x), net(x)
    for a, b in zip(*(out if isinstance(out, (list, tuple)) else [out] for out in (got, want))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pool", ["token", "avg", "map", "eva-avg"])
def test_forward_head_of_forward_features_is_forward_bit_for_bit(pool):
    from test_eva import make as make_eva

    if pool == "eva-avg":
        model = patch.vit(make_eva("eva02-avg"), keep_rate=0.5)
    else:
        model = patch.vit(make_vit_tiny(global_pool=pool, class_token=pool == "token"), keep_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x)), model(x))
