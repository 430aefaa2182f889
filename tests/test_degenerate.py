"""Degenerate inputs for every public op: zero scores, nothing pruned, everything pruned, a
single token, -inf masks, empty selections. Where an op's output is finite, so is its gradient
(an upstream gradient of ~100 finds an overflow to inf), and it equals the reference's where
that is finite; the selection ops (no gradient) give the reference's selection."""
import pytest
import torch

import sparse_ops
from sparse_ops import TokenIndex, reference

NEG_INF = float("-inf")


def _scores(*shape):
    return torch.rand(*shape) + 0.1


def _tokens(keep):
    return TokenIndex.from_mask(torch.tensor(keep, dtype=torch.bool))


def _window_mask(rows_all_masked=False):
    """[2, 4, 4]: window 0 unmasked, window 1 with keys 1.. masked by -inf for every query
    (and every key of query 2 where rows_all_masked)."""
    mask = torch.zeros(2, 4, 4)
    mask[1, :, 1:] = NEG_INF
    if rows_all_masked:
        mask[1, 2, :] = NEG_INF
    return mask


def _zero_window_image():
    """[1, 8, 8, 3] with one nonzero 4x4 window: three windows of zero score."""
    x = torch.zeros(1, 8, 8, 3)
    x[:, :4, :4] = torch.randn(4, 4, 3)
    return x


# name -> (op name, function of the differentiable inputs, the inputs). The same function runs
# on sparse_ops and on reference (the module is its first argument).
CASES = {
    "gather_rows all padding": ("gather_rows", lambda m, x: m.gather_rows(x, torch.tensor([-1, -1])),
                                lambda: [torch.randn(3, 4)]),
    "gather_rows empty": ("gather_rows", lambda m, x: m.gather_rows(x, torch.zeros(0, dtype=torch.long)),
                          lambda: [torch.randn(3, 4)]),
    "scatter_rows empty": ("scatter_rows", lambda m, y, b: m.scatter_rows(y, torch.zeros(0, dtype=torch.long), b),
                           lambda: [torch.randn(0, 4), torch.randn(3, 4)]),
    "scatter_rows all padding": ("scatter_rows", lambda m, y, b: m.scatter_rows(y, torch.tensor([-1, -1]), b),
                                 lambda: [torch.randn(2, 4), torch.randn(3, 4)]),
    "scatter_add_rows repeated and padding": ("scatter_add_rows",
                                              lambda m, y: m.scatter_add_rows(y, torch.tensor([1, 1, -1]), 3),
                                              lambda: [torch.randn(3, 4)]),
    "window_scores zero windows": ("window_scores", lambda m, x: m.window_scores(x, (4, 4), (0, 0)),
                                   lambda: [_zero_window_image()]),
    "window_scores zero image shifted": ("window_scores", lambda m, x: m.window_scores(x, (4, 4), (2, 2)),
                                         lambda: [torch.zeros(2, 8, 8, 3)]),
    "window_scores one token": ("window_scores", lambda m, x: m.window_scores(x, (7, 7), (0, 0)),
                                lambda: [torch.randn(1, 1, 1, 3)]),
    "gather_windows none": ("gather_windows",
                            lambda m, x: m.gather_windows(x, torch.zeros(2, 0, dtype=torch.long), (4, 4), (2, 2)),
                            lambda: [torch.randn(2, 8, 8, 3)]),
    "gather_windows one token": ("gather_windows", lambda m, x: m.gather_windows(x, torch.zeros(1, 1, dtype=torch.long),
                                                                                 (7, 7), (0, 0)),
                                 lambda: [torch.randn(1, 1, 1, 3)]),
    "scatter_windows none": ("scatter_windows",
                             lambda m, y, b: m.scatter_windows(y, b, torch.zeros(2, 0, dtype=torch.long), (4, 4), (2, 2)),
                             lambda: [torch.randn(0, 16, 3), torch.randn(2, 8, 8, 3)]),
    "scatter_windows one token": ("scatter_windows",
                                  lambda m, y, b: m.scatter_windows(y, b, torch.zeros(1, 1, dtype=torch.long), (7, 7), (0, 0)),
                                  lambda: [torch.randn(1, 49, 3), torch.randn(1, 1, 1, 3)]),
    "gather_tokens nothing kept": ("gather_tokens", lambda m, x: m.gather_tokens(x, _tokens([[0, 0, 0]] * 2)),
                                   lambda: [torch.randn(2, 3, 4)]),
    "scatter_tokens nothing kept": ("scatter_tokens",
                                    lambda m, y, b: m.scatter_tokens(y, _tokens([[0, 0, 0]] * 2), b),
                                    lambda: [torch.randn(0, 4), torch.randn(2, 3, 4)]),
    "scatter_tokens one token": ("scatter_tokens", lambda m, y, b: m.scatter_tokens(y, _tokens([[1]]), b),
                                 lambda: [torch.randn(1, 4), torch.randn(1, 1, 4)]),
    "package_tokens nothing pruned": ("package_tokens",
                                      lambda m, x, s: m.package_tokens(x, s, _tokens([[1, 1, 1], [1, 0, 1]])),
                                      lambda: [torch.randn(2, 3, 4) * 10, _scores(2, 3)]),
    "package_tokens zero scores": ("package_tokens",
                                   lambda m, x, s: m.package_tokens(x, s * torch.tensor([[1.0, 0, 0], [1, 1, 1]]),
                                                                    _tokens([[1, 0, 0], [1, 0, 0]])),
                                   lambda: [torch.randn(2, 3, 4) * 10, _scores(2, 3)]),
    "package_tokens everything pruned": ("package_tokens",
                                         lambda m, x, s: m.package_tokens(x, s, _tokens([[0, 0, 0], [1, 0, 0]])),
                                         lambda: [torch.randn(2, 3, 4) * 10, _scores(2, 3)]),
    "package_tokens one token": ("package_tokens", lambda m, x, s: m.package_tokens(x, s, _tokens([[1], [0]])),
                                 lambda: [torch.randn(2, 1, 4) * 10, _scores(2, 1)]),
}

# ops with Triton kernels: also run through them (the path fixture)
KERNEL_CASES = {
    "varlen_attention empty and one-token sequences": (
        "varlen_attention",
        lambda m, q, k, v: m.varlen_attention(q, k, v, torch.tensor([0, 0, 1, 5, 5], dtype=torch.int32), 4),
        lambda: [torch.randn(5, 2, 8) for _ in range(3)]),
    "varlen_attention no tokens": (
        "varlen_attention", lambda m, q, k, v: m.varlen_attention(q, k, v, torch.tensor([0, 0, 0], dtype=torch.int32), 0),
        lambda: [torch.randn(0, 2, 8) for _ in range(3)]),
    "varlen_attention equal logits": (
        "varlen_attention", lambda m, q, k, v: m.varlen_attention(q, k, v, torch.tensor([0, 4], dtype=torch.int32), 4),
        lambda: [torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), torch.randn(4, 2, 8)]),
    "window_attention -inf mask": (
        "window_attention",
        lambda m, q, k, v, b: m.window_attention(q, k, v, torch.tensor([0, 1, 1]), b, _window_mask()),
        lambda: [torch.randn(3, 2, 4, 8) for _ in range(3)] + [torch.randn(2, 4, 4)]),
    "window_attention a query with every key -inf": (
        "window_attention",
        lambda m, q, k, v, b: m.window_attention(q, k, v, torch.tensor([0, 1, 1]), b, _window_mask(True)),
        lambda: [torch.randn(3, 2, 4, 8) for _ in range(3)] + [torch.randn(2, 4, 4)]),
    "window_attention no windows": (
        "window_attention",
        lambda m, q, k, v, b: m.window_attention(q, k, v, torch.zeros(0, dtype=torch.long), b, _window_mask()),
        lambda: [torch.randn(0, 2, 4, 8) for _ in range(3)] + [torch.randn(2, 4, 4)]),
    "window_attention one token": (
        "window_attention", lambda m, q, k, v, b: m.window_attention(q, k, v, torch.tensor([0, 0]), b),
        lambda: [torch.randn(2, 2, 1, 8) for _ in range(3)] + [torch.randn(2, 1, 1)]),
    "gather_layernorm_linear constant rows and padding": (
        "gather_layernorm_linear",
        lambda m, x, nw, nb, w, b: m.gather_layernorm_linear(x, torch.tensor([0, -1, 2, 2]), nw, nb, w, b),
        lambda: [torch.ones(3, 6) * 3, torch.randn(6), torch.randn(6), torch.randn(5, 6), torch.randn(5)]),
    "gather_layernorm_linear all padding": (
        "gather_layernorm_linear",
        lambda m, x, nw, nb, w, b: m.gather_layernorm_linear(x, torch.tensor([-1, -1]), nw, nb, w, b),
        lambda: [torch.randn(3, 6), torch.randn(6), torch.randn(6), torch.randn(5, 6), torch.randn(5)]),
    "gather_layernorm_linear no rows": (
        "gather_layernorm_linear",
        lambda m, x, nw, nb, w, b: m.gather_layernorm_linear(x, torch.zeros(0, dtype=torch.long), nw, nb, w, b),
        lambda: [torch.randn(3, 6), torch.randn(6), torch.randn(6), torch.randn(5, 6), torch.randn(5)]),
    "linear_residual_scatter no rows": (
        "linear_residual_scatter",
        lambda m, h, w, b, base, r: m.linear_residual_scatter(h, w, b, base, torch.zeros(0, dtype=torch.long), r),
        lambda: [torch.randn(0, 6), torch.randn(5, 6), torch.randn(5), torch.randn(3, 5), torch.randn(0, 5)]),
    "linear_residual_scatter all padding": (
        "linear_residual_scatter",
        lambda m, h, w, b, base, r: m.linear_residual_scatter(h, w, b, base, torch.tensor([-1, -1]), r),
        lambda: [torch.randn(2, 6), torch.randn(5, 6), torch.randn(5), torch.randn(3, 5), torch.randn(2, 5)]),
}

# the selection ops give indices (no gradient): on degenerate scores they select as many as the
# reference, of the same scores (which of tied scores is the op's choice): name -> (scores, selection)
SELECTIONS = {
    "select_tokens zero scores by rate": (torch.zeros(2, 5), lambda m, s: m.select_tokens(s, keep_rate=0.5)),
    "select_tokens zero scores by mass": (torch.zeros(2, 5), lambda m, s: m.select_tokens(s, mass=0.5)),
    "select_tokens zero scores by mass, one image": (torch.zeros(1, 5), lambda m, s: m.select_tokens(s, mass=0.5)),
    "select_tokens one token": (torch.rand(2, 1), lambda m, s: m.select_tokens(s, keep_rate=0.5, keep_prefix=0)),
    "select_tokens no candidates": (torch.rand(2, 3), lambda m, s: m.select_tokens(s, mass=0.5, keep_prefix=3)),
    "select_tokens nothing pruned": (torch.rand(2, 5), lambda m, s: m.select_tokens(s, mass=1.0)),
    "select_windows none": (torch.rand(2, 4), lambda m, s: m.select_windows(s, 0)),
    "select_windows zero scores": (torch.zeros(2, 4), lambda m, s: m.select_windows(s, 2)),
    "window_rows none": (None, lambda m, s: m.window_rows(torch.zeros(2, 0, dtype=torch.long), 8, 8, (4, 4), (2, 2))),
    "window_rows one token": (None, lambda m, s: m.window_rows(torch.zeros(1, 1, dtype=torch.long), 1, 1, (7, 7), (0, 0))),
}

def test_every_public_op_has_a_degenerate_case():
    covered = {op for op, _, _ in [*CASES.values(), *KERNEL_CASES.values()]}
    covered |= {name.split()[0] for name in SELECTIONS}
    public = {name for name in sparse_ops.__all__ if callable(getattr(sparse_ops, name))}
    assert covered == public - {"TokenIndex", "backends", "no_index_checks", "set_sparsity", "window_grid"}


def check_gradients(case, dtype):
    _, fn, make = case
    torch.manual_seed(0)
    inputs = [t.to(dtype).requires_grad_() for t in make()]
    out = fn(sparse_ops, *inputs)
    upstream = torch.randn_like(out) * 100  # large enough that a gradient near the float range overflows
    grads = torch.autograd.grad(out, inputs, upstream, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    if bool(torch.isfinite(out).all()):
        for i, g in enumerate(grads):
            assert bool(torch.isfinite(g).all()), f"input {i}: a non-finite gradient where the output is finite"
    expected_inputs = [t.detach().double().requires_grad_() for t in inputs]
    expected = fn(reference, *expected_inputs)
    if not bool(torch.isfinite(expected).all()):
        return  # (a query that may attend to no key: the reference's softmax is NaN there)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else {}
    torch.testing.assert_close(out.double(), expected, **tol)
    if expected.grad_fn is not None:
        want = torch.autograd.grad(expected, expected_inputs, upstream.double(), allow_unused=True)
        for t, g, w in zip(expected_inputs, grads, want):
            torch.testing.assert_close(g.double(), torch.zeros_like(t) if w is None else w, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_finite_gradients(name, dtype):
    check_gradients(CASES[name], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_finite_gradients_of_the_kernel_ops(path, name, dtype):
    if path == "triton" and dtype == torch.float64:
        pytest.skip("float64 takes the PyTorch path")
    check_gradients(KERNEL_CASES[name], dtype)


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_selections(name):
    scores, select = SELECTIONS[name]
    got, want = select(sparse_ops, scores), select(reference, scores)
    if isinstance(got, TokenIndex):
        assert (got.cu_seqlens.tolist(), got.max_seqlen) == (want.cu_seqlens.tolist(), want.max_seqlen)
        got, want = scores.flatten()[got.index], scores.flatten()[want.index]  # per image in token order
    elif scores is not None:  # window ids, best first
        got, want = scores.gather(1, got), scores.gather(1, want)
    assert torch.equal(got, want)


def test_package_token_of_a_model_with_nothing_pruned_trains():
    """patch.vit(package=True) builds its package tokens itself: an image with nothing pruned
    (mass 1.0 keeps every token) gets a zero package token, and finite gradients."""
    import timm

    from sparse_ops import patch

    torch.manual_seed(0)
    model = patch.vit(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                        embed_dim=32, depth=4, num_heads=2), mass=1.0, package=True).train()
    out = model(torch.randn(2, 3, 32, 32))
    (out * 100).sum().backward()
    assert bool(torch.isfinite(out).all())
    for name, p in model.named_parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name
