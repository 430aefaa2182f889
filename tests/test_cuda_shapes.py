"""Every op on CUDA at the models' real shapes (DeiT-S/B tokens, Swin-T stages at 224 and 672,
SAM ViT-B's windows at 1024),
in float32, float16 and bfloat16, against sparse_ops/reference.py: index ops bit for bit,
arithmetic within twice the error of the reference run in the same dtype (float32: also
1e-5 of the largest value). Skipped without CUDA; `make gpu-check` runs them compiled
(TRITON_INTERPRET=0)."""
import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

import sparse_ops
from sparse_ops import reference
from sparse_ops.select import kept_count
from conftest import DTYPES, assert_close_to_reference, with_grad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")

DEVICE = "cuda"
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]
VITS = {"deit_small": (384, 6), "deit_base": (768, 12)}  # embed dim, heads; head dim 64, 197 tokens
TOKENS, VIT_BATCH, HEAD_DIM = 197, 8, 64


def swin_stages(img_size):
    """Swin-T's four stages at img_size: (height = width, dim, heads, window, shift); head dim 32.
    timm drops the shift where a stage is one window."""
    stages = []
    for i in range(4):
        res = img_size // 4 >> i
        stages.append((res, 96 << i, 3 << i, min(7, res), 0 if res <= 7 else 3))
    return stages


SWINS = {f"swin_tiny_{s}-stage{i}": (1 if s == 672 else 2, *stage)
         for s in (224, 672) for i, stage in enumerate(swin_stages(s))}


def close(ours, low, high, dtype):
    """The 2x rule, float32 also within 1e-5 of high's largest value."""
    scale = high.abs().max().item() if high.numel() else 1.0
    assert_close_to_reference(ours, low, high, atol=(1e-5 if dtype == torch.float32 else 1e-6) * scale)


def generator(seed=0):
    return torch.Generator(device=DEVICE).manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("model", VITS)
def test_token_row_ops(model, dtype):
    C, _ = VITS[model]
    g = generator()
    x = torch.randn(VIT_BATCH, TOKENS, C, device=DEVICE, generator=g).to(dtype)
    scores = torch.rand(VIT_BATCH, TOKENS, device=DEVICE, generator=g)
    idx = sparse_ops.select_tokens(scores, keep_rate=0.5)
    ref_idx = reference.select_tokens(scores, keep_rate=0.5)
    assert torch.equal(idx.index, ref_idx.index) and torch.equal(idx.cu_seqlens, ref_idx.cu_seqlens)

    (xg,) = with_grad(x)
    packed = sparse_ops.gather_tokens(xg, idx)
    assert torch.equal(packed, reference.gather_tokens(x, idx))
    y = torch.randn(packed.shape, device=DEVICE, generator=g).to(dtype)
    packed.backward(y)
    (xr,) = with_grad(x)
    reference.gather_tokens(xr, idx).backward(y)
    assert torch.equal(xg.grad, xr.grad)
    assert torch.equal(sparse_ops.scatter_tokens(y, idx, x), reference.scatter_tokens(y, idx, x))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("stage", SWINS)
def test_window_row_ops(stage, dtype):
    B, res, C, _, ws, shift = SWINS[stage]
    g = generator()
    x = torch.randn(B, res, res, C, device=DEVICE, generator=g).to(dtype)
    scores = sparse_ops.window_scores(x, ws, shift)
    close(scores, reference.window_scores(x, ws, shift), reference.window_scores(x.double(), ws, shift), torch.float32)
    windows = sparse_ops.select_windows(scores, kept_count(0.4, scores.shape[1]))

    (xg,) = with_grad(x)
    packed = sparse_ops.gather_windows(xg, windows, ws, shift)
    assert torch.equal(packed, reference.gather_windows(x, windows, ws, shift))
    y = torch.randn(packed.shape, device=DEVICE, generator=g).to(dtype)
    packed.backward(y)
    (xr,) = with_grad(x)
    reference.gather_windows(xr, windows, ws, shift).backward(y)
    assert torch.equal(xg.grad, xr.grad)
    assert torch.equal(sparse_ops.scatter_windows(y, x, windows, ws, shift),
                       reference.scatter_windows(y, x, windows, ws, shift))


def compare_runs(op, ref, inputs, grads_of, dout, dtype, **kwargs):
    """op and ref (in dtype and float64) on fresh leaves of inputs (None stays None); outputs
    and the gradients of the inputs named in grads_of, each within the 2x rule."""
    results = []
    for run, run_dtype in ((op, dtype), (ref, dtype), (ref, torch.float64)):
        leaves = {name: None if t is None else t.detach().to(run_dtype if t.is_floating_point() else t.dtype)
                  for name, t in inputs.items()}
        for name in grads_of:
            leaves[name].requires_grad_()
        out = run(**leaves, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        outs[0].backward(dout.to(run_dtype))
        results.append([*outs, *(leaves[name].grad for name in grads_of)])
    for ours, low, high in zip(*results):
        assert ours.shape == high.shape and not ours.isnan().any()
        close(ours, low, high, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("model", VITS)
def test_varlen_attention(model, dtype, nan_outputs):
    _, heads = VITS[model]
    g = generator()
    lengths = torch.randint(60, TOKENS + 1, (VIT_BATCH,), device=DEVICE, generator=g)  # what a pruned DeiT keeps
    T = int(lengths.sum())
    q, k, v = torch.randn(T, 3, heads, HEAD_DIM, device=DEVICE, generator=g).to(dtype).unbind(1)  # packed qkv views
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    dout = torch.randn(T, heads, HEAD_DIM, device=DEVICE, generator=g)
    compare_runs(sparse_ops.varlen_attention, reference.varlen_attention, dict(q=q, k=k, v=v), ("q", "k", "v"), dout,
                 dtype, cu_seqlens=cu, max_seqlen=int(lengths.max()), return_cls_attn=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("stage", SWINS)
def test_window_attention(stage, dtype, nan_outputs):
    B, res, C, heads, ws, shift = SWINS[stage]
    n, D = ws * ws, C // heads
    block = SwinTransformerBlock(C, (res, res), num_heads=heads, window_size=ws, shift_size=shift)
    mask = block.get_attn_mask()
    num_windows = (res // ws) ** 2
    g = generator()
    windows = torch.randperm(B * num_windows, device=DEVICE, generator=g)[:kept_count(0.4, B * num_windows)]
    M = windows.shape[0]
    qkv = torch.randn(M, n, 3 * C, device=DEVICE, generator=g).to(dtype)
    q, k, v = qkv.reshape(M, n, 3, heads, D).permute(2, 0, 3, 1, 4)  # timm's views
    bias = torch.randn(heads, n, n, device=DEVICE, generator=g)
    dout = torch.randn(M, heads, n, D, device=DEVICE, generator=g)
    compare_runs(sparse_ops.window_attention, reference.window_attention, dict(q=q, k=k, v=v, bias=bias),
                 ("q", "k", "v", "bias"), dout, dtype, window_ids=windows % num_windows,
                 mask=None if mask is None else mask.to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("window", [14, 24], ids=["samvit_base-14", "window24"])
def test_window_attention_rel_pos(window, dtype, nan_outputs):
    """SAM ViT-B's windowed blocks at 1024 (half of the 25 windows of 14x14, 12 heads of 64) with
    the decomposed relative position added in the kernel; and 24x24 windows (the key-block kernels)."""
    heads, D = 12, 64
    n = window * window
    g = generator()
    M = kept_count(0.5, 25)
    qkv = torch.randn(M, n, 3 * heads * D, device=DEVICE, generator=g).to(dtype)
    q, k, v = qkv.reshape(M, n, 3, heads, D).permute(2, 0, 3, 1, 4)  # timm's views
    tables = [torch.randn(2 * window - 1, D, device=DEVICE, generator=g) * 0.1 for _ in range(2)]
    rel_h, rel_w = reference.decomposed_rel_pos(q.float(), *tables, (window, window))
    dout = torch.randn(M, heads, n, D, device=DEVICE, generator=g)

    def ours(q, k, v, rel_h, rel_w, **kwargs):
        return sparse_ops.window_attention(q, k, v, rel_pos=(rel_h, rel_w), **kwargs)

    compare_runs(ours, reference.window_attention, dict(q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w),
                 ("q", "k", "v", "rel_h", "rel_w"), dout, dtype, window_ids=torch.arange(M, device=DEVICE))


# (rows of the dense activation R0, in features, out features): DeiT qkv and Swin-T stage 0 / 3 qkv
GEMMS = {"deit_small-qkv": (VIT_BATCH * TOKENS, 384, 3 * 384), "deit_base-qkv": (VIT_BATCH * TOKENS, 768, 3 * 768),
         "swin_tiny_672-stage0-qkv": (168 * 168, 96, 3 * 96), "swin_tiny_224-stage3-qkv": (2 * 49, 768, 3 * 768)}


def kept_rows(R0, g, padding=True):
    """About half the rows, sorted, unique, with padding rows (-1) when asked."""
    rows = torch.randperm(R0, device=DEVICE, generator=g)[:R0 // 2].sort().values
    if padding:
        rows[3::11] = -1
    return rows


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", GEMMS)
def test_gather_layernorm_linear(shape, dtype, nan_outputs):
    R0, C, N = GEMMS[shape]
    g = generator()
    rows = kept_rows(R0, g)
    inputs = dict(x=torch.randn(R0, C, device=DEVICE, generator=g) + 0.5,
                  norm_weight=1 + 0.5 * torch.randn(C, device=DEVICE, generator=g),
                  norm_bias=0.3 * torch.randn(C, device=DEVICE, generator=g),
                  weight=torch.randn(N, C, device=DEVICE, generator=g) * C**-0.5,
                  bias=torch.randn(N, device=DEVICE, generator=g))
    dout = torch.randn(rows.shape[0], N, device=DEVICE, generator=g)
    compare_runs(sparse_ops.gather_layernorm_linear, reference.gather_layernorm_linear, inputs, tuple(inputs), dout,
                 dtype, rows=rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", GEMMS)
def test_linear_residual_scatter(shape, dtype, nan_outputs):
    """The MLP's fc2 (in = 4 * out) with the residual, scattered into the dense rows."""
    R0, C, _ = GEMMS[shape]
    g = generator()
    rows = kept_rows(R0, g, padding=False)
    R, K = rows.shape[0], 4 * C
    inputs = dict(h=torch.randn(R, K, device=DEVICE, generator=g), weight=torch.randn(C, K, device=DEVICE, generator=g) * K**-0.5,
                  bias=torch.randn(C, device=DEVICE, generator=g), base=torch.randn(R0, C, device=DEVICE, generator=g),
                  residual=torch.randn(R, C, device=DEVICE, generator=g))
    dout = torch.randn(R0, C, device=DEVICE, generator=g)
    compare_runs(sparse_ops.linear_residual_scatter, reference.linear_residual_scatter, inputs, tuple(inputs), dout,
                 dtype, rows=rows)
