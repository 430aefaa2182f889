"""Batch 0 and zero selected rows (issue 18 item 2): every public op gives the reference's
result on the same empty input, forward and backward, in float32 on the CPU; patched ViT
and Swin classifiers give timm's (0, num_classes), with gradients.

Covered elsewhere and not repeated: the row primitives at R = 0 and T = 0 (test_rows),
varlen_attention with no sequences or empty ones (test_varlen_attention::test_empty),
window_attention over no windows (test_window_attention::test_empty), the fused GEMMs on
zero rows (test_fused, rows=()), the window ops keeping no window of a non-empty batch
(test_windows, keep="none"), the patched ViT's forward_features / forward_intermediates at
batch 0 (test_vit_api) and Swin backbones at batch 0 (test_swin_backbone)."""
import copy
import math

import pytest
import torch

import sparse_ops
from sparse_ops import TokenIndex, patch, reference
from test_patch import images, make_swin, make_vit

N, C, H, W, WS, SHIFT = 17, 8, 10, 9, 4, 2  # a 10x9 map: not a multiple of the window
NUM_WINDOWS = 9  # ceil(10 / 4) * ceil(9 / 4)


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + len(shape)))


def no_tokens(B):
    """B images of N tokens, none kept."""
    return TokenIndex.from_mask(torch.zeros(B, N, dtype=torch.bool))


def some_tokens(B):
    return TokenIndex.from_mask(torch.rand(B, N, generator=torch.Generator().manual_seed(2)) < 0.5)


def windows(B, K):
    return torch.stack([torch.randperm(NUM_WINDOWS)[:K] for _ in range(B)]) if B else torch.zeros(0, K, dtype=torch.long)


# op -> (selection kind, args(B, selection)): the op's positional arguments; the floating
# point tensors among them are differentiated.
CASES = {
    "gather_tokens": ("tokens", lambda B, idx: (randn(B, N, C), idx(B))),
    "scatter_tokens": ("tokens", lambda B, idx: (randn(idx(B).num_tokens, C), idx(B), randn(B, N, C))),
    "package_tokens": ("tokens", lambda B, idx: (randn(B, N, C), randn(B, N).abs(), idx(B))),
    "window_scores": ("windows", lambda B, K: (randn(B, H, W, C), WS, SHIFT)),
    "gather_windows": ("windows", lambda B, K: (randn(B, H, W, C), windows(B, K), WS, SHIFT)),
    "scatter_windows": ("windows", lambda B, K: (randn(B * K, WS * WS, C), randn(B, H, W, C), windows(B, K), WS, SHIFT)),
    "window_rows": ("windows", lambda B, K: (windows(B, K), H, W, WS, SHIFT)),
}
# batch 0 (with a selection that would keep something), and an empty selection of a
# non-empty batch where no other test runs the op's backward on it.
SELECTIONS = {
    "tokens": {"B0": (0, some_tokens), "B3-none": (3, no_tokens)},
    "windows": {"B0-K3": (0, 3), "B0-K0": (0, 0), "B2-K0": (2, 0)},
}


@pytest.mark.parametrize("name, selection", [(n, s) for n, (kind, _) in CASES.items() for s in SELECTIONS[kind]])
def test_op_matches_reference(name, selection):
    kind, make_args = CASES[name]
    args = make_args(*SELECTIONS[kind][selection])
    results = []
    for fn in (getattr(sparse_ops, name), getattr(reference, name)):
        inputs = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
        differentiated = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
        out = fn(*inputs)
        if out.requires_grad:  # the reference's empty result can be a constant (zero gradients)
            out.backward(randn(*out.shape))
        results.append((out, [torch.zeros_like(a) if a.grad is None else a.grad for a in differentiated]))
    (out, grads), (expected, expected_grads) = results
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert out.requires_grad == bool(grads)  # ours stays differentiable on empty input
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", [dict(keep_rate=0.5), dict(mass=0.7), dict(keep_rate=1.0, keep_prefix=0, min_keep=0)],
                         ids=["rate", "mass", "all-no-prefix"])
def test_select_tokens(mode):
    scores = randn(0, N).abs()
    idx, expected = sparse_ops.select_tokens(scores, **mode), reference.select_tokens(scores, **mode)
    assert idx.index.shape == (0,) and idx.index.dtype == torch.int64
    assert torch.equal(idx.cu_seqlens, expected.cu_seqlens) and idx.cu_seqlens.tolist() == [0]
    assert (idx.batch_size, idx.seq_len) == (0, N)
    if "mass" in mode:
        assert idx.max_seqlen == expected.max_seqlen == 0
    else:  # by rate every image keeps the same count, and max_seqlen is it even with no image
        # (the patched ViT uses it as the common length); the reference's per-image loop says 0
        prefix = mode.get("keep_prefix", 1)
        assert idx.max_seqlen == prefix + math.ceil(mode["keep_rate"] * (N - prefix))
    assert idx.keep_mask().shape == (0, N)


@pytest.mark.parametrize("num_keep", [3, 0])
def test_select_windows(num_keep):
    scores = sparse_ops.window_scores(randn(0, H, W, C), WS, SHIFT)
    assert scores.shape == (0, NUM_WINDOWS)
    ids = sparse_ops.select_windows(scores, num_keep)
    assert ids.shape == reference.select_windows(scores, num_keep).shape == (0, num_keep)
    assert ids.dtype == torch.int64


@pytest.mark.parametrize("with_rows", [False, True], ids=["dense", "rows"])
def test_fused_gemms_on_an_empty_batch(with_rows):
    """The fused prologue and epilogue on [0, C] activations (a batch of no images), with all
    rows (rows=None) or an empty row list."""
    rows = torch.zeros(0, dtype=torch.long) if with_rows else None
    x, w1, b1 = randn(0, C), randn(12, C), randn(12)
    nw, nb = 1 + 0.5 * randn(C), randn(C)
    w2, b2, base = randn(C, 12), randn(C), randn(0, C)
    results = []
    for ops in (sparse_ops, reference):
        tensors = [t.clone().requires_grad_() for t in (x, nw, nb, w1, b1, w2, b2, base)]
        tx, tnw, tnb, tw1, tb1, tw2, tb2, tbase = tensors
        h = ops.gather_layernorm_linear(tx, rows, tnw, tnb, tw1, tb1)
        out = ops.linear_residual_scatter(h, tw2, tb2, tbase, rows)
        assert h.shape == (0, 12) and out.shape == (0, C)
        (out.sum() + h.sum()).backward()
        results.append([t.grad for t in tensors])
    for grad, expected in zip(*results):
        assert grad is not None and expected is not None
        torch.testing.assert_close(grad, expected)  # zeros of each parameter's shape


def classify_empty_batch(net, ours):
    """ours gives (0, num_classes), as timm's net does (timm's Swin fails on an empty batch:
    its shape is read off one image), and a gradient of the input's shape."""
    with torch.no_grad():
        assert net(images(net, 1)).shape == (1, net.num_classes)
    x = images(net, 0).requires_grad_()
    out = ours(x)
    assert out.shape == (0, net.num_classes)
    out.sum().backward()
    assert x.grad.shape == x.shape
    # no image, no gradient: zeros, or None where a block skips the empty batch (Swin's do)
    assert all(p.grad is None or not p.grad.any() for p in ours.parameters())


@pytest.mark.parametrize("mode", [dict(keep_rate=0.5), dict(mass=0.7), dict(keep_rate=0.5, package=True)],
                         ids=["rate", "mass", "package"])
def test_patched_vit(mode):
    net = make_vit()
    classify_empty_batch(net, patch.vit(copy.deepcopy(net), prune_layers=(1, 3), **mode))


@pytest.mark.parametrize("ratios", [0.5, 0.0])
def test_patched_swin(ratios):
    net = make_swin(img_size=72)
    classify_empty_batch(net, patch.swin(copy.deepcopy(net), ratios=ratios))
