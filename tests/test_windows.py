"""Window ops against timm's own frame: roll(-shift) -> pad -> window_partition."""
import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import window_partition, window_reverse

import sparse_ops
from sparse_ops import _backend, reference
from conftest import assert_close_to_reference, poison_allocator

# (B, H, W, C, window, shift): H, W multiples of the window or not, shift 0 and ws // 2,
# images smaller than a window, a non-square window.
CASES = [
    (2, 14, 14, 8, 7, 0),
    (2, 14, 14, 8, 7, 3),
    (1, 13, 17, 4, 7, 3),
    (3, 5, 9, 6, 7, 0),
    (2, 10, 12, 3, (4, 5), (2, 1)),
    (1, 7, 7, 16, 7, 3),
]
IDS = [f"B{c[0]}-{c[1]}x{c[2]}-C{c[3]}-ws{c[4]}-s{c[5]}" for c in CASES]


def pair(v):
    return (v, v) if isinstance(v, int) else v


def timm_windows(x, ws, shift):
    """[B, nW, wh*ww, C], literally as timm's SwinTransformerBlock._attn builds them."""
    (wh, ww), (sh, sw) = pair(ws), pair(shift)
    B, H, W, C = x.shape
    x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
    return window_partition(x, (wh, ww)).view(B, -1, wh * ww, C), x.shape[1], x.shape[2]


def timm_merge(windows, ws, shift, H, W, Hp, Wp):
    """timm's window_reverse, crop and reverse roll of [B, nW, wh*ww, C] windows."""
    (wh, ww), (sh, sw) = pair(ws), pair(shift)
    C = windows.shape[-1]
    x = window_reverse(windows.reshape(-1, wh, ww, C), (wh, ww), Hp, Wp)[:, :H, :W]
    return torch.roll(x, shifts=(sh, sw), dims=(1, 2))


def random_windows(B, nW, K, device):
    return torch.stack([torch.randperm(nW, device=device)[:K] for _ in range(B)]) if B else torch.zeros(0, K)


def num_windows(H, W, ws):
    gh, gw = sparse_ops.window_grid(H, W, ws)
    return gh * gw


def random_selection(B, H, W, C, ws, keep, device, dtype):
    """A random map and, per image, no window, about half of them, or all of them."""
    x = torch.randn(B, H, W, C, device=device).to(dtype)
    nW = num_windows(H, W, ws)
    K = {"none": 0, "some": max(1, nW // 2), "all": nW}[keep]
    return x, random_windows(B, nW, K, device), K, pair(ws)[0] * pair(ws)[1]


@pytest.mark.parametrize("keep", ["none", "some", "all"])
@pytest.mark.parametrize("B,H,W,C,ws,shift", CASES, ids=IDS)
def test_gather_windows_matches_timm(device, dtype, B, H, W, C, ws, shift, keep):
    x, windows, K, area = random_selection(B, H, W, C, ws, keep, device, dtype)
    all_windows, _, _ = timm_windows(x, ws, shift)
    expected = torch.stack([all_windows[b, windows[b]] for b in range(B)]).flatten(0, 1)
    poison_allocator(B * K * area * C * x.element_size(), device)
    out = sparse_ops.gather_windows(x, windows, ws, shift)
    assert out.shape == (B * K, area, C)
    assert torch.equal(out, expected)
    assert torch.equal(out, reference.gather_windows(x, windows, ws, shift))


@pytest.mark.parametrize("keep", ["none", "some", "all"])
@pytest.mark.parametrize("B,H,W,C,ws,shift", CASES, ids=IDS)
def test_scatter_windows_matches_timm(device, dtype, B, H, W, C, ws, shift, keep):
    base, windows, K, area = random_selection(B, H, W, C, ws, keep, device, dtype)
    y = torch.randn(B * K, area, C, device=device).to(dtype)
    all_windows, Hp, Wp = timm_windows(base, ws, shift)
    for b in range(B):
        all_windows[b, windows[b]] = y.view(B, K, area, C)[b]
    expected = timm_merge(all_windows, ws, shift, H, W, Hp, Wp)
    out = sparse_ops.scatter_windows(y, base, windows, ws, shift)
    assert torch.equal(out, expected)
    assert torch.equal(out, reference.scatter_windows(y, base, windows, ws, shift))


def test_gather_scatter_windows_non_contiguous(device):
    big = torch.randn(2, 16, 15, 20, device=device)
    x = big[:, 1:, :, 4:12]  # [2, 15, 15, 8], strided in every dim
    windows = random_windows(2, 9, 4, device)
    assert torch.equal(sparse_ops.gather_windows(x, windows, 7, 3), reference.gather_windows(x, windows, 7, 3))
    y = torch.randn(8, 8, 49, device=device).transpose(1, 2)
    assert torch.equal(sparse_ops.scatter_windows(y, x, windows, 7, 3),
                       reference.scatter_windows(y.contiguous(), x, windows, 7, 3))


def test_scatter_windows_accepts_4d_windows(device):
    base = torch.randn(1, 14, 14, 4, device=device)
    windows = torch.tensor([[3, 0]], device=device)
    y = torch.randn(2, 7, 7, 4, device=device)
    assert torch.equal(sparse_ops.scatter_windows(y, base, windows, 7), sparse_ops.scatter_windows(y.view(2, 49, 4), base, windows, 7))


@pytest.mark.parametrize("B,H,W,C,ws,shift", CASES, ids=IDS)
def test_window_rows(device, B, H, W, C, ws, shift):
    nW = num_windows(H, W, ws)
    windows = random_windows(B, nW, nW, device)
    rows = sparse_ops.window_rows(windows, H, W, ws, shift)
    assert torch.equal(rows, reference.window_rows(windows, H, W, ws, shift))
    # With every window kept, each token of each image appears exactly once.
    real = rows[rows >= 0]
    assert torch.equal(real.sort().values, torch.arange(B * H * W, device=device))


@pytest.mark.parametrize("B,H,W,C,ws,shift", CASES, ids=IDS)
def test_window_scores(device, dtype, B, H, W, C, ws, shift):
    x = torch.randn(B, H, W, C, device=device).to(dtype)
    scores = sparse_ops.window_scores(x, ws, shift)
    assert scores.dtype == torch.float32 and scores.shape == (B, num_windows(H, W, ws))
    all_windows, _, _ = timm_windows(x.double(), ws, shift)
    expected = all_windows.abs().mean(-1).square().sum(-1).sqrt()  # SparseViT's rule in timm's frame
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)
    assert_close_to_reference(scores, reference.window_scores(x, ws, shift), expected)


def test_select_windows(device):
    scores = torch.randn(3, 20, device=device)
    windows = sparse_ops.select_windows(scores, 6)
    assert windows.shape == (3, 6) and windows.dtype == torch.int64
    assert torch.equal(windows, reference.select_windows(scores, 6))
    picked = scores.gather(1, windows)
    assert (picked[:, :-1] >= picked[:, 1:]).all()  # best first
    assert sparse_ops.select_windows(scores, 0).shape == (3, 0)
    assert torch.equal(sparse_ops.select_windows(scores, 20).sort(1).values, torch.arange(20, device=device).expand(3, -1))


@pytest.mark.parametrize("path", ["public", "reference"])
def test_window_ops_gradcheck(device, path):
    ops = sparse_ops if path == "public" else reference
    x = torch.randn(2, 9, 11, 3, device=device, dtype=torch.float64, requires_grad=True)
    windows = torch.tensor([[3, 0], [1, 5]], device=device)
    y = torch.randn(4, 16, 3, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.gather_windows(t, windows, 4, 2), (x,))
    assert torch.autograd.gradcheck(lambda a, b: ops.scatter_windows(a, b, windows, 4, 2), (y, x))
    assert torch.autograd.gradcheck(lambda t: ops.window_scores(t, 4, 2), (x,))


@pytest.mark.skipif(_backend.extension is None, reason="compiled extension not loaded")
def test_window_ops_opcheck(device):
    x = torch.randn(2, 9, 11, 5, device=device, requires_grad=True)
    windows = torch.tensor([[3, 0, 4], [1, 5, 2]], device=device)
    ops = torch.ops.sparse_ops
    torch.library.opcheck(ops.window_scores.default, (x, [4, 4], [2, 2]))
    torch.library.opcheck(ops.window_scores.default, (x, [7, 3], [0, 1]))
    torch.library.opcheck(ops.window_rows.default, (windows, 9, 11, [4, 4], [2, 2]))
    torch.library.opcheck(ops.window_rows.default, (windows[:, :0], 9, 11, [4, 4], [0, 0]))


def test_window_backward_low_precision(device, dtype):
    """Gradients in the model's dtype: rows move unchanged, so they equal the reference's."""
    x = torch.randn(2, 10, 9, 8, device=device).to(dtype).requires_grad_()
    windows = torch.tensor([[3, 0, 5], [1, 5, 2]], device=device)
    upstream = torch.randn_like(x)
    grads = []
    for ops in (sparse_ops, reference):
        out = ops.scatter_windows(ops.gather_windows(x, windows, 4, 2) * 3, x, windows, 4, 2)
        grads.append(torch.autograd.grad(out, x, upstream)[0])
    assert grads[0].dtype == dtype
    assert torch.equal(grads[0], grads[1])
