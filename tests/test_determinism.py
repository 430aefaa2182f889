"""torch.use_deterministic_algorithms(True): every op is deterministic (bitwise equal results
from equal inputs) or raises, as torch's own ops; nothing ignores the flag. On the CPU the
kernels are deterministic whatever the thread count; on CUDA scatter_add_rows (the backward of
every gather) trades its atomics for torch's deterministic index_put_ under the flag."""
import pathlib
import re

import pytest
import torch
import triton

import sparse_ops
from sparse_ops import fused, reference
from sparse_ops.layout import TokenIndex

from conftest import DEVICES

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def deterministic():
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


def randn(*shape, device="cpu", seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def repeated_rows(n: int, num_rows: int, device, seed=0):
    """int64 [n]: each of num_rows rows many times over, and some -1."""
    rows = torch.randint(-1, num_rows, (n,), generator=torch.Generator().manual_seed(seed))
    return rows.to(device)


def _every_op(device):
    """name -> a function that runs the op forward and backward on fresh inputs and returns
    its output and the gradients of its inputs (repeated rows wherever an op allows them)."""
    def run(op, *inputs):
        inputs = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
        out = op(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        differentiable = [o for o in outs if o.requires_grad]
        torch.autograd.backward(differentiable, [torch.ones_like(o) for o in differentiable])
        return [*outs, *(t.grad for t in inputs if t.is_floating_point() and t.grad is not None)]

    x, rows = randn(64, 32, device=device), repeated_rows(300, 64, device)
    unique = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:40].to(device)
    idx = TokenIndex.from_mask(randn(4, 16, device=device, seed=2) > 0)
    tokens, maps = randn(4, 16, 32, device=device, seed=3), randn(2, 9, 11, 32, device=device, seed=4)
    windows = torch.tensor([[3, 0], [1, 2]], device=device)
    cu = torch.tensor([0, 30, 30, 75, 100], dtype=torch.int32, device=device)
    q, k, v = (randn(100, 2, 16, device=device, seed=s) for s in (5, 6, 7))
    wq, wk, wv = (randn(6, 2, 16, 16, device=device, seed=s) for s in (8, 9, 10))
    bias, mask = randn(2, 16, 16, device=device, seed=11), torch.where(randn(3, 16, 16, device=device) > 1, -100.0, 0.0)
    ids = torch.tensor([0, 2, 1, 1, 0, 2], device=device)
    w, b, nw, nb = randn(48, 32, device=device, seed=12), randn(48, device=device, seed=13), \
        randn(32, device=device, seed=14), randn(32, device=device, seed=15)
    return {
        "gather_rows": lambda: run(sparse_ops.gather_rows, x, rows),
        "scatter_rows": lambda: run(sparse_ops.scatter_rows, randn(40, 32, device=device), unique, x),
        "scatter_add_rows": lambda: run(lambda y: sparse_ops.scatter_add_rows(y, rows, 64), randn(300, 32, device=device)),
        "gather_tokens": lambda: run(lambda t: sparse_ops.gather_tokens(t, idx), tokens),
        "scatter_tokens": lambda: run(lambda y, t: sparse_ops.scatter_tokens(y, idx, t),
                                      randn(idx.num_tokens, 32, device=device), tokens),
        "package_tokens": lambda: run(lambda t, s: sparse_ops.package_tokens(t, s, idx), tokens,
                                      randn(4, 16, device=device).abs()),
        "window_scores": lambda: run(lambda m: sparse_ops.window_scores(m, 3, 1), maps),
        "gather_windows": lambda: run(lambda m: sparse_ops.gather_windows(m, windows, 3, 1), maps),
        "scatter_windows": lambda: run(lambda y, m: sparse_ops.scatter_windows(y, m, windows, 3, 1),
                                       randn(4, 9, 32, device=device), maps),
        "varlen_attention": lambda: run(lambda *t: sparse_ops.varlen_attention(*t, cu, 45, return_cls_attn=True),
                                        q, k, v),
        "window_attention": lambda: run(lambda *t: sparse_ops.window_attention(*t[:3], ids, bias=t[3], mask=mask),
                                        wq, wk, wv, bias),
        "gather_layernorm_linear": lambda: run(lambda *t: fused.gather_layernorm_linear(t[0], rows, *t[1:]),
                                               x, nw, nb, w, b),
        "linear_residual_scatter": lambda: run(lambda h, *t: fused.linear_residual_scatter(h, *t[:3], unique,
                                                                                         residual=t[3]),
                                               randn(40, 32, device=device), randn(32, 32, device=device, seed=17),
                                               b[:32], x, randn(40, 32, device=device, seed=16)),
    }


def _bitwise_equal(a, b):
    return len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.parametrize("name", list(_every_op("cpu")))
def test_every_op_is_deterministic_under_the_flag(name, device, path, deterministic):
    """Forward and backward run under the flag (nothing raises where the op is deterministic)
    and twice give bitwise equal outputs and gradients (torch.empty fills NaN under the flag:
    an unwritten output would show)."""
    first = _every_op(device)[name]()
    second = _every_op(device)[name]()
    assert all(torch.isfinite(t).all() for t in first if t.is_floating_point())
    assert _bitwise_equal(first, second)


def test_cpu_kernels_do_not_depend_on_the_thread_count():
    """The CPU kernels split work with at::parallel_for: scatter_add_rows by column ranges (each
    element sums its rows in index order), window_scores by windows, gather and scatter copy.
    Their results are the same bitwise at any thread count."""
    y, rows = randn(4096, 64), repeated_rows(4096, 50, "cpu")
    maps = randn(4, 33, 35, 64, seed=1)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append([sparse_ops.scatter_add_rows(y, rows, 50), sparse_ops.window_scores(maps, 7, 3),
                            sparse_ops.gather_rows(y, rows), sparse_ops.scatter_rows(y[:50], torch.arange(50), y)])
    finally:
        torch.set_num_threads(threads)
    assert all(_bitwise_equal(results[0], r) for r in results[1:])
    assert torch.allclose(results[0][0].double(), reference.scatter_add_rows(y.double(), rows, 50), atol=1e-4)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_scatter_add_rows_deterministic_path(dtype, deterministic):
    """Heavily repeated rows (atomics would add them in a varying order): equal bitwise from
    run to run under the flag, and equal to the float64 sum within float32 rounding."""
    y, rows = randn(1 << 16, 64, device="cuda", dtype=dtype), repeated_rows(1 << 16, 7, "cuda")
    first = sparse_ops.scatter_add_rows(y, rows, 7)
    assert all(torch.equal(first, sparse_ops.scatter_add_rows(y, rows, 7)) for _ in range(5))
    expected = reference.scatter_add_rows(y.double(), rows, 7)
    assert torch.allclose(first.double(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


def test_no_kernel_ignores_the_flag():
    """Float atomics add in a varying order: a CUDA or Triton source that uses them must
    consult torch's deterministic flag (and take another path or raise under it)."""
    sources = sorted(ROOT.glob("csrc/**/*.cu")) + sorted(ROOT.glob("kernels/*.py"))
    assert sources
    for source in sources:
        text = source.read_text()
        if re.search(r"\batomicAdd\b|\btl\.atomic_", text):
            assert re.search(r"deterministicAlgorithms\(\)|are_deterministic_algorithms_enabled\(\)", text), (
                f"{source.relative_to(ROOT)} uses float atomics but never reads torch's deterministic flag")


def test_autotuned_kernels_run_their_first_config_under_the_flag(deterministic):
    """Timed autotuning may pick another config in another process, and with it another order
    of summation: under the flag each kernel runs its first config, with no benchmarking."""
    from sparse_ops.kernels import _common, fused_linear, varlen_attention, window_attention

    launches = []

    class Jit:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    class Autotuner:  # what triton.autotune makes: .fn and .configs; launched only through .fn here
        fn = Jit()
        configs = [triton.Config({"BLOCK": 64}, num_warps=4, num_stages=2), triton.Config({"BLOCK": 128}, num_warps=8)]

        def __getitem__(self, grid):
            raise AssertionError("autotuned under the deterministic flag")

    _common.tuned(Autotuner())["grid"](1, x=2)
    assert launches == [("grid", (1,), dict(x=2, **Autotuner.configs[0].all_kwargs()))]
    assert launches[0][2]["BLOCK"] == 64 and launches[0][2]["num_warps"] == 4
    torch.use_deterministic_algorithms(False)
    tuner = Autotuner()
    assert _common.tuned(tuner) is tuner
    # every autotuned kernel is launched through tuned()
    for module in (fused_linear, varlen_attention, window_attention):
        source = pathlib.Path(module.__file__).read_text()
        for name in re.findall(r"@triton\.autotune\(.*?\n@triton\.jit\ndef (\w+)", source, re.S):
            assert f"tuned({name})[" in source, f"{module.__name__}.{name} is launched without tuned()"
