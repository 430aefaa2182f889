"""Bad input raises a TypeError / ValueError that names the argument."""
import pytest
import torch

import sparse_ops
from sparse_ops import TokenIndex

x2 = torch.randn(6, 4)
x4 = torch.randn(2, 9, 9, 4)
rows = torch.tensor([0, -1, 5])
windows = torch.tensor([[0, 3], [1, 2]])
scores = torch.rand(2, 10)
idx = sparse_ops.select_tokens(scores, keep_rate=0.5)
x3 = torch.randn(2, 10, 4)

CASES = {
    # wrong rank
    "gather_rows rank": (lambda: sparse_ops.gather_rows(x4, rows), ValueError, "x must be 2-D"),
    "gather_rows rows rank": (lambda: sparse_ops.gather_rows(x2, rows.view(3, 1)), ValueError, "rows must be 1-D"),
    "gather_windows rank": (lambda: sparse_ops.gather_windows(x2, windows, 7), ValueError, "x must be 4-D"),
    "windows rank": (lambda: sparse_ops.gather_windows(x4, windows.view(-1), 7), ValueError, "windows must be 2-D"),
    "window_scores rank": (lambda: sparse_ops.window_scores(x3, 7), ValueError, "x must be 4-D"),
    "select_tokens rank": (lambda: sparse_ops.select_tokens(x3, keep_rate=0.5), ValueError, "scores must be 2-D"),
    "gather_tokens rank": (lambda: sparse_ops.gather_tokens(x2, idx), ValueError, "x must be 3-D"),
    # wrong dtype / type
    "rows dtype": (lambda: sparse_ops.gather_rows(x2, rows.int()), TypeError, "rows must have dtype int64"),
    "x dtype": (lambda: sparse_ops.gather_rows(x2.long(), rows), TypeError, "x must have dtype"),
    "windows dtype": (lambda: sparse_ops.gather_windows(x4, windows.float(), 7), TypeError, "windows must have dtype"),
    "scatter dtype": (lambda: sparse_ops.scatter_rows(torch.randn(3, 4).half(), rows, x2), TypeError, "y must have base's dtype"),
    "not a tensor": (lambda: sparse_ops.gather_rows([1.0], rows), TypeError, "x must be a tensor"),
    "idx type": (lambda: sparse_ops.gather_tokens(x3, rows), TypeError, "idx must be a TokenIndex"),
    "window_size type": (lambda: sparse_ops.window_scores(x4, 7.0), TypeError, "window_size must be an int"),
    "keep_rate type": (lambda: sparse_ops.select_tokens(scores, keep_rate="half"), TypeError, "keep_rate"),
    # out-of-range indices
    "rows too large": (lambda: sparse_ops.gather_rows(x2, torch.tensor([0, 6])), ValueError, r"rows has entries outside \[-1, 6\)"),
    "rows below -1": (lambda: sparse_ops.gather_rows(x2, torch.tensor([-2])), ValueError, "rows has entries outside"),
    "scatter rows": (lambda: sparse_ops.scatter_rows(torch.randn(1, 4), torch.tensor([9]), x2), ValueError, "rows has entries outside"),
    "scatter repeated": (lambda: sparse_ops.scatter_rows(torch.randn(2, 4), torch.tensor([1, 1]), x2), ValueError, "rows repeats a row"),
    "scatter_add rows": (lambda: sparse_ops.scatter_add_rows(x2, torch.arange(6), 3), ValueError, "rows has entries outside"),
    "window id": (lambda: sparse_ops.gather_windows(x4, torch.tensor([[0, 4], [1, 2]]), 7), ValueError, r"windows has entries outside \[0, 4\)"),
    "negative window id": (lambda: sparse_ops.window_rows(torch.tensor([[-1]]), 9, 9, 7), ValueError, "windows has entries outside"),
    "repeated window": (lambda: sparse_ops.scatter_windows(torch.randn(4, 49, 4), x4, torch.tensor([[1, 1], [0, 2]]), 7), ValueError, "windows repeats"),
    "token index": (lambda: sparse_ops.gather_tokens(x3, TokenIndex(torch.tensor([20]), torch.tensor([0, 1, 1], dtype=torch.int32), 1, 2, 10)), ValueError, "idx.index has entries outside"),
    # sizes
    "negative num_rows": (lambda: sparse_ops.scatter_add_rows(x2, torch.arange(6), -1), ValueError, "num_rows must be >= 0"),
    "negative height": (lambda: sparse_ops.window_rows(windows, -9, 9, 7), ValueError, "height must be >= 1"),
    "zero window": (lambda: sparse_ops.window_scores(x4, 0), ValueError, "window_size must be >= 1"),
    "shift too large": (lambda: sparse_ops.window_scores(x4, 7, 7), ValueError, "shift_size must be in"),
    "negative shift": (lambda: sparse_ops.window_scores(x4, 7, -1), ValueError, "shift_size must be in"),
    "num_keep": (lambda: sparse_ops.select_windows(scores, 11), ValueError, "num_keep must be <="),
    "negative num_keep": (lambda: sparse_ops.select_windows(scores, -1), ValueError, "num_keep must be >= 0"),
    "windows batch": (lambda: sparse_ops.gather_windows(x4, windows[:1], 7), ValueError, "windows must have one row per image"),
    "scatter_windows y": (lambda: sparse_ops.scatter_windows(torch.randn(4, 48, 4), x4, windows, 7), ValueError, "y must have shape"),
    "scatter y shape": (lambda: sparse_ops.scatter_rows(torch.randn(2, 4), rows, x2), ValueError, "y must have shape"),
    "tokens shape": (lambda: sparse_ops.gather_tokens(torch.randn(2, 9, 4), idx), ValueError, "x must be"),
    "keep_prefix": (lambda: sparse_ops.select_tokens(scores, keep_rate=0.5, keep_prefix=11), ValueError, "keep_prefix must be <="),
    "min_keep": (lambda: sparse_ops.select_tokens(scores, keep_rate=0.5, min_keep=-1), ValueError, "min_keep must be >= 0"),
    # rates
    "keep_rate 0": (lambda: sparse_ops.select_tokens(scores, keep_rate=0.0), ValueError, r"keep_rate must be in \(0, 1\]"),
    "keep_rate > 1": (lambda: sparse_ops.select_tokens(scores, keep_rate=1.5), ValueError, r"keep_rate must be in \(0, 1\]"),
    "mass < 0": (lambda: sparse_ops.select_tokens(scores, mass=-0.1), ValueError, r"mass must be in \(0, 1\]"),
    "rate and mass": (lambda: sparse_ops.select_tokens(scores, keep_rate=0.5, mass=0.5), ValueError, "exactly one of keep_rate and mass"),
    "negative mass scores": (lambda: sparse_ops.select_tokens(-scores, mass=0.5), ValueError, "scores must be non-negative"),
    "negative package scores": (lambda: sparse_ops.package_tokens(x3, -scores, idx), ValueError, "scores must be non-negative"),
    # TokenIndex fields
    "TokenIndex index": (lambda: TokenIndex(rows.int(), torch.zeros(3, dtype=torch.int32), 0, 2, 3), TypeError, "TokenIndex.index"),
    "TokenIndex cu_seqlens": (lambda: TokenIndex(rows, torch.zeros(2, dtype=torch.int32), 0, 2, 3), TypeError, "TokenIndex.cu_seqlens"),
    "from_mask": (lambda: TokenIndex.from_mask(torch.ones(2, 3)), TypeError, "keep must be a bool tensor"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises(case):
    fn, error, message = CASES[case]
    with pytest.raises(error, match=message):
        fn()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="rows is on cuda"):
        sparse_ops.gather_rows(x2, rows.cuda())
    with pytest.raises(ValueError, match="windows is on cuda"):
        sparse_ops.gather_windows(x4, windows.cuda(), 7)


def test_device_mismatch_meta():
    # The meta device stands in for a second device on machines without a GPU.
    with pytest.raises(ValueError, match="rows is on meta"):
        sparse_ops.gather_rows(x2, rows.to("meta"))
    with pytest.raises(ValueError, match="y is on meta"):
        sparse_ops.scatter_rows(torch.randn(3, 4, device="meta"), rows, x2)


def test_no_index_checks_still_guards_memory():
    """Without the Python value checks, the CPU kernels still refuse out-of-range rows."""
    if sparse_ops.backends()["gather_rows"]["cpu"] != "C++":
        pytest.skip("compiled CPU kernels not loaded")
    with sparse_ops.no_index_checks():
        with pytest.raises(RuntimeError, match="out of range"):
            sparse_ops.gather_rows(x2, torch.tensor([0, 6]))
        with pytest.raises(RuntimeError, match="out of range"):
            sparse_ops.window_rows(torch.tensor([[5]]), 9, 9, 7)


def valid_calls():
    """Each public op with valid keyword arguments: op name -> (op, arguments)."""
    x3, scores = torch.randn(2, 6, 4), torch.rand(2, 6)
    tokens = sparse_ops.select_tokens(scores, keep_rate=0.5)
    x4, win, rows3 = torch.randn(2, 8, 8, 4), torch.tensor([[0, 3], [1, 2]]), torch.tensor([0, -1, 5])
    qkv = {name: torch.randn(5, 2, 4) for name in "qkv"}
    windowed = {name: torch.randn(3, 2, 4, 4) for name in "qkv"}
    return {
        "gather_rows": (sparse_ops.gather_rows, dict(x=torch.randn(6, 4), rows=rows3)),
        "scatter_rows": (sparse_ops.scatter_rows, dict(y=torch.randn(3, 4), rows=rows3, base=torch.randn(6, 4))),
        "scatter_add_rows": (sparse_ops.scatter_add_rows, dict(y=torch.randn(3, 4), rows=rows3, num_rows=6)),
        "window_rows": (sparse_ops.window_rows, dict(windows=win, height=8, width=8, window_size=4)),
        "window_scores": (sparse_ops.window_scores, dict(x=x4, window_size=4)),
        "gather_windows": (sparse_ops.gather_windows, dict(x=x4, windows=win, window_size=4)),
        "scatter_windows": (sparse_ops.scatter_windows, dict(y=torch.randn(4, 16, 4), base=x4, windows=win, window_size=4)),
        "gather_tokens": (sparse_ops.gather_tokens, dict(x=x3, idx=tokens)),
        "scatter_tokens": (sparse_ops.scatter_tokens, dict(y=torch.randn(tokens.num_tokens, 4), idx=tokens, base=x3)),
        "package_tokens": (sparse_ops.package_tokens, dict(x=x3, scores=scores, idx=tokens)),
        "select_tokens": (sparse_ops.select_tokens, dict(scores=scores, keep_rate=0.5)),
        "select_windows": (sparse_ops.select_windows, dict(scores=scores, num_keep=2)),
        "varlen_attention": (sparse_ops.varlen_attention,
                             dict(qkv, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32), max_seqlen=3)),
        "window_attention": (sparse_ops.window_attention,
                             dict(windowed, window_ids=torch.tensor([0, 1, 1]), bias=torch.randn(2, 4, 4),
                                  mask=torch.randn(2, 4, 4), scale=torch.rand(2))),
        "gather_layernorm_linear": (sparse_ops.gather_layernorm_linear,
                                    dict(x=torch.randn(6, 4), rows=rows3, norm_weight=torch.randn(4),
                                         norm_bias=torch.randn(4), weight=torch.randn(3, 4), bias=torch.randn(3))),
        "linear_residual_scatter": (sparse_ops.linear_residual_scatter,
                                    dict(h=torch.randn(3, 5), weight=torch.randn(4, 5), bias=torch.randn(4),
                                         base=torch.randn(6, 4), rows=rows3, residual=torch.randn(3, 4))),
    }


def tensor_arguments():
    return [(op, name) for op, (_, kwargs) in valid_calls().items() for name, value in kwargs.items()
            if isinstance(value, (torch.Tensor, TokenIndex))]


def test_every_public_op_is_walked():
    assert set(valid_calls()) == {name for name in sparse_ops.__all__ if callable(getattr(sparse_ops, name))} - {
        "TokenIndex", "backends", "no_index_checks", "set_sparsity", "window_grid"}


@pytest.mark.parametrize("op,name", tensor_arguments())
def test_every_tensor_argument_on_another_device(op, name):
    """The meta device stands in for a second device on machines without a GPU."""
    fn, kwargs = valid_calls()[op]
    fn(**kwargs)  # valid as given
    if sum(isinstance(v, (torch.Tensor, TokenIndex)) for v in kwargs.values()) < 2:
        pytest.skip("a single tensor argument: no other device to differ from")
    value = kwargs[name]
    if isinstance(value, TokenIndex):
        moved = TokenIndex(value.index.to("meta"), value.cu_seqlens.to("meta"), value.max_seqlen,
                           value.batch_size, value.seq_len)
    else:
        moved = value.to("meta")
    with pytest.raises(ValueError, match=rf"\b{name}(\.index)? is on meta"):
        fn(**{**kwargs, name: moved})


@pytest.mark.parametrize("op,name", [(op, name) for op, name in tensor_arguments() if name != "idx"])
def test_every_tensor_argument_with_a_wrong_dtype(op, name):
    """int32 where a float or an int64 tensor belongs, int64 for the int32 cu_seqlens. (A
    TokenIndex checks its fields' dtypes itself.)"""
    fn, kwargs = valid_calls()[op]
    value = kwargs[name]
    wrong = torch.int64 if value.dtype == torch.int32 else torch.int32
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        fn(**{**kwargs, name: value.to(wrong)})
