"""window_attention with SAM's decomposed relative position (rel_pos = (rel_h, rel_w), added
inside the kernels): the reference against timm's get_decomposed_rel_pos_bias, the Triton
kernels (through the interpreter, both kernel sets) and the plain-PyTorch path against the
float64 reference, forward and backward (q, k, v, rel_h, rel_w), the custom ops' checks,
torch.compile, bad input, and timm's SAM Attention end to end."""
import pytest
import torch
from timm.models.vision_transformer_sam import Attention, get_decomposed_rel_pos_bias

from sparse_ops import reference
from sparse_ops.attention import _dispatch
from sparse_ops.attention.window import decomposed_rel_pos, window_attention
from conftest import assert_close_to_reference, needs_interpreter, with_grad


def rel_inputs(M, heads, window, head_dim, dtype, rel_dtype=None, mask=False):
    """q, k, v [M, H, n, D] (views of one packed qkv, as timm makes them), window_ids, random
    rel_h [M, H, n, wh] and rel_w [M, H, n, ww] (non-contiguous: heads outer of rows, and a
    column stride of 2), and a random 0 / -100 mask [3, n, n] (every row sees its own key)."""
    wh, ww = window
    n = wh * ww
    qkv = torch.randn(M, n, 3 * heads * head_dim).to(dtype)
    q, k, v = qkv.reshape(M, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    rel_h = torch.randn(M, n, heads, wh).to(rel_dtype or dtype).transpose(1, 2)
    rel_w = torch.randn(M, heads, n, 2 * ww).to(rel_dtype or dtype)[..., ::2]
    masks = None
    if mask:
        masks = torch.where(torch.rand(3, n, n) < 0.3, -100.0, 0.0)
        masks.diagonal(dim1=1, dim2=2).zero_()
    return q, k, v, torch.randint(0, 3, (M,)), rel_h, rel_w, masks


def compare_with_reference(q, k, v, ids, rel_h, rel_w, masks, scale, atol):
    """Output and the gradients of q, k, v, rel_h, rel_w (and of a per-head scale tensor)
    against the float64 reference, within twice the error of the reference run in q's dtype."""
    dout = torch.randn(q.shape).to(q.dtype)
    results = []
    for run, run_dtype in ((window_attention, q.dtype), (reference.window_attention, q.dtype),
                           (reference.window_attention, torch.float64)):
        high = run_dtype == torch.float64
        qg, kg, vg = with_grad(q, k, v, dtype=run_dtype)
        hg, wg = with_grad(rel_h, rel_w, dtype=torch.float64 if high else None)
        sg = with_grad(scale, dtype=torch.float64 if high else None)[0] if isinstance(scale, torch.Tensor) else scale
        m = None if masks is None else masks.to(run_dtype)
        if run is window_attention:
            out = run(qg, kg, vg, ids, mask=m, scale=sg, rel_pos=(hg, wg))
        else:
            out = run(qg, kg, vg, ids, None, m, sg, hg, wg)
        out.backward(dout.to(run_dtype))
        results.append([out] + [t.grad for t in (qg, kg, vg, hg, wg, sg) if isinstance(t, torch.Tensor)])
    ours = results[0]
    assert ours[0].dtype == q.dtype and ours[4].dtype == rel_h.dtype and ours[5].dtype == rel_w.dtype
    for actual, low, high in zip(*results):
        assert actual.shape == high.shape
        assert_close_to_reference(actual, low, high, atol=atol)


# ------------------------------------------------------------------------ the reference
@pytest.mark.parametrize("window,lengths", [((14, 14), (27, 27)), ((16, 16), (27, 31)), ((6, 4), (11, 9))],
                         ids=["14x14", "16x16-resized", "6x4-resized"])
def test_reference_matches_timm(window, lengths):
    """reference.decomposed_rel_pos, expanded as timm expands it, is timm's bias [M * H, n, n];
    tables whose length is not 2 * w - 1 are resized as timm's get_rel_pos resizes them."""
    M, heads, D = 2, 3, 8
    wh, ww = window
    q = torch.randn(M, heads, wh * ww, D, dtype=torch.float64)
    table_h, table_w = (torch.randn(length, D, dtype=torch.float64) for length in lengths)
    rel_h, rel_w = reference.decomposed_rel_pos(q, table_h, table_w, window)
    assert rel_h.shape == (M, heads, wh * ww, wh) and rel_w.shape == (M, heads, wh * ww, ww)
    expected = get_decomposed_rel_pos_bias(q.reshape(M * heads, wh * ww, D), table_h, table_w, window, window)
    expanded = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(M * heads, wh * ww, wh * ww)
    torch.testing.assert_close(expanded, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("window,lengths", [((4, 4), (7, 7)), ((6, 4), (11, 9))], ids=["4x4", "6x4-resized"])
def test_decomposed_rel_pos(window, lengths):
    """The differentiable decomposed_rel_pos: the reference's values for a strided q, q's dtype
    from float32 tables, and gradients of q and both tables (gradcheck in float64)."""
    wh, ww = window
    n, D = wh * ww, 8
    q = torch.randn(2, n, 3, D, dtype=torch.float64).transpose(1, 2)  # [M, H, n, D], heads inner
    table_h, table_w = (torch.randn(length, D, dtype=torch.float64) for length in lengths)
    for actual, expected in zip(decomposed_rel_pos(q, table_h, table_w, window),
                                reference.decomposed_rel_pos(q, table_h, table_w, window)):
        torch.testing.assert_close(actual, expected)
    low = decomposed_rel_pos(q.half(), table_h.float(), table_w.float(), window)
    assert all(t.dtype == torch.float16 for t in low)
    torch.autograd.gradcheck(lambda *t: decomposed_rel_pos(*t, window), with_grad(q, table_h, table_w))


# -------------------------------------------------------- the op against the reference
# (M, heads, window, D, mask, scale): 14x14 is 196 tokens padded to 256 keys, 4x4 one
# query block of the interpreter's 32-row tiles, 6x4 a non-square window.
CASES = [(2, 2, (14, 14), 32, False, None), (5, 2, (4, 4), 16, True, 0.3), (4, 3, (6, 4), 32, True, "head"),
         (3, 1, (6, 4), 16, False, None)]
CASE_IDS = [f"M{c[0]}-H{c[1]}-{c[2][0]}x{c[2][1]}" + "-mask" * c[4] + "-head-scale" * (c[5] == "head") for c in CASES]
LOW_ATOL = {torch.float32: 1e-5, torch.float16: 1e-6}


def case_scale(scale, heads):
    return torch.rand(heads) + 0.5 if scale == "head" else scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("M,heads,window,head_dim,mask,scale", CASES, ids=CASE_IDS)
def test_matches_reference(path, nan_outputs, dtype, M, heads, window, head_dim, mask, scale):
    """The CPU PyTorch path and the one-block kernels, with and without a mask and a per-head
    scale; rel_h and rel_w in q's dtype, non-contiguous."""
    q, k, v, ids, rel_h, rel_w, masks = rel_inputs(M, heads, window, head_dim, dtype, mask=mask)
    compare_with_reference(q, k, v, ids, rel_h, rel_w, masks, case_scale(scale, heads), LOW_ATOL[dtype])


def test_float32_rel_pos_with_float16_q(path):
    """rel_h and rel_w may be float32 with a float16 q; their gradients come back float32."""
    q, k, v, ids, rel_h, rel_w, masks = rel_inputs(3, 2, (4, 4), 16, torch.float16, torch.float32, mask=True)
    compare_with_reference(q, k, v, ids, rel_h, rel_w, masks, None, LOW_ATOL[torch.float16])


@pytest.fixture
def kernels(monkeypatch):
    """The Triton kernels on CPU tensors (through the interpreter), as a module to configure."""
    monkeypatch.setattr(_dispatch, "use_triton", lambda name, q: True)
    return _dispatch.triton_kernels("window_attention")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("M,heads,window,head_dim,mask,scale", CASES[1:], ids=CASE_IDS[1:])
def test_key_block_kernels(kernels, monkeypatch, nan_outputs, dtype, M, heads, window, head_dim, mask, scale):
    """Small windows forced through the key-block kernels (several query and key blocks, the
    dq kernel summing drel over them)."""
    monkeypatch.setattr(kernels, "MAX_ONE_BLOCK_KEYS", 8)
    q, k, v, ids, rel_h, rel_w, masks = rel_inputs(M, heads, window, head_dim, dtype, mask=mask)
    compare_with_reference(q, k, v, ids, rel_h, rel_w, masks, case_scale(scale, heads), LOW_ATOL[dtype])


@needs_interpreter
def test_large_window(kernels, nan_outputs):
    """18x18 windows (324 tokens, over 256 keys): the key-block kernels as they are chosen."""
    assert not kernels.one_key_block(324)
    q, k, v, ids, rel_h, rel_w, masks = rel_inputs(1, 1, (18, 18), 16, torch.float32, mask=True)
    compare_with_reference(q, k, v, ids, rel_h, rel_w, masks, torch.rand(1) + 0.5, LOW_ATOL[torch.float32])


def test_gradcheck_float64():
    """float64 runs the plain-PyTorch path: the public op through SAM's tables (torch's
    autograd), and the custom op itself (its backward's drel_h, drel_w from dS)."""
    q, k, v, ids, rel_h, rel_w, masks = rel_inputs(2, 2, (3, 2), 4, torch.float64, mask=True)
    masks = masks.double()
    tables = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert not _dispatch.use_triton("window_attention", q)
    torch.autograd.gradcheck(
        lambda q, k, v, th, tw: window_attention(q, k, v, ids, mask=masks, scale=0.7,
                                                 rel_pos=decomposed_rel_pos(q, th, tw, (3, 2))),
        with_grad(q, k, v, *tables))
    op = torch.ops.sparse_ops.window_attention_fwd
    torch.autograd.gradcheck(lambda q, k, v, s, h, w: op(q, k, v, ids, None, masks, 0.7, s, h, w)[0],
                             with_grad(q, k, v, torch.rand(2, dtype=torch.float64) + 0.5, rel_h, rel_w))


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "plain"])
def test_opcheck(path, mask):
    q, k, v, ids, rel_h, rel_w, masks = rel_inputs(3, 2, (6, 4), 32, torch.float32, mask=mask)
    ops = torch.ops.sparse_ops
    inputs = with_grad(q, k, v, rel_h, rel_w)
    torch.library.opcheck(ops.window_attention_fwd, (*inputs[:3], ids, None, masks, 0.2, None, *inputs[3:]))
    out, lse = ops.window_attention_fwd(q, k, v, ids, None, masks, 0.2, None, rel_h, rel_w)
    torch.library.opcheck(ops.window_attention_bwd,
                          (torch.randn_like(q), q, k, v, out, lse, ids, None, masks, 0.2, False, None, rel_h, rel_w))


def test_compile(path):
    """fullgraph: SAM's tables -> decomposed_rel_pos -> window_attention, forward and backward,
    as eager; the second batch (other M) traced with dynamic shapes."""
    torch._dynamo.reset()  # the paths' outputs differ in strides: reuse nothing compiled for the other
    tables = torch.randn(9, 32), torch.randn(7, 32)

    def sam_attention(q, k, v, ids, table_h, table_w):
        return window_attention(q, k, v, ids, rel_pos=decomposed_rel_pos(q, table_h, table_w, (5, 4)))

    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = torch.compile(sam_attention, fullgraph=True)
        for M in (4, 2):
            q, k, v, ids, _, _, _ = rel_inputs(M, 2, (5, 4), 32, torch.float32)
            inputs, expected = with_grad(q, k, v, *tables), with_grad(q, k, v, *tables)
            out = compiled(*inputs[:3], ids, *inputs[3:])
            out.sum().backward()
            expected_out = sam_attention(*expected[:3], ids, *expected[3:])
            expected_out.sum().backward()
            torch.testing.assert_close(out, expected_out)
            for a, e in zip(inputs, expected):
                torch.testing.assert_close(a.grad, e.grad, atol=1e-5, rtol=1e-4)


def test_empty(path):
    q, k, v, ids, rel_h, rel_w, _ = rel_inputs(0, 2, (4, 4), 16, torch.float32)
    inputs = with_grad(q, k, v, rel_h, rel_w)
    out = window_attention(*inputs[:3], ids, rel_pos=tuple(inputs[3:]))
    out.sum().backward()
    assert out.shape == (0, 2, 16, 16)
    assert all(t.grad.shape == t.shape for t in inputs)


q4 = torch.randn(3, 2, 6, 8)
ids3 = torch.tensor([0, 1, 0])
rel_h4, rel_w4 = torch.randn(3, 2, 6, 3), torch.randn(3, 2, 6, 2)
BAD = {
    "not a pair": (lambda: window_attention(q4, q4, q4, ids3, rel_pos=rel_h4), TypeError,
                   r"rel_pos must be a pair \(rel_h, rel_w\)"),
    "one tensor": (lambda: window_attention(q4, q4, q4, ids3, rel_pos=(rel_h4,)), TypeError, "rel_pos must be a pair"),
    "rel_h type": (lambda: window_attention(q4, q4, q4, ids3, rel_pos=(1.0, rel_w4)), TypeError,
                   r"rel_pos\[0\] \(rel_h\) must be a tensor"),
    "rel_h rank": (lambda: window_attention(q4, q4, q4, ids3, rel_pos=(rel_h4[0], rel_w4)), ValueError,
                   r"rel_pos\[0\] \(rel_h\) must be 4-D"),
    "rel_w shape": (lambda: window_attention(q4, q4, q4, ids3, rel_pos=(rel_h4, rel_w4[:, :1])), ValueError,
                    r"rel_pos\[1\] \(rel_w\) must have shape \[M, H, n, ww\] with \[M, H, n\] = \[3, 2, 6\]"),
    "window size": (lambda: window_attention(q4, q4, q4, ids3, rel_pos=(rel_h4, rel_w4[..., :1])), ValueError,
                    r"rel_pos must cover windows of wh x ww = n = 6 tokens"),
    "rel_h dtype": (lambda: window_attention(q4, q4, q4, ids3, rel_pos=(rel_h4.half(), rel_w4)), TypeError,
                    r"rel_pos\[0\] \(rel_h\) must have dtype"),
    "rel_w dtype": (lambda: window_attention(q4, q4, q4, ids3, rel_pos=(rel_h4, rel_w4.int())), TypeError,
                    r"rel_pos\[1\] \(rel_w\) must have dtype"),
    "rel_w device": (lambda: window_attention(q4, q4, q4, ids3, rel_pos=(rel_h4, rel_w4.to("meta"))), ValueError,
                     "rel_w is on meta"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input(case):
    call, error, message = BAD[case]
    with pytest.raises(error, match=message):
        call()


# ----------------------------------------------------------------------- timm's SAM
def test_matches_timm_sam_attention(path):
    """timm's SAM Attention (decomposed relative position, 14x14 windows) on a batch of
    windows: proj(window_attention(q, k, v of its qkv, rel_pos=decomposed_rel_pos(q, its
    tables))), forward and every parameter's gradient (the tables' through q . R)."""
    torch.manual_seed(0)
    dim, heads, side = 64, 2, 14
    attn = Attention(dim, num_heads=heads, use_rel_pos=True, input_size=(side, side)).eval()
    with torch.no_grad():
        attn.rel_pos_h.normal_(std=0.5)
        attn.rel_pos_w.normal_(std=0.5)
    x = torch.randn(3, side, side, dim)
    expected = attn(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()

    M, n = x.shape[0], side * side
    q, k, v = attn.qkv(x.reshape(M, n, dim)).reshape(M, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    rel_pos = decomposed_rel_pos(q, attn.rel_pos_h, attn.rel_pos_w, (side, side))
    out = window_attention(q, k, v, torch.zeros(M, dtype=torch.long), rel_pos=rel_pos)
    actual = attn.proj(out.transpose(1, 2).reshape(M, n, dim)).view(M, side, side, dim)
    actual.sum().backward()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    for p, grad in zip(attn.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, grad, atol=1e-4, rtol=1e-4)
