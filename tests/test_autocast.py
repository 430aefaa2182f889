"""torch.autocast (CPU, bfloat16): every op computes in the dtypes the dense torch composition
would under autocast (GEMMs and attention in bf16, LayerNorm and statistics in float32, the
residual stream and row ops in their own dtype), and a patched model gives timm's output
dtype, runs its pruned blocks' GEMMs and attention on bf16 inputs, and trains."""
import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.eva import Eva

import sparse_ops
from sparse_ops import _packed_linear, fused, patch, reference
from sparse_ops.attention import varlen, window
from sparse_ops.layout import TokenIndex
from sparse_ops.nn import eva as nn_eva, swin as nn_swin, swinv2 as nn_swinv2, vit as nn_vit

LOW = torch.bfloat16


def autocast():
    return torch.autocast("cpu", dtype=LOW)


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def assert_bf16_close(out, expected, rel=2e-2):
    """Within bf16 rounding of the expected values' magnitude (a few ulps of 2**-8, summed
    over short dot products)."""
    err = (out.double() - expected.double()).abs().max().item()
    assert err <= rel * max(1.0, expected.double().abs().max().item()), err


def grads(tensors):
    return [t.grad for t in tensors]


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


# ------------------------------------------------------------------------------- ops
def assert_float32_grads_close(out, expected, ins, ref_ins):
    """Backward (outside autocast, as AMP training does) of out and of its float64 reference with
    one random gradient: the float32 leaves' gradients are float32, finite and within bf16
    tolerance."""
    g = randn(*out.shape, seed=9)
    out.backward(g.to(out.dtype))
    expected.backward(g.double())
    for got, want in zip(grads(ins), grads(ref_ins)):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert_bf16_close(got, want, rel=3e-2)


def test_gather_layernorm_linear(path):
    x, nw, nb, w, b = (randn(*s, seed=i) for i, s in enumerate([(13, 24), (24,), (24,), (20, 24), (20,)]))
    rows = torch.tensor([3, -1, 0, 12, 3, 7, -1, 5, 3])
    ins = leaves(x, nw, nb, w, b)
    with autocast():
        out = fused.gather_layernorm_linear(ins[0], rows, *ins[1:4], ins[4])
        dense = F.linear(F.layer_norm(x, (24,), nw, nb), w, b)  # the dense layers' dtype under autocast
    assert out.dtype == dense.dtype == LOW
    ref_ins = leaves(*(t.double() for t in (x, nw, nb, w, b)))
    expected = reference.gather_layernorm_linear(ref_ins[0], rows, *ref_ins[1:4], ref_ins[4])
    assert_bf16_close(out, expected)
    assert_float32_grads_close(out, expected, ins, ref_ins)


def test_gather_layernorm_linear_accepts_what_autocast_does(path):
    """bf16 activations into float32 LayerNorm and Linear parameters, as F.layer_norm and
    F.linear take them under autocast; without autocast that is a TypeError."""
    x, nw, nb, w = randn(6, 16).to(LOW), randn(16, seed=1), randn(16, seed=2), randn(8, 16, seed=3)
    with autocast():
        out = fused.gather_layernorm_linear(x, None, nw, nb, w)
    assert out.dtype == LOW
    assert_bf16_close(out, F.linear(F.layer_norm(x.double(), (16,), nw.double(), nb.double()), w.double()))
    with pytest.raises(TypeError, match="weight"):
        fused.gather_layernorm_linear(x, None, nw, nb, w)


def test_linear_residual_scatter(path):
    h, w, b, base, res = (randn(*s, seed=i) for i, s in enumerate([(6, 24), (16, 24), (16,), (10, 16), (6, 16)]))
    rows = torch.tensor([4, -1, 0, 9, 2, 7])
    ins = leaves(h, w, b, base, res)
    with autocast():
        out = fused.linear_residual_scatter(ins[0], ins[1], ins[2], ins[3], rows, residual=ins[4])
        dense = res + F.linear(h, w, b)  # timm's x + linear(h): the residual keeps float32
    assert out.dtype == dense.dtype == torch.float32
    ref_ins = leaves(*(t.double() for t in (h, w, b, base, res)))
    expected = reference.linear_residual_scatter(ref_ins[0], ref_ins[1], ref_ins[2], ref_ins[3], rows,
                                                 residual=ref_ins[4])
    assert_bf16_close(out, expected)
    # the GEMM ran in bf16: its error is bf16's, far above float32's
    assert (out.double() - expected).abs().max() > 1e-4
    assert_float32_grads_close(out, expected, ins, ref_ins)
    with autocast(), torch.no_grad():  # bf16 h into a float32 base, in place
        into = base.clone()
        assert fused.linear_residual_scatter(h.to(LOW), w, b, into, rows, inplace=True) is into
    assert_bf16_close(into, reference.linear_residual_scatter(h.double(), w.double(), b.double(), base.double(), rows))


def test_varlen_attention(path):
    cu = torch.tensor([0, 5, 5, 12, 15], dtype=torch.int32)
    q, k, v = (randn(15, 2, 16, seed=i) for i in range(3))
    ins = leaves(q, k, v)
    with autocast():
        out, cls_attn = sparse_ops.varlen_attention(*ins, cu, 7, return_cls_attn=True)
        dense = F.scaled_dot_product_attention(q[:5].transpose(0, 1), k[:5].transpose(0, 1), v[:5].transpose(0, 1))
    assert out.dtype == dense.dtype == LOW and cls_attn.dtype == torch.float32
    ref_ins = leaves(*(t.double() for t in (q, k, v)))
    expected, expected_cls = reference.varlen_attention(*ref_ins, cu, 7, return_cls_attn=True)
    assert_bf16_close(out, expected)
    assert_bf16_close(cls_attn, expected_cls)
    assert_float32_grads_close(out, expected, ins, ref_ins)


def test_window_attention(path):
    M, H, n, D = 5, 2, 9, 16
    q, k, v = (randn(M, H, n, D, seed=i) for i in range(3))
    bias, scale = randn(H, n, n, seed=3), torch.tensor([0.3, 0.2])
    mask = torch.where(randn(3, n, n, seed=4) > 1, -100.0, 0.0)
    ids = torch.tensor([0, 2, 1, 1, 0])
    ins = leaves(q, k, v, bias, scale)
    with autocast():
        out = sparse_ops.window_attention(*ins[:3], ids, bias=ins[3], mask=mask, scale=ins[4])
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=bias + mask[ids].unsqueeze(1))
    assert out.dtype == dense.dtype == LOW
    ref_ins = leaves(*(t.double() for t in (q, k, v, bias, scale)))
    expected = reference.window_attention(*ref_ins[:3], ids, bias=ref_ins[3], mask=mask.double(), scale=ref_ins[4])
    assert_bf16_close(out, expected)
    assert_float32_grads_close(out, expected, ins, ref_ins)


def _row_ops(dtype):
    """(name, thunk) of every row op on fresh inputs of dtype."""
    x, y, base = randn(2, 5, 6, 8, dtype=dtype), randn(3, 8, seed=1, dtype=dtype), randn(6, 8, seed=2, dtype=dtype)
    rows = torch.tensor([4, -1, 0])
    idx = TokenIndex.from_mask(torch.tensor([[1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 0, 1]], dtype=torch.bool))
    tokens = randn(2, 6, 8, seed=3, dtype=dtype)
    windows = torch.tensor([[3, 0], [1, 2]])
    packed = randn(4, 9, 8, seed=4, dtype=dtype)
    return {
        "gather_rows": lambda: sparse_ops.gather_rows(base, rows),
        "scatter_rows": lambda: sparse_ops.scatter_rows(y, rows, base),
        "scatter_add_rows": lambda: sparse_ops.scatter_add_rows(y, torch.tensor([4, 4, -1]), 6),
        "gather_tokens": lambda: sparse_ops.gather_tokens(tokens, idx),
        "scatter_tokens": lambda: sparse_ops.scatter_tokens(randn(idx.num_tokens, 8, dtype=dtype), idx, tokens),
        "package_tokens": lambda: sparse_ops.package_tokens(tokens, randn(2, 6, seed=5).abs(), idx),
        "window_scores": lambda: sparse_ops.window_scores(x, 3, 1),
        "gather_windows": lambda: sparse_ops.gather_windows(x, windows, 3, 1),
        "scatter_windows": lambda: sparse_ops.scatter_windows(packed, x, windows, 3, 1),
    }


@pytest.mark.parametrize("dtype", [torch.float32, LOW], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(_row_ops(torch.float32)))
def test_row_ops_keep_their_dtype(name, dtype):
    """Row ops are not cast: under autocast they give exactly what they give without."""
    op = _row_ops(dtype)[name]
    expected = op()
    with autocast():
        out = op()
    assert out.dtype == expected.dtype and torch.equal(out, expected)


def test_packed_linear_follows_autocast():
    """The blocks' plain Linears in CPU inference: autocast runs them in bf16 as F.linear, not
    on the float32 weight packed for oneDNN."""
    lin = torch.nn.Linear(24, 16)
    x = randn(5, 24)
    with torch.no_grad():
        assert _packed_linear.linear(x, lin.weight, lin.bias).dtype == torch.float32
        with autocast():
            out = _packed_linear.linear(x, lin.weight, lin.bias)
            assert out.dtype == LOW and torch.equal(out, F.linear(x, lin.weight, lin.bias))


# ---------------------------------------------------------------------------- models
def _vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=4, num_heads=2, num_classes=5, **kw)


def _eva():
    return Eva(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5, use_rot_pos_emb=True,
               swiglu_mlp=True, init_values=0.1, ref_feat_shape=4)


def _swin(**kw):
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=16,
                             depths=(2, 2), num_heads=(1, 2), window_size=7, num_classes=5, **kw)


def _swinv2(**kw):
    net = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=32, embed_dim=16, depths=(2, 2),
                            num_heads=(1, 2), window_size=4, num_classes=5, **kw)
    with torch.no_grad():  # timm starts the res-post-norms at 0: the blocks would add nothing
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
    return net


# name -> (dense model, its patched copy at zero sparsity, set_sparsity arguments that prune)
FAMILIES = {
    "vit": (_vit, patch.vit, dict(keep_rate=0.5)),
    "vit-mass": (_vit, functools.partial(patch.vit, prune_layers=(1, 3)), dict(mass=0.6)),  # varlen attention
    "eva": (_eva, functools.partial(patch.vit, prune_layers=(2,)), dict(keep_rate=0.5)),
    "swin": (_swin, patch.swin, dict(ratios=0.5)),
    "swinv2": (_swinv2, patch.swin, dict(ratios=0.5)),
    "swin-features": (functools.partial(_swin, features_only=True, out_indices=(0, 1)), patch.swin,
                      dict(ratios=0.5)),
}


def _models(name):
    make, patcher, sparsity = FAMILIES[name]
    torch.manual_seed(0)
    dense = make().eval()
    return dense, patcher(copy.deepcopy(dense)), sparsity


def _images(name):
    size = 56 if name.startswith("swin") and "v2" not in name else 32  # Swin v1: a 7x7 window grid
    return randn(2, 3, size, size)


def _outputs(out):
    return list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else [out]


# What the pruned blocks' GEMMs and attention run (the CPU's PyTorch paths the tests take),
# with the argument positions of their GEMM / attention inputs; the blocks' plain Linears
# (nn._common.linear, imported by each block module) by their output's dtype.
SPIED = {(fused, "_ln_linear_forward_torch"): (5,), (fused, "_linear_scatter_torch"): (0, 1),
         (varlen, "_forward_torch"): (0, 1, 2), (varlen, "_forward_received_torch"): (0, 1, 2),
         (window, "_forward_torch"): (0, 1, 2), (window, "_forward_autograd"): (0, 1, 2),
         **{(module, "linear"): () for module in (nn_vit, nn_eva, nn_swin, nn_swinv2)}}


@pytest.fixture
def seen(monkeypatch):
    """{function name: [(dtypes of its GEMM / attention inputs, dtype of its first output)]}
    for every call of the functions in SPIED."""
    calls = {}

    def spy(name, fn, positions):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out
            calls.setdefault(f"{fn.__module__}.{name}", []).append(([args[i].dtype for i in positions], getattr(first, "dtype", None)))
            return out
        return run

    for (module, name), positions in SPIED.items():
        monkeypatch.setattr(module, name, spy(name, getattr(module, name), positions))
    return calls


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_sparsity_is_timm_under_autocast(name):
    dense, ours, _ = _models(name)
    x = _images(name)
    with torch.no_grad(), autocast():
        expected, out = _outputs(dense(x)), _outputs(ours(x))
    for a, b in zip(out, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_bf16_close(a, b)


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_blocks_run_in_bf16(name, seen):
    dense, ours, sparsity = _models(name)
    sparse_ops.set_sparsity(ours, **sparsity)
    x = _images(name)
    with torch.no_grad():
        fp32 = _outputs(ours(x))
        seen.clear()
        with autocast():
            out, timm_out = _outputs(ours(x)), _outputs(dense(x))
    assert seen, "the pruned path did not run"
    for fn, calls in seen.items():
        for inputs, output in calls:
            assert all(d == LOW for d in inputs) and output in (LOW, None), (fn, inputs, output)  # None: in place
    for a, b, c in zip(out, timm_out, fp32, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_bf16_close(a, c, rel=5e-2)  # the same pruning as in float32, within bf16's error


@pytest.mark.parametrize("name", ["vit-mass", "eva", "swin", "swinv2"])
def test_training_step_under_autocast(name, seen):
    _, ours, sparsity = _models(name)
    sparse_ops.set_sparsity(ours, **sparsity)
    ours.train()
    with autocast():
        out = ours(_images(name))
    assert out.dtype == LOW
    out.float().square().mean().backward()
    assert any(calls for calls in seen.values())
    for pname, p in ours.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), pname
    pruned = ours.layers[0].blocks[0] if name.startswith("swin") else ours.blocks[-1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pruned.mlp.parameters())
