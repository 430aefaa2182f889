"""varlen_attention: Triton kernels (through the interpreter on the CPU) and the plain-PyTorch
path, against the reference and per-sequence SDPA, forward and backward, cls_attn side output."""
import math

import pytest
import torch
import torch.nn.functional as F

import sparse_ops
from sparse_ops import reference
from sparse_ops.attention.varlen import varlen_attention
from conftest import assert_close_to_reference, needs_interpreter, with_grad


def packed_inputs(lengths, heads, head_dim, dtype, device="cpu", strided=False):
    """q, k, v [T, H, D] (slices of one packed qkv [T, 3, H, D] when strided), cu_seqlens, max_seqlen."""
    T = sum(lengths)
    if strided:
        q, k, v = torch.randn(T, 3, heads, head_dim, device=device).to(dtype).unbind(1)
    else:
        q, k, v = (torch.randn(T, heads, head_dim, device=device).to(dtype) for _ in range(3))
    cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    return q, k, v, cu_seqlens, max(lengths, default=0)


# (lengths, heads, head_dim, scale, strided q/k/v): lengths of 1 and 0, sequences shorter and
# longer than the interpreter's 32 x 16 tiles, every supported head dim, packed-qkv slices.
CASES = [
    ([1, 37, 0, 20], 3, 32, None, True),
    ([50, 3], 2, 64, None, False),
    ([17, 1, 33], 2, 80, 0.3, True),
    ([40], 1, 96, None, False),
    ([9, 24, 1], 2, 128, 0.05, True),
    # runs of equal lengths (one attention call each on the CPU), across an empty sequence
    ([6, 6, 0, 6, 1, 1, 9], 2, 32, None, True),
    ([8, 8, 8], 2, 64, None, False),  # a fixed keep rate: one run
]
CASE_IDS = [f"D{c[2]}-L{'_'.join(map(str, c[0]))}" for c in CASES]


@pytest.mark.parametrize("lengths,heads,head_dim,scale,strided", CASES, ids=CASE_IDS)
def test_matches_reference(path, device, dtype, nan_outputs, lengths, heads, head_dim, scale, strided):
    """Forward (out and cls_attn) and backward against the float64 reference, within twice the
    error of the reference run in the same dtype."""
    q, k, v, cu, max_seqlen = packed_inputs(lengths, heads, head_dim, dtype, device, strided)
    dout = torch.randn(heads, q.shape[0], head_dim, device=device).to(dtype).transpose(0, 1)  # non-contiguous
    atol = 1e-5 if dtype == torch.float32 else 1e-6

    results = {}
    for name, run, run_dtype in (("ours", varlen_attention, dtype), ("low", reference.varlen_attention, dtype),
                                 ("high", reference.varlen_attention, torch.float64)):
        qg, kg, vg = with_grad(q, k, v, dtype=run_dtype)
        out, cls_attn = run(qg, kg, vg, cu, max_seqlen, scale=scale, return_cls_attn=True)
        out.backward(dout.to(run_dtype))
        results[name] = (out, cls_attn, qg.grad, kg.grad, vg.grad)
    assert results["ours"][0].dtype == dtype and results["ours"][1].dtype == torch.float32
    for ours, low, high in zip(*results.values()):
        assert ours.shape == high.shape
        assert_close_to_reference(ours, low, high, atol=atol)


@pytest.mark.parametrize("lengths,heads,head_dim,scale,strided", CASES[:2], ids=CASE_IDS[:2])
def test_matches_sdpa(path, device, lengths, heads, head_dim, scale, strided):
    q, k, v, cu, max_seqlen = packed_inputs(lengths, heads, head_dim, torch.float32, device, strided)
    dout = torch.randn_like(q)
    qg, kg, vg = with_grad(q, k, v)
    out = varlen_attention(qg, kg, vg, cu, max_seqlen, scale=scale)
    out.backward(dout)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = with_grad(*(t[start:end].transpose(0, 1) for t in (q, k, v)))
        expected_out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        expected_out.backward(dout[start:end].transpose(0, 1))
        for actual, expected in zip((out, qg.grad, kg.grad, vg.grad), (expected_out, qs.grad, ks.grad, vs.grad)):
            torch.testing.assert_close(actual[start:end], expected.transpose(0, 1), atol=2e-5, rtol=1e-4)


def test_cls_attn(path, device):
    """Same out with and without cls_attn; cls_attn is each sequence's first attention row
    (so it sums to 1 per sequence) and carries no gradient."""
    q, k, v, cu, max_seqlen = packed_inputs([5, 1, 0, 30], 3, 32, torch.float32, device)
    qg, kg, vg = with_grad(q, k, v)
    out, cls_attn = varlen_attention(qg, kg, vg, cu, max_seqlen, return_cls_attn=True)
    assert torch.equal(out, varlen_attention(q, k, v, cu, max_seqlen))
    assert not cls_attn.requires_grad and out.requires_grad
    sequence_of_token = torch.repeat_interleave(torch.arange(4, device=device), cu.diff())
    sums = torch.zeros(4, device=device).index_add_(0, sequence_of_token, cls_attn)
    torch.testing.assert_close(sums.cpu(), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(cls_attn[5].cpu(), torch.tensor(1.0))  # a single token attends only to itself


def test_scores_far_below_zero(path, device):
    """All scores near -300 (a uniform softmax): keys past a sequence's end, read as zeros,
    would score 0 and overflow exp(score - lse) if the kernels did not mask them. In float32,
    p = exp(score - lse) is then only good to about 300 eps relative, and |q| ~ 300 scales
    that into dk: the tolerance is relative to each output's largest entry."""
    q, k, v, cu, max_seqlen = packed_inputs([5, 21], 2, 32, torch.float32, device)
    k = k[:1].expand_as(k)
    q = -300 * k / k.square().sum(-1, keepdim=True) * 32**0.5
    qg, kg, vg = with_grad(q, k, v)
    out, cls_attn = varlen_attention(qg, kg, vg, cu, max_seqlen, return_cls_attn=True)
    out.sum().backward()
    expected = with_grad(q, k, v, dtype=torch.float64)
    expected_out, expected_cls = reference.varlen_attention(*expected, cu, max_seqlen, return_cls_attn=True)
    expected_out.sum().backward()
    actual = (out, cls_attn, qg.grad, kg.grad, vg.grad)
    for a, e in zip(actual, (expected_out, expected_cls, *(t.grad for t in expected))):
        torch.testing.assert_close(a.double(), e, atol=3e-4 * max(e.abs().max().item(), 1.0), rtol=0)


@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 4]], ids=["B0", "empty", "empty-first"])
def test_empty(path, device, lengths):
    q, k, v, cu, max_seqlen = packed_inputs(lengths, 2, 32, torch.float32, device)
    qg, kg, vg = with_grad(q, k, v)
    out, cls_attn = varlen_attention(qg, kg, vg, cu, max_seqlen, return_cls_attn=True)
    out.sum().backward()
    expected_out, expected_cls = reference.varlen_attention(q, k, v, cu, max_seqlen, return_cls_attn=True)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(cls_attn, expected_cls)
    assert qg.grad.shape == kg.grad.shape == vg.grad.shape == q.shape


# (cu_seqlens, rows of a first sequence that no other overlaps): past T, decreasing, negative.
UNCHECKED = [([0, 4, 5000], 4), ([0, 4, 2, 10], 0), ([-100, 4, 10], 0)]


@pytest.mark.parametrize("bounds,intact", UNCHECKED, ids=["past-T", "decreasing", "negative"])
def test_unchecked_cu_seqlens_stay_in_bounds(path, device, bounds, intact):
    """Under no_index_checks a bad cu_seqlens gives meaningless rows, never an access outside
    q, k, v or the outputs (the kernels clamp each sequence to the T rows); a sequence it
    describes correctly is still right."""
    q, k, v, _, _ = packed_inputs([10], 2, 16, torch.float32, device)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    with sparse_ops.no_index_checks():
        out, cls_attn = varlen_attention(*with_grad(q, k, v), cu, 10, return_cls_attn=True)
        out.sum().backward()
    assert out.shape == q.shape and cls_attn.shape == (10,)
    if intact:
        first = reference.varlen_attention(q[:intact], k[:intact], v[:intact], cu[:2], intact)
        torch.testing.assert_close(out[:intact], first)


def test_matmul_path_matches_cpu_flash():
    """The PyTorch path's attention off the CPU (float64 on CUDA: matmuls) against the CPU
    flash kernel it uses on the CPU, forward and backward, on one run [n, H, L, D]."""
    from sparse_ops.attention import varlen

    q, k, v, dout = (torch.randn(3, 2, 11, 16, dtype=torch.float64) for _ in range(4))
    out, lse = varlen._attend(q, k, v, 0.3)
    expected_out, expected_lse = varlen._attend_matmul(q, k, v, 0.3)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse)
    grads = varlen._attend_backward(dout, q, k, v, out, lse, 0.3)
    for g, expected in zip(grads, varlen._attend_backward_matmul(dout, q, k, v, out, lse, 0.3)):
        torch.testing.assert_close(g, expected)


def test_gradcheck_float64():
    q, k, v, cu, max_seqlen = packed_inputs([3, 1, 0, 4], 2, 8, torch.float64, strided=True)
    torch.autograd.gradcheck(lambda q, k, v: varlen_attention(q, k, v, cu, max_seqlen, scale=0.7),
                             with_grad(q, k, v))


@pytest.mark.parametrize("return_cls_attn", [False, True])
def test_opcheck(path, return_cls_attn):
    q, k, v, cu, max_seqlen = packed_inputs([6, 1, 0, 19], 2, 32, torch.float32, strided=True)
    qg, kg, vg = with_grad(q, k, v)
    ops = torch.ops.sparse_ops
    torch.library.opcheck(ops.varlen_attention_fwd, (qg, kg, vg, cu, max_seqlen, 0.2, return_cls_attn))
    out, lse, _ = ops.varlen_attention_fwd(q, k, v, cu, max_seqlen, 0.2, False)
    torch.library.opcheck(ops.varlen_attention_bwd, (torch.randn_like(out), q, k, v, out, lse, cu, max_seqlen, 0.2))


def test_compile():
    """fullgraph, forward and backward; the second batch (other T and max_seqlen) is traced
    with dynamic shapes."""
    compiled = torch.compile(varlen_attention, fullgraph=True)
    for lengths in ([7, 1, 20], [3, 0, 12, 5]):
        q, k, v, cu, max_seqlen = packed_inputs(lengths, 2, 32, torch.float32)
        qg, kg, vg = with_grad(q, k, v)
        out, cls_attn = compiled(qg, kg, vg, cu, max_seqlen, return_cls_attn=True)
        out.sum().backward()
        expected = with_grad(q, k, v)
        expected_out, expected_cls = varlen_attention(*expected, cu, max_seqlen, return_cls_attn=True)
        expected_out.sum().backward()
        torch.testing.assert_close(out, expected_out)
        torch.testing.assert_close(cls_attn, expected_cls)
        for a, e in zip((qg, kg, vg), expected):
            torch.testing.assert_close(a.grad, e.grad)


q3 = torch.randn(10, 2, 16)
cu3 = torch.tensor([0, 4, 10], dtype=torch.int32)
BAD = {
    "q rank": (lambda: varlen_attention(q3[0], q3, q3, cu3, 6), ValueError, "q must be 3-D"),
    "k rank": (lambda: varlen_attention(q3, q3[None], q3, cu3, 6), ValueError, "k must be 3-D"),
    "v shape": (lambda: varlen_attention(q3, q3, q3[:, :1], cu3, 6), ValueError, "v must have q's shape"),
    "q type": (lambda: varlen_attention([1.0], q3, q3, cu3, 6), TypeError, "q must be a tensor"),
    "q dtype": (lambda: varlen_attention(q3.int(), q3, q3, cu3, 6), TypeError, "q must have dtype"),
    "k dtype": (lambda: varlen_attention(q3, q3.half(), q3, cu3, 6), TypeError, "k must have q's dtype"),
    "no heads": (lambda: varlen_attention(q3[:, :0], q3[:, :0], q3[:, :0], cu3, 6), ValueError,
                 "at least one head, token and channel"),
    "device": (lambda: varlen_attention(q3, q3.to("meta"), q3, cu3, 6), ValueError, "k is on meta"),
    "cu_seqlens device": (lambda: varlen_attention(q3, q3, q3, cu3.to("meta"), 6), ValueError, "cu_seqlens is on meta"),
    "cu_seqlens dtype": (lambda: varlen_attention(q3, q3, q3, cu3.long(), 6), TypeError, "cu_seqlens must have dtype int32"),
    "cu_seqlens rank": (lambda: varlen_attention(q3, q3, q3, cu3[None], 6), ValueError, "cu_seqlens must be 1-D"),
    "cu_seqlens empty": (lambda: varlen_attention(q3, q3, q3, cu3[:0], 6), ValueError, "cu_seqlens must have B"),
    "cu_seqlens start": (lambda: varlen_attention(q3, q3, q3, cu3 + 1, 6), ValueError, "cu_seqlens must start at 0"),
    "cu_seqlens end": (lambda: varlen_attention(q3, q3, q3, cu3[:2], 6), ValueError, "and end at T = 10"),
    "cu_seqlens decreasing": (lambda: varlen_attention(q3, q3, q3, torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6),
                              ValueError, "cu_seqlens must be non-decreasing"),
    "max_seqlen small": (lambda: varlen_attention(q3, q3, q3, cu3, 5), ValueError, r"max_seqlen \(5\) is less"),
    "max_seqlen type": (lambda: varlen_attention(q3, q3, q3, cu3, 6.0), TypeError, "max_seqlen must be an int"),
    "scale type": (lambda: varlen_attention(q3, q3, q3, cu3, 6, scale="x"), TypeError, "scale must be a float"),
    "return_cls_attn type": (lambda: varlen_attention(q3, q3, q3, cu3, 6, return_cls_attn=1), TypeError,
                             "return_cls_attn must be a bool"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input(case):
    call, error, message = BAD[case]
    with pytest.raises(error, match=message):
        call()


def test_grid_fits_cuda_limits():
    """More sequences than CUDA allows on a grid's y and z axes (65535): the kernels number
    sequence blocks on axis x, whose limit is 2**31 - 1."""
    from sparse_ops.kernels import varlen_attention as kernels

    grid = kernels._grid("BLOCK_M", 12, 197, 100_000)({"BLOCK_M": 64})
    assert all(size <= 65535 for size in grid[1:]) and grid[0] <= 2**31 - 1
    assert math.prod(grid) == 100_000 * 4 * 12


@needs_interpreter
def test_head_offsets_past_int32():
    """q, k, v and dout whose head stride times the head passes 2**31 elements (a [H, T, D]
    tensor viewed [T, H, D]): the kernels' offsets are int64 (in int32 head 2 would read the
    storage's start)."""
    from sparse_ops.kernels import varlen_attention as kernels
    from test_window_attention import huge_head_stride_views

    q, k, v, dout = huge_head_stride_views((16, 3, 16), 4)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    out, lse, cls_attn = kernels.forward(q, k, v, cu, 11, 0.25, True)
    grads = kernels.backward(dout, q, k, v, out, lse, cu, 11, 0.25)
    leaves = with_grad(q, k, v, dtype=torch.float64)
    expected, expected_cls = reference.varlen_attention(*leaves, cu, 11, scale=0.25, return_cls_attn=True)
    expected.backward(dout.double())
    for actual, wanted in zip([out, cls_attn, *grads], [expected, expected_cls] + [t.grad for t in leaves]):
        torch.testing.assert_close(actual.double(), wanted, atol=2e-2, rtol=1e-2)
