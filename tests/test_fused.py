"""gather_layernorm_linear and linear_residual_scatter (the fused GEMM prologue and epilogue):
the Triton kernels (interpreter) and the plain-PyTorch path against the reference, forward and
backward; gradcheck, opcheck, compile, in-place semantics and bad input."""
import pytest
import torch

from sparse_ops import gather_layernorm_linear, linear_residual_scatter, reference
from conftest import assert_close_to_reference, with_grad


def prologue_inputs(dtype, R0=23, C=40, N=72, rows=(3, -1, 7, 7, 0, 22, -1, 11, 5)):
    x = torch.randn(R0, C).to(dtype)
    nw, nb = (1 + 0.5 * torch.randn(C)).to(dtype), (0.5 * torch.randn(C)).to(dtype)
    w, b = (torch.randn(N, C) / C**0.5).to(dtype), torch.randn(N).to(dtype)
    return x, None if rows is None else torch.tensor(rows, dtype=torch.long), nw, nb, w, b


def epilogue_inputs(dtype, R0=23, K=40, N=36, rows=(3, -1, 7, 0, 22, -1, 11, 5)):
    R = R0 if rows is None else len(rows)
    h, base, residual = torch.randn(R, K).to(dtype), torch.randn(R0, N).to(dtype), torch.randn(R, N).to(dtype)
    w, b = (torch.randn(N, K) / K**0.5).to(dtype), torch.randn(N).to(dtype)
    return h, w, b, base, None if rows is None else torch.tensor(rows, dtype=torch.long), residual


def check_against_reference(op, ref, tensors, kwargs, dtype):
    """op's output and gradients within twice the error of the reference run in dtype."""
    results = {}
    for name, fn, t_dtype in (("out", op, dtype), ("low", ref, dtype), ("high", ref, torch.float64)):
        inputs = [None if t is None else t.detach().to(t_dtype).requires_grad_(t.is_floating_point())
                  for t in tensors]
        out = fn(*inputs, **kwargs)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(t_dtype)
        out.backward(grad)
        results[name] = [out] + [t.grad for t in inputs if t is not None and t.is_floating_point()]
    for got, low, high in zip(*results.values()):
        assert torch.isfinite(got).all()
        assert_close_to_reference(got, low, high, atol=1e-5)


@pytest.mark.parametrize("rows", [(3, -1, 7, 7, 0, 22, -1, 11, 5), None, ()], ids=["rows", "all", "empty"])
@pytest.mark.parametrize("norm", [True, False], ids=["ln", "no-ln"])
def test_gather_layernorm_linear(path, dtype, nan_outputs, rows, norm):
    x, rows, nw, nb, w, b = prologue_inputs(dtype, rows=rows)
    if not norm:
        nw = nb = None

    def op(x, nw, nb, w, b):
        return gather_layernorm_linear(x, rows, nw, nb, w, b, eps=1e-5)

    def ref(x, nw, nb, w, b):
        return reference.gather_layernorm_linear(x, rows, nw, nb, w, b, eps=1e-5)

    check_against_reference(op, ref, [x, nw, nb, w, b], {}, dtype)


def test_gather_layernorm_linear_padding_rows_give_the_bias(path):
    """timm pads after norm1: a padding row is zero, so its output is the bias."""
    x, _, nw, nb, w, b = prologue_inputs(torch.float32)
    out = gather_layernorm_linear(x, torch.tensor([-1, 2, -1]), nw, nb, w, b)
    torch.testing.assert_close(out[0], b)
    torch.testing.assert_close(out[2], b)


@pytest.mark.parametrize("rows", [(3, -1, 7, 0, 22, -1, 11, 5), None, ()], ids=["rows", "all", "empty"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "own-rows"])
def test_linear_residual_scatter(path, dtype, nan_outputs, rows, residual):
    h, w, b, base, rows, res = epilogue_inputs(dtype, rows=rows)

    def op(h, w, b, base, res):
        return linear_residual_scatter(h, w, b, base, rows, residual=res)

    def ref(h, w, b, base, res):
        return reference.linear_residual_scatter(h, w, b, base, rows, residual=res)

    check_against_reference(op, ref, [h, w, b, base, res if residual else None], {}, dtype)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "own-rows"])
def test_inplace_writes_only_the_rows(path, residual):
    """In place: the kept rows get the result, every other row keeps its exact bits (NaN
    included), and base itself is returned."""
    h, w, b, base, rows, res = epilogue_inputs(torch.float32)
    base[1] = float("nan")  # not in rows: must stay NaN
    expected = reference.linear_residual_scatter(h, w, b, base, rows, residual=res if residual else None)
    with torch.no_grad():
        out = linear_residual_scatter(h, w, b, base, rows, residual=res if residual else None, inplace=True)
    assert out is base
    torch.testing.assert_close(out, expected, equal_nan=True)


def test_gradcheck_float64():
    x, rows, nw, nb, w, b = (t.double() if t.is_floating_point() else t for t in prologue_inputs(torch.float32, 9, 5, 4,
                                                                                                  (3, -1, 7, 7, 0)))
    assert torch.autograd.gradcheck(lambda *a: gather_layernorm_linear(a[0], rows, *a[1:]), with_grad(x, nw, nb, w, b))
    h, w, b, base, rows, res = (t.double() if t.is_floating_point() else t for t in epilogue_inputs(torch.float32, 9, 5, 4,
                                                                                                    (3, -1, 7, 0)))
    for r in (None, res):
        inputs = with_grad(h, w, b, base) + ([] if r is None else with_grad(r))
        assert torch.autograd.gradcheck(lambda *a: linear_residual_scatter(*a[:4], rows, *a[4:]), inputs)


def test_opcheck(path):
    ops = torch.ops.sparse_ops
    x, rows, nw, nb, w, b = prologue_inputs(torch.float32)
    for args in ((x, rows, nw, nb, 1e-5, w, b), (x, None, None, None, 0.0, w, None)):
        torch.library.opcheck(ops.layernorm_linear_fwd, tuple(with_grad(t)[0] if isinstance(t, torch.Tensor)
                                                              and t.is_floating_point() else t for t in args))
    out, mean, rstd = ops.layernorm_linear_fwd(x, rows, nw, nb, 1e-5, w, b)
    torch.library.opcheck(ops.layernorm_linear_bwd, (torch.randn_like(out), x, rows, nw, nb, mean, rstd, w,
                                                     [True, True, True, True, True]))
    h, w, b, base, rows, res = epilogue_inputs(torch.float32)
    torch.library.opcheck(ops.linear_scatter, tuple(with_grad(h, w, b, res, base)[:4]) + (base, rows))
    torch.library.opcheck(ops.linear_scatter_, (h, w, b, None, base.clone(), rows))


def test_compile(path):
    x, rows, nw, nb, w, b = prologue_inputs(torch.float32)
    h, w2, b2, base, rows2, res = epilogue_inputs(torch.float32, N=72, K=72, rows=(3, -1, 7, 7, 0, 22, -1, 11, 5)[:1] + (1, 2))

    def block(x, nw, nb, w, b, w2, b2):
        y = torch.nn.functional.gelu(gather_layernorm_linear(x, torch.tensor([4, -1, 9]), nw, nb, w, b))
        return linear_residual_scatter(y, w2, b2, torch.zeros(23, 72), torch.tensor([3, 1, 2]))

    inputs, expected = with_grad(x, nw, nb, w, b, w2, b2), with_grad(x, nw, nb, w, b, w2, b2)
    out = torch.compile(block, fullgraph=True)(*inputs)
    ref = block(*expected)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # compiled gelu rounds differently
    out.square().sum().backward()
    ref.square().sum().backward()
    for got, want in zip(inputs, expected):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


def test_bad_input():
    x, rows, nw, nb, w, b = prologue_inputs(torch.float32)
    with pytest.raises(ValueError, match="rows has entries outside"):
        gather_layernorm_linear(x, torch.tensor([0, 23]), nw, nb, w, b)
    with pytest.raises(ValueError, match="weight must have x's 40 input features"):
        gather_layernorm_linear(x, rows, nw, nb, w[:, :8], b)
    with pytest.raises(ValueError, match="norm_weight and norm_bias"):
        gather_layernorm_linear(x, rows, nw, None, w, b)
    with pytest.raises(ValueError, match=r"norm_bias must have shape \[40\]"):
        gather_layernorm_linear(x, rows, nw, nb[:3], w, b)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        gather_layernorm_linear(x, rows, nw, nb, w.double(), b)
    with pytest.raises(TypeError, match="rows must have dtype int64"):
        gather_layernorm_linear(x, rows.int(), nw, nb, w, b)
    h, w, b, base, rows, res = epilogue_inputs(torch.float32)
    with pytest.raises(ValueError, match="rows repeats a row"):
        linear_residual_scatter(h, w, b, base, torch.tensor([3, 3, 1, 2, 4, 5, 6, 7]))
    with pytest.raises(ValueError, match="h must have one row per entry of rows"):
        linear_residual_scatter(h[:3], w, b, base, rows)
    with pytest.raises(ValueError, match="residual must have shape"):
        linear_residual_scatter(h, w, b, base, rows, residual=res[:2])
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_residual_scatter(h, w, b[:3], base, rows)
    with pytest.raises(ValueError, match="inplace=True needs autograd off"):
        linear_residual_scatter(h.requires_grad_(), w, b, base, rows, inplace=True)
