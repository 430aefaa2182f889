"""window_attention: Triton kernels (through the interpreter on the CPU) and the plain-PyTorch
path, against the reference, SDPA with the expanded mask and timm's WindowAttention, forward
and backward (dq, dk, dv and the bias gradient)."""
import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

from sparse_ops import reference
from sparse_ops.attention import _dispatch
from sparse_ops.attention.window import window_attention
from conftest import assert_close_to_reference, with_grad


def shift_mask(window_size):
    """timm's shift mask [4, n, n] (0 / -100) for a 2 x 2 grid of windows, shift window_size // 2."""
    block = SwinTransformerBlock(8, (2 * window_size, 2 * window_size), num_heads=1, window_size=window_size,
                                 shift_size=window_size // 2)
    mask = block.get_attn_mask()
    assert mask.shape == (4, window_size**2, window_size**2) and set(mask.unique().tolist()) == {-100.0, 0.0}
    return mask


def window_inputs(M, heads, n, head_dim, dtype, strided=True, bias=True, mask=True, bias_dtype=torch.float32):
    """q, k, v [M, H, n, D] (views of one packed qkv [M, n, 3*H*D], as timm makes them, when
    strided), window_ids, a random relative-position bias [H, n, n] and timm's shift mask."""
    if strided:
        qkv = torch.randn(M, n, 3 * heads * head_dim).to(dtype)
        q, k, v = qkv.reshape(M, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = (torch.randn(M, heads, n, head_dim).to(dtype) for _ in range(3))
    masks = shift_mask(int(n**0.5)) if mask else None
    window_ids = torch.randint(0, 4, (M,))
    return q, k, v, window_ids, torch.randn(heads, n, n).to(bias_dtype) if bias else None, masks


# (M, heads, n, D, scale, strided, bias, mask, bias in q's dtype): n = 25 is one query block of
# the interpreter's 32-row tiles and the others several, all with padding but 64; M = 7 and 5
# do not divide the interpreter's 3 windows per program, M = 1 is a single window.
CASES = [
    (7, 2, 49, 32, None, True, True, True, False),
    (5, 2, 64, 64, 0.3, False, True, True, True),
    (4, 3, 25, 32, None, True, True, False, False),
    (1, 2, 49, 64, None, True, False, True, False),
    (6, 2, 49, 32, 0.1, False, False, False, False),
    (2, 1, 144, 32, None, True, True, True, False),
]
CASE_IDS = [f"M{c[0]}-H{c[1]}-n{c[2]}-D{c[3]}" + "-bias" * c[6] + "-mask" * c[7] for c in CASES]


@pytest.mark.parametrize("M,heads,n,head_dim,scale,strided,bias,mask,bias_in_dtype", CASES, ids=CASE_IDS)
def test_matches_reference(path, dtype, nan_outputs, M, heads, n, head_dim, scale, strided, bias, mask, bias_in_dtype):
    """Forward and backward (dq, dk, dv, dbias) against the float64 reference, within twice the
    error of the reference run in the same dtype."""
    q, k, v, ids, b, masks = window_inputs(M, heads, n, head_dim, dtype, strided, bias, mask,
                                           dtype if bias_in_dtype else torch.float32)
    dout = torch.randn(M, n, heads, head_dim).to(dtype).transpose(1, 2)  # non-contiguous
    atol = 1e-5 if dtype == torch.float32 else 1e-6

    results = {}
    for name, run, run_dtype in (("ours", window_attention, dtype), ("low", reference.window_attention, dtype),
                                 ("high", reference.window_attention, torch.float64)):
        qg, kg, vg = with_grad(q, k, v, dtype=run_dtype)
        bg = with_grad(b, dtype=b.dtype if run_dtype == dtype else run_dtype)[0] if bias else None
        out = run(qg, kg, vg, ids, bg, masks, scale=scale)
        out.backward(dout.to(run_dtype))
        results[name] = (out, qg.grad, kg.grad, vg.grad) + ((bg.grad,) if bias else ())
    ours = results["ours"]
    assert ours[0].dtype == dtype and (not bias or ours[4].dtype == b.dtype)
    for actual, low, high in zip(*results.values()):
        assert actual.shape == high.shape
        assert_close_to_reference(actual, low, high, atol=atol)


@pytest.mark.parametrize("M,heads,n,head_dim,scale,strided,bias,mask,bias_in_dtype", CASES[:2], ids=CASE_IDS[:2])
def test_matches_sdpa(path, M, heads, n, head_dim, scale, strided, bias, mask, bias_in_dtype):
    """SDPA with the expanded mask bias + mask[window_ids] (what timm builds), gradients of the
    bias through it."""
    q, k, v, ids, b, masks = window_inputs(M, heads, n, head_dim, torch.float32, strided)
    dout = torch.randn_like(q)
    results = []
    for run in (lambda q, k, v, b: window_attention(q, k, v, ids, b, masks, scale=scale),
                lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, b + masks[ids].unsqueeze(1), scale=scale)):
        inputs = with_grad(q, k, v, b)
        out = run(*inputs)
        out.backward(dout)
        results.append([out] + [t.grad for t in inputs])
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)


def test_matches_timm(path):
    """timm's shifted WindowAttention, images after images of windows, with the rel-pos bias
    gradient reaching its table: out = proj(window_attention(q, k, v of qkv(x))), window m of
    the batch using mask m % nW."""
    torch.manual_seed(0)
    attn = WindowAttention(64, num_heads=2, window_size=7).eval()
    mask = shift_mask(7)
    x = torch.randn(2 * mask.shape[0], 49, 64)  # B = 2 images of 4 windows
    expected = attn(x, mask)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()

    M = x.shape[0]
    q, k, v = attn.qkv(x).reshape(M, 49, 3, 2, 32).permute(2, 0, 3, 1, 4)
    window_ids = torch.arange(M) % mask.shape[0]
    out = window_attention(q, k, v, window_ids, attn._get_rel_pos_bias()[0], mask)
    actual = attn.proj(out.transpose(1, 2).reshape(M, 49, 64))
    actual.sum().backward()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    for p, grad in zip(attn.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, grad, atol=1e-4, rtol=1e-4)


def test_masked_keys(path):
    """-inf mask entries (keys a row must not see, as in a boolean mask) get zero weight."""
    q, k, v, ids, b, _ = window_inputs(5, 2, 49, 32, torch.float32, mask=False)
    masks = torch.where(torch.rand(4, 49, 49) < 0.5, float("-inf"), 0.0)
    masks.diagonal(dim1=1, dim2=2).zero_()  # every row sees at least its own key
    inputs, expected = with_grad(q, k, v, b), with_grad(q, k, v, b, dtype=torch.float64)
    out = window_attention(*inputs[:3], ids, inputs[3], masks)
    out.sum().backward()
    expected_out = reference.window_attention(*expected[:3], ids, expected[3], masks.double())
    expected_out.sum().backward()
    for a, e in zip([out] + [t.grad for t in inputs], [expected_out] + [t.grad for t in expected]):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4)


def test_bias_without_grad(path):
    """A bias that needs no gradient (the kernel skips dbias) gives the same dq, dk, dv."""
    q, k, v, ids, b, masks = window_inputs(4, 2, 49, 32, torch.float32)
    grads = []
    for bias in with_grad(b)[0], b:
        inputs = with_grad(q, k, v)
        window_attention(*inputs, ids, bias, masks).sum().backward()
        grads.append([t.grad for t in inputs])
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e)


def test_empty(path):
    q, k, v, ids, b, masks = window_inputs(0, 2, 49, 32, torch.float32)
    inputs = with_grad(q, k, v, b)
    out = window_attention(*inputs[:3], ids, inputs[3], masks)
    out.sum().backward()
    assert out.shape == (0, 2, 49, 32)
    assert all(t.grad.shape == t.shape for t in inputs)
    assert torch.equal(inputs[3].grad, torch.zeros_like(b))


def test_gradcheck_float64():
    """float64 runs the plain-PyTorch path (on every device); gradients of q, k, v and bias."""
    q, k, v, ids, b, masks = window_inputs(3, 2, 9, 4, torch.float64, bias_dtype=torch.float64)
    assert not _dispatch.use_triton("window_attention", q)
    torch.autograd.gradcheck(lambda q, k, v, b: window_attention(q, k, v, ids, b, masks.double(), scale=0.7),
                             with_grad(q, k, v, b))


@pytest.mark.parametrize("bias,mask", [(True, True), (False, False)], ids=["bias-mask", "plain"])
def test_opcheck(path, bias, mask):
    q, k, v, ids, b, masks = window_inputs(4, 2, 25, 32, torch.float32, bias=bias, mask=mask)
    ops = torch.ops.sparse_ops
    inputs = with_grad(q, k, v) + (with_grad(b) if bias else [None])
    torch.library.opcheck(ops.window_attention_fwd, (*inputs[:3], ids, inputs[3], masks, 0.2))
    dout = torch.randn_like(q)
    out, lse = ops.window_attention_fwd(q, k, v, ids, b, masks, 0.2)
    torch.library.opcheck(ops.window_attention_bwd, (dout, q, k, v, out, lse, ids, b, masks, 0.2, bias))


@pytest.mark.parametrize("bias_grad", [True, False], ids=["bias-grad", "no-bias-grad"])
def test_compile(path, bias_grad):
    """fullgraph, forward and backward (without a bias gradient the CPU path runs the flash
    backward); the second batch (other M) is traced with dynamic shapes."""
    # the paths' outputs differ in strides (CPU flash: heads inner): nothing compiled for the
    # other path may be reused (a process runs one path; the tests switch it)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = torch.compile(window_attention, fullgraph=True)
        for M in (6, 3):
            q, k, v, ids, b, masks = window_inputs(M, 2, 25, 32, torch.float32)
            inputs, expected = with_grad(q, k, v) + [b], with_grad(q, k, v) + [b]
            if bias_grad:
                inputs[3], expected[3] = with_grad(b)[0], with_grad(b)[0]
            out = compiled(*inputs[:3], ids, inputs[3], masks, scale=0.25)
            out.sum().backward()
            expected_out = window_attention(*expected[:3], ids, expected[3], masks, scale=0.25)
            expected_out.sum().backward()
            torch.testing.assert_close(out, expected_out)
            for a, e in zip(inputs[:3 + bias_grad], expected):
                torch.testing.assert_close(a.grad, e.grad)


q4 = torch.randn(3, 2, 4, 8)
ids3 = torch.tensor([0, 1, 0])
bias4 = torch.randn(2, 4, 4)
mask4 = torch.zeros(2, 4, 4)
BAD = {
    "q rank": (lambda: window_attention(q4[0], q4, q4, ids3), ValueError, "q must be 4-D"),
    "k rank": (lambda: window_attention(q4, q4[None], q4, ids3), ValueError, "k must be 4-D"),
    "v shape": (lambda: window_attention(q4, q4, q4[:, :1], ids3), ValueError, "v must have q's shape"),
    "q type": (lambda: window_attention([1.0], q4, q4, ids3), TypeError, "q must be a tensor"),
    "q dtype": (lambda: window_attention(q4.int(), q4, q4, ids3), TypeError, "q must have dtype"),
    "k dtype": (lambda: window_attention(q4, q4.half(), q4, ids3), TypeError, "k must have q's dtype"),
    "no tokens": (lambda: window_attention(*[q4[:, :, :0]] * 3, ids3), ValueError,
                  "at least one head, token and channel"),
    "ids dtype": (lambda: window_attention(q4, q4, q4, ids3.int()), TypeError, "window_ids must have dtype int64"),
    "ids rank": (lambda: window_attention(q4, q4, q4, ids3[None]), ValueError, "window_ids must be 1-D"),
    "ids length": (lambda: window_attention(q4, q4, q4, ids3[:2]), ValueError,
                   r"window_ids must have one entry .*M = 3"),
    "ids range": (lambda: window_attention(q4, q4, q4, ids3 + 1, mask=mask4), ValueError,
                  r"window_ids has entries outside \[0, 2\)"),
    "ids negative": (lambda: window_attention(q4, q4, q4, ids3 - 1, mask=mask4), ValueError, "window_ids has entries"),
    "bias rank": (lambda: window_attention(q4, q4, q4, ids3, bias=bias4[0]), ValueError, "bias must be 3-D"),
    "bias shape": (lambda: window_attention(q4, q4, q4, ids3, bias=bias4[:1]), ValueError,
                   r"bias must have shape \[H, n, n\] = \[2, 4, 4\]"),
    "bias dtype": (lambda: window_attention(q4, q4, q4, ids3, bias=bias4.half()), TypeError, "bias must have dtype"),
    "mask rank": (lambda: window_attention(q4, q4, q4, ids3, mask=mask4[0]), ValueError, "mask must be 3-D"),
    "mask shape": (lambda: window_attention(q4, q4, q4, ids3, mask=mask4[:, :3]), ValueError,
                   r"mask must have shape \[nW, n, n\]"),
    "mask dtype": (lambda: window_attention(q4, q4, q4, ids3, mask=mask4.bool()), TypeError, "mask must have dtype"),
    "device": (lambda: window_attention(q4, q4.to("meta"), q4, ids3), ValueError, "k is on meta"),
    "ids device": (lambda: window_attention(q4, q4, q4, ids3.to("meta")), ValueError, "window_ids is on meta"),
    "bias device": (lambda: window_attention(q4, q4, q4, ids3, bias=bias4.to("meta")), ValueError, "bias is on meta"),
    "mask device": (lambda: window_attention(q4, q4, q4, ids3, mask=mask4.to("meta")), ValueError, "mask is on meta"),
    "scale type": (lambda: window_attention(q4, q4, q4, ids3, scale="x"), TypeError, "scale must be a float"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input(case):
    call, error, message = BAD[case]
    with pytest.raises(error, match=message):
        call()
