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
from conftest import assert_close_to_reference, needs_interpreter, with_grad


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


# ------------------------------------------- the kernels: key blocks, partial sums, offsets
def compare_with_reference(q, k, v, ids, bias, masks, scale, atol=1e-5):
    """window_attention's output and its gradients of q, k, v, bias and a per-head scale
    tensor (where given) against the float64 reference, within twice the error of the
    reference run in q's dtype."""
    dout = torch.randn(q.shape).to(q.dtype)
    results = []
    for run, run_dtype in ((window_attention, q.dtype), (reference.window_attention, q.dtype),
                           (reference.window_attention, torch.float64)):
        def leaf(t):  # a tensor in the run's precision (bias and scale: float32 or float64)
            high = run_dtype == torch.float64
            return with_grad(t, dtype=torch.float64 if high else t.dtype)[0] if isinstance(t, torch.Tensor) else t

        qg, kg, vg = with_grad(q, k, v, dtype=run_dtype)
        bg, sg = leaf(bias), leaf(scale)
        out = run(qg, kg, vg, ids, bg, masks, scale=sg)
        out.backward(dout.to(run_dtype))
        results.append([out] + [t.grad for t in (qg, kg, vg, bg, sg) if isinstance(t, torch.Tensor)])
    for actual, low, high in zip(*results):
        assert actual.shape == high.shape
        assert_close_to_reference(actual, low, high, atol=atol)


@pytest.fixture
def kernels(monkeypatch):
    """The Triton kernels on CPU tensors (through the interpreter), as a module to configure."""
    monkeypatch.setattr(_dispatch, "use_triton", lambda name, q: True)
    return _dispatch.triton_kernels("window_attention")


@needs_interpreter
@pytest.mark.parametrize("M,heads,n", [(2, 1, 324), (1, 1, 576)], ids=["n324", "n576"])
def test_large_windows(kernels, M, heads, n):
    """Swin V2's 18x18 and 24x24 windows, over 256 keys: the key-block kernels (several blocks
    of queries and keys), with bias, shift mask and per-head scale, and their gradients."""
    assert not kernels.one_key_block(n)
    q, k, v, ids, b, masks = window_inputs(M, heads, n, 16, torch.float32)
    compare_with_reference(q, k, v, ids, b, masks, torch.rand(heads) + 0.5)


# n = 25 is one query block of the interpreter's 32-row one-block kernels (dbias summed in
# registers), n = 49 several (summed in the program's slot); M = 5 windows in programs of 2.
KERNEL_CASES = [(torch.float32, 5, 2, 49, 32, True, True, "head"), (torch.bfloat16, 5, 2, 49, 16, True, True, "head"),
                (torch.float32, 5, 1, 25, 16, True, False, 0.3), (torch.float32, 5, 1, 49, 16, False, True, None)]


@needs_interpreter
@pytest.mark.parametrize("one_block", [True, False], ids=["one-block", "key-blocks"])
@pytest.mark.parametrize("dtype,M,heads,n,head_dim,bias,mask,scale", KERNEL_CASES,
                         ids=[f"{str(c[0])[6:]}-M{c[1]}-H{c[2]}-n{c[3]}" + "-bias" * c[5] + "-mask" * c[6]
                              for c in KERNEL_CASES])
def test_kernel_sets_and_partial_sums(kernels, monkeypatch, one_block, dtype, M, heads, n, head_dim, bias, mask,
                                      scale):
    """Both kernel sets (small windows forced through the key-block kernels), several windows
    per backward program summing their dbias into one partial slot (the last group shorter)."""
    if not one_block:
        monkeypatch.setattr(kernels, "MAX_ONE_BLOCK_KEYS", 8)
    monkeypatch.setattr(kernels, "PARTIAL_ELEMENTS", 3 * heads * n * n)  # 3 slots: windows 2 + 2 + 1
    assert kernels._windows_per_program(M, heads, n, True) == 2
    q, k, v, ids, b, masks = window_inputs(M, heads, n, head_dim, dtype, bias=bias, mask=mask)
    compare_with_reference(q, k, v, ids, b, masks, torch.rand(heads) + 0.5 if scale == "head" else scale,
                           atol=1e-5 if dtype == torch.float32 else 1e-6)


@needs_interpreter
@pytest.mark.parametrize("one_block", [True, False], ids=["one-block", "key-blocks"])
def test_backward_without_atomics(kernels, monkeypatch, one_block):
    """The backward sums dbias and the head-scale gradient without atomics (each program
    writes its own partial sums, torch adds them in a fixed order), and each program writes
    the rel_h and rel_w gradients of its own rows, so two runs agree bit for bit: the
    interpreter fails any atomic operation here."""
    from triton.runtime import interpreter

    def no_atomics(*args, **kwargs):
        raise AssertionError("an atomic operation: the sum's order depends on the schedule")

    for name in ("create_atomic_rmw", "create_atomic_cas"):
        monkeypatch.setattr(interpreter.InterpreterBuilder, name, no_atomics)
    if not one_block:
        monkeypatch.setattr(kernels, "MAX_ONE_BLOCK_KEYS", 8)
    monkeypatch.setattr(kernels, "PARTIAL_ELEMENTS", 2 * 49 * 49)  # 2 slots: windows 3 + 2
    q, k, v, ids, b, masks = window_inputs(5, 1, 49, 16, torch.float32)
    dout = torch.randn(q.shape)
    head_scale = torch.rand(1) + 0.5
    rel_h, rel_w = torch.randn(5, 1, 49, 7), torch.randn(5, 1, 49, 7)
    runs = [kernels.backward(dout, q, k, v, ids, b, masks, 0.25, True, head_scale, rel_h, rel_w) for _ in range(2)]
    for first, second in zip(*runs):
        assert first.numel() and torch.equal(first, second)


def huge_head_stride_views(shape, count, dtype=torch.float16):
    """count views of one storage with the given shape, whose axis 1 (heads, 3 of them) has
    stride 2**30, so that head 2 starts 2**31 elements past the view's first one (as in a
    [H, ..., D] tensor viewed head-inner), filled with random values. The storage spans
    2**32 elements (8 GiB of address space) but only the pages written are memory: a head
    offset that wraps at int32 reads the untouched start of the storage (zeros), no fault."""
    assert shape[1] == 3
    size = 1
    for s in shape:
        size *= s
    storage = torch.empty(2**32 + 2 * count * size, dtype=dtype)
    strides = [0] * len(shape)
    strides[1] = 2**30
    inner = 1
    for axis in reversed([a for a in range(len(shape)) if a != 1]):
        strides[axis] = inner
        inner *= shape[axis]
    views = []
    for i in range(count):
        view = storage.as_strided(shape, strides, 2**31 + i * inner)
        view.copy_(torch.randn(shape))
        views.append(view)
    return views


@needs_interpreter
@pytest.mark.parametrize("one_block", [True, False], ids=["one-block", "key-blocks"])
def test_head_offsets_past_int32(kernels, monkeypatch, one_block):
    """q, k, v and dout whose head stride times the head passes 2**31 elements: the kernels'
    offsets are int64 (in int32 head 2 would read the storage's start)."""
    if not one_block:
        monkeypatch.setattr(kernels, "MAX_ONE_BLOCK_KEYS", 8)
    q, k, v, dout = huge_head_stride_views((2, 3, 25, 16), 4)
    ids = torch.tensor([1, 0])
    masks = shift_mask(5)
    bias = torch.randn(3, 25, 25)
    out = kernels.forward(q, k, v, ids, bias, masks, 0.25)
    grads = kernels.backward(dout, q, k, v, ids, bias, masks, 0.25, True)
    leaves = with_grad(q, k, v, bias, dtype=torch.float64)
    expected = reference.window_attention(*leaves[:3], ids, leaves[3], masks.double(), scale=0.25)
    expected.backward(dout.double())
    for actual, wanted in zip([out, *grads[:4]], [expected] + [t.grad for t in leaves]):
        torch.testing.assert_close(actual.double(), wanted, atol=2e-2, rtol=1e-2)
