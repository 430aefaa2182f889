"""kernels/fused_linear.py through the interpreter: the prologue gather + LayerNorm + Linear
(forward and backward) and the epilogue Linear + residual + scatter, against plain-PyTorch
composites in float64, within twice the error of the same composite run in the low dtype.
Shapes are ragged against the interpreter's tiles (16 x 32 x 16 GEMM tiles, 4-row LayerNorm
blocks): C = 40, N = 72, R = 37 span several blocks with partial ones in every dimension."""
import pytest
import torch
import torch.nn.functional as F

from sparse_ops.kernels.fused_linear import linear_scatter_, ln_linear_backward, ln_linear_forward
from conftest import assert_close_to_reference, needs_interpreter

pytestmark = needs_interpreter  # CPU tensors straight into the kernels; tests/test_cuda_shapes.py runs them on CUDA

EPS = 1e-5


def random_rows(R, R0, unique=False, padding=True, seed=0):
    """int64 [R] rows into R0, some -1 (padding) and, unless unique, some repeated."""
    g = torch.Generator().manual_seed(seed)
    if unique:
        rows = torch.randperm(R0, generator=g)[:R]
    else:
        rows = torch.randint(0, R0, (R,), generator=g)
        rows[1::5] = rows[0]  # repeats
    if padding:
        rows[2::6] = -1
    return rows


def gathered(x, rows):
    """x[rows] with zero rows for -1 (x itself when rows is None), and the valid mask."""
    if rows is None:
        return x, torch.ones(x.shape[0], dtype=torch.bool)
    valid = rows >= 0
    return torch.where(valid[:, None], x[rows.clamp(min=0)], 0), valid


def composite(x, rows, ln_weight, ln_bias, weight, bias):
    """LN(x[rows]) @ weight^T + bias with padding rows normalized to 0 (timm pads after norm1)."""
    xg, valid = gathered(x, rows)
    if ln_weight is not None:
        xg = torch.where(valid[:, None], F.layer_norm(xg, (x.shape[1],), ln_weight, ln_bias, EPS), 0)
    return F.linear(xg, weight, bias)


def ln_linear_inputs(R0, C, N, dtype, ln=True, bias=True, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)

    x = rand(R0, C + 3, shift=0.5)[:, :C]  # a row stride != C
    ln_weight, ln_bias = (rand(C, scale=0.5, shift=1.0), rand(C, scale=0.3)) if ln else (None, None)
    weight = rand(C, N, scale=C**-0.5).t() if transposed else rand(N, C, scale=C**-0.5)
    return x, ln_weight, ln_bias, weight, rand(N) if bias else None


# (R0, C, N, R or None for rows=None, LayerNorm, bias, transposed weight view)
CASES = [
    (29, 40, 72, 37, True, True, False),
    (37, 40, 72, None, True, False, False),
    (29, 40, 72, 37, False, True, True),
    (21, 40, 72, None, False, False, True),
    (30, 100, 20, 9, True, True, True),
]
CASE_IDS = [f"R0{c[0]}-C{c[1]}-N{c[2]}-R{c[3]}" + "-ln" * c[4] + "-bias" * c[5] + "-wT" * c[6] for c in CASES]


@pytest.mark.parametrize("R0,C,N,R,ln,bias,transposed", CASES, ids=CASE_IDS)
def test_ln_linear_matches_composite(dtype, nan_outputs, R0, C, N, R, ln, bias, transposed):
    """Forward (out, mean, rstd) and backward (dx, dln_weight, dln_bias, dweight, dbias)
    against torch.autograd through the float64 composite."""
    x, ln_weight, ln_bias, weight, b = ln_linear_inputs(R0, C, N, dtype, ln, bias, transposed)
    rows = None if R is None else random_rows(R, R0)
    R = R0 if R is None else R
    if rows is not None:  # rows the kernels must not read are NaN (but row 0: padding rows take it in the composite)
        unread = ~torch.isin(torch.arange(R0), rows)
        unread[0] = False
        assert unread.any()
        x[unread] = float("nan")
    dout = torch.randn(N, R).to(dtype).t()  # non-contiguous
    atol = 1e-5 if dtype == torch.float32 else 1e-6

    out, mean, rstd = ln_linear_forward(x, rows, ln_weight, ln_bias, EPS, weight, b)
    assert out.shape == (R, N) and out.dtype == dtype and out.is_contiguous()
    if ln:
        xg, valid = gathered(x.double(), rows)
        var, mu = torch.var_mean(xg, 1, correction=0)
        assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (R,)
        torch.testing.assert_close(mean.double(), mu * valid, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rstd.double(), (var + EPS).rsqrt() * valid, rtol=1e-5, atol=1e-6)
    else:
        assert mean.shape == rstd.shape == (0,) and mean.dtype == rstd.dtype == torch.float32
    needs = tuple(t is not None for t in (x, ln_weight, ln_bias, weight, b))  # as autograd's ctx gives it
    grads = ln_linear_backward(dout, x, rows, ln_weight, ln_bias, mean, rstd, weight, needs)

    results = {}
    for name, run_dtype in (("low", dtype), ("high", torch.float64)):
        leaves = [None if t is None else t.detach().to(run_dtype).requires_grad_()
                  for t in (x, ln_weight, ln_bias, weight, b)]
        ref = composite(*leaves[:1], rows, *leaves[1:])
        ref.backward(dout.to(run_dtype))
        results[name] = [ref] + [None if t is None else t.grad for t in leaves]
    for i, (actual, low, high) in enumerate(zip([out, *grads], *results.values())):
        if high is None:
            assert actual is None, f"output {i} should be None"
            continue
        assert actual.shape == high.shape and actual.dtype == dtype, i
        assert_close_to_reference(actual, low, high, atol=atol)
    dx, _, _, dweight, _ = grads
    assert dweight.is_contiguous()
    # fresh tensors, as a custom op's outputs must be: no output shares storage with an input or another output
    storages = [t.untyped_storage().data_ptr() for t in (out, mean, rstd, *grads) if t is not None and t.numel()]
    inputs = {t.untyped_storage().data_ptr() for t in (x, ln_weight, ln_bias, weight, b, dout) if t is not None}
    assert len(set(storages)) == len(storages) and not inputs & set(storages)
    if rows is not None:
        assert (dx[~torch.isin(torch.arange(R0), rows)] == 0).all()  # rows never gathered


@pytest.mark.parametrize("needs", [(False, False, False, True, False), (True, True, False, False, True),
                                   (False, True, True, False, False)])
def test_ln_linear_backward_only_what_is_needed(nan_outputs, needs):
    """Gradients not asked for are None; those asked for equal the full computation's."""
    x, ln_weight, ln_bias, weight, b = ln_linear_inputs(29, 40, 72, torch.float32)
    rows = random_rows(37, 29)
    dout = torch.randn(37, 72)
    out, mean, rstd = ln_linear_forward(x, rows, ln_weight, ln_bias, EPS, weight, b)
    full = ln_linear_backward(dout, x, rows, ln_weight, ln_bias, mean, rstd, weight, (True,) * 5)
    some = ln_linear_backward(dout, x, rows, ln_weight, ln_bias, mean, rstd, weight, needs)
    for need, g_full, g_some in zip(needs, full, some):
        if need:
            torch.testing.assert_close(g_some, g_full, rtol=0, atol=0)
        else:
            assert g_some is None


@pytest.mark.parametrize("ln", [True, False])
def test_ln_linear_no_rows_kept(dtype, ln):
    """R = 0: empty outputs and zero gradients of the right shapes and dtypes."""
    x, ln_weight, ln_bias, weight, b = ln_linear_inputs(7, 40, 72, dtype, ln)
    rows = torch.empty(0, dtype=torch.int64)
    out, mean, rstd = ln_linear_forward(x, rows, ln_weight, ln_bias, EPS, weight, b)
    assert out.shape == (0, 72) and out.dtype == dtype and mean.shape == rstd.shape == (0,)
    dx, dg, db_ln, dw, db = ln_linear_backward(out, x, rows, ln_weight, ln_bias, mean, rstd, weight, (True,) * 5)
    expected = [(dx, (7, 40)), (dw, (72, 40)), (db, (72,))] + ([(dg, (40,)), (db_ln, (40,))] if ln else [])
    for grad, shape in expected:
        assert grad.shape == shape and grad.dtype == dtype and (grad == 0).all()
    assert ln or dg is None and db_ln is None


def scatter_inputs(R0, K, N, R, dtype, bias=True, residual=True, transposed=False, identity=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    h = rand(R, K + 5)[:, :K]  # a row stride != K
    weight = rand(K, N, scale=K**-0.5).t() if transposed else rand(N, K, scale=K**-0.5)
    rows = None if identity else random_rows(R, R0, unique=True, seed=seed)
    out = rand(R0, N)
    written = torch.zeros(R0, dtype=torch.bool)
    if rows is None:
        written[:] = True
    else:
        written[rows[rows >= 0]] = True
    # Rows the kernel must not touch are NaN; with a residual, so are the rows it overwrites.
    out[~written] = float("nan")
    if residual:
        out[written] = float("nan")
    return h, weight, rand(N) if bias else None, rand(R, N) if residual else None, out, rows, written


def scatter_composite(h, weight, bias, residual, out, rows):
    """out with out[rows[r]] = (residual[r] or out[rows[r]]) + h[r] @ weight^T + bias."""
    y = F.linear(h, weight, bias)
    if rows is None:
        return (out if residual is None else residual) + y
    valid = rows >= 0
    dest = rows[valid]
    expected = out.clone()
    expected[dest] = (out[dest] if residual is None else residual[valid]) + y[valid]
    return expected


# (R0, K, N, R, bias, residual, transposed weight view, rows=None)
SCATTER_CASES = [
    (45, 40, 72, 37, True, True, False, False),
    (45, 40, 72, 37, False, False, True, False),
    (37, 40, 72, 37, True, False, False, True),
    (37, 40, 72, 37, False, True, True, True),
    (30, 100, 20, 9, True, False, True, False),
]
SCATTER_IDS = [f"R0{c[0]}-K{c[1]}-N{c[2]}-R{c[3]}" + "-bias" * c[4] + "-res" * c[5] + "-wT" * c[6] + "-id" * c[7]
               for c in SCATTER_CASES]


@pytest.mark.parametrize("R0,K,N,R,bias,residual,transposed,identity", SCATTER_CASES, ids=SCATTER_IDS)
def test_linear_scatter_matches_composite(dtype, R0, K, N, R, bias, residual, transposed, identity):
    """Written rows against the float64 composite; rows not written keep their exact old
    values (NaN included), and no NaN leaks from them into written rows."""
    h, weight, b, res, out, rows, written = scatter_inputs(R0, K, N, R, dtype, bias, residual, transposed, identity)
    before = out.clone()
    args = (h, weight, b, res)
    high = scatter_composite(*[None if t is None else t.double() for t in args], before.double(), rows)
    low = scatter_composite(*args, before, rows)

    assert linear_scatter_(*args, out, rows) is None
    assert out.dtype == dtype
    torch.testing.assert_close(out[~written], before[~written], rtol=0, atol=0, equal_nan=True)
    assert not out[written].isnan().any()
    assert_close_to_reference(out[written], low[written], high[written], atol=1e-5 if dtype == torch.float32 else 1e-6)


def test_linear_scatter_no_rows(dtype):
    """R = 0 (and rows of only -1): out is left exactly as it was."""
    for rows in (torch.empty(0, dtype=torch.int64), torch.full((5,), -1, dtype=torch.int64)):
        h, weight, b, res, out, _, _ = scatter_inputs(6, 40, 72, rows.shape[0], dtype)
        before = out.clone()
        linear_scatter_(h, weight, b, res, out, rows)
        torch.testing.assert_close(out, before, rtol=0, atol=0, equal_nan=True)
