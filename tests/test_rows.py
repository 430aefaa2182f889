"""gather_rows / scatter_rows / scatter_add_rows: the row primitives every sparse op uses."""
import pytest
import torch

import sparse_ops
from sparse_ops import _backend, reference
from conftest import LOW_DTYPES, assert_close_to_reference, poison_allocator

# (source rows R, channels C, selected rows T): C covers every vector width of the CUDA copy.
SHAPES = [(10, 8, 6), (7, 3, 12), (33, 64, 20), (5, 1, 5), (4, 96, 0), (0, 16, 3)]


def random_rows(R, T, device, padding=True, unique=False):
    """T row ids in [0, R), about a fifth of them -1 (padding) when padding is set."""
    if unique:
        rows = torch.randperm(max(R, T), device=device)[:T]
        rows[rows >= R] = -1
    else:
        rows = torch.randint(0, max(R, 1), (T,), device=device) if R else torch.full((T,), -1, device=device)
    if padding and T:
        rows[torch.rand(T, device=device) < 0.2] = -1
    return rows


@pytest.mark.parametrize("R,C,T", SHAPES)
def test_gather_rows(device, dtype, R, C, T):
    x = torch.randn(R, C, device=device).to(dtype)
    rows = random_rows(R, T, device)
    poison_allocator(T * C * x.element_size(), device)
    out = sparse_ops.gather_rows(x, rows)
    assert torch.equal(out, reference.gather_rows(x, rows))
    assert (out[rows < 0] == 0).all()


@pytest.mark.parametrize("layout", ["row_strided", "transposed", "offset"])
def test_gather_rows_non_contiguous(device, dtype, layout):
    big = torch.randn(40, 24, device=device).to(dtype)
    x = {"row_strided": big[:, 3:13], "transposed": big[:12].t(), "offset": big[1::2, 1:]}[layout]
    assert not x.is_contiguous()
    rows = random_rows(x.shape[0], 15, device)
    assert torch.equal(sparse_ops.gather_rows(x, rows), reference.gather_rows(x.contiguous(), rows))


@pytest.mark.parametrize("R,C,T", SHAPES)
def test_scatter_rows(device, dtype, R, C, T):
    base = torch.randn(R, C, device=device).to(dtype)
    rows = random_rows(R, T, device, unique=True)
    y = torch.randn(T, C, device=device).to(dtype)
    out = sparse_ops.scatter_rows(y, rows, base)
    assert torch.equal(out, reference.scatter_rows(y, rows, base))
    untouched = torch.ones(R, dtype=torch.bool, device=device)
    untouched[rows[rows >= 0]] = False
    assert torch.equal(out[untouched], base[untouched])


@pytest.mark.parametrize("layout", ["row-stride", "column-major"])
def test_scatter_rows_non_contiguous(device, layout):
    """A base whose rows are not packed (a column slice) or not rows at all (transposed): the
    output is still base with the rows replaced, and base is left as it was."""
    if layout == "row-stride":
        base = torch.randn(16, 20, device=device)[:, 2:12]
    else:
        base = torch.randn(10, 16, device=device).t()
    before = base.clone()
    y = torch.randn(10, 6, device=device).t()
    rows = random_rows(16, 6, device, unique=True)
    assert torch.equal(sparse_ops.scatter_rows(y, rows, base), reference.scatter_rows(y, rows, base))
    assert torch.equal(base, before)


@pytest.mark.parametrize("R,C,T", SHAPES + [(3, 5, 50)])
def test_scatter_add_rows_repeated(device, dtype, R, C, T):
    y = torch.randn(T, C, device=device).to(dtype)
    rows = random_rows(R, T, device)  # with repeats
    out = sparse_ops.scatter_add_rows(y, rows, R)
    assert out.dtype == dtype and out.shape == (R, C)
    expected = reference.scatter_add_rows(y.double(), rows, R)
    if dtype in LOW_DTYPES:
        assert_close_to_reference(out, reference.scatter_add_rows(y, rows, R), expected)
    else:
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


ROW_OPS = {
    "gather_rows": lambda x, rows, base: sparse_ops.gather_rows(x, rows),
    "scatter_rows": lambda x, rows, base: sparse_ops.scatter_rows(x, rows, base),
    "scatter_add_rows": lambda x, rows, base: sparse_ops.scatter_add_rows(x, rows, base.shape[0]),
}
REFERENCE_ROW_OPS = {
    "gather_rows": lambda x, rows, base: reference.gather_rows(x, rows),
    "scatter_rows": lambda x, rows, base: reference.scatter_rows(x, rows, base),
    "scatter_add_rows": lambda x, rows, base: reference.scatter_add_rows(x, rows, base.shape[0]),
}


@pytest.mark.parametrize("path", ["public", "reference"])
@pytest.mark.parametrize("name", sorted(ROW_OPS))
def test_row_ops_gradcheck(device, name, path):
    fn = (ROW_OPS if path == "public" else REFERENCE_ROW_OPS)[name]
    R, C, T = 9, 5, 7
    rows = random_rows(R, T, device, unique=name == "scatter_rows")
    x = torch.randn(R if name == "gather_rows" else T, C, device=device, dtype=torch.float64, requires_grad=True)
    base = torch.randn(R, C, device=device, dtype=torch.float64, requires_grad=True)
    inputs = (x, base) if name == "scatter_rows" else (x,)
    assert torch.autograd.gradcheck(lambda *a: fn(a[0], rows, a[-1] if len(a) > 1 else base), inputs)
    assert torch.autograd.gradgradcheck(lambda *a: fn(a[0], rows, a[-1] if len(a) > 1 else base), inputs)


@pytest.mark.skipif(_backend.extension is None, reason="compiled extension not loaded")
def test_row_ops_opcheck(device):
    R, C, T = 12, 8, 9
    x = torch.randn(R, C, device=device, requires_grad=True)
    y = torch.randn(T, C, device=device, requires_grad=True)
    gather_rows = random_rows(R, T, device)
    unique_rows = random_rows(R, T, device, unique=True)
    ops = torch.ops.sparse_ops
    torch.library.opcheck(ops.gather_rows.default, (x, gather_rows))
    torch.library.opcheck(ops.scatter_rows.default, (y, unique_rows, x))
    torch.library.opcheck(ops.scatter_add_rows.default, (y, gather_rows, R))
    torch.library.opcheck(ops.gather_rows.default, (x[:, :0], gather_rows[:0]))
