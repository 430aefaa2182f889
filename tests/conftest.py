import os
import subprocess

import pytest
import torch

# Triton kernels are tested on the CPU through the interpreter (set before triton is imported).
# `make gpu-check` sets TRITON_INTERPRET=0: there the kernels run compiled, on CUDA tensors only
# (triton 3.6's interpreter fails with the GPU machine's numpy).
os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW_DTYPES = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32] + LOW_DTYPES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


def poison_allocator(nbytes: int, device) -> None:
    """Leave NaN bytes in the memory the next allocation of this size is likely to get
    (the CUDA caching allocator reuses it), so an output a kernel forgets to write shows."""
    torch.full((max(nbytes, 1),), 255, dtype=torch.uint8, device=device)


def assert_close_to_reference(out, ref_low, ref_high, atol=1e-6):
    """Flash-attention's rule: out may be off the high-precision reference by at most twice
    what the reference itself is off when run in the low dtype, plus atol relative to the
    reference's largest magnitude (where that exceeds 1): a blocked kernel rounds in another
    order than the plain reference (in float32 the two can differ by a few ulps of that
    magnitude, as gradients of a few units did in 1 of 4 draws)."""
    if not out.numel():
        return
    err = (out.double() - ref_high.double()).abs().max().item()
    ref_err = (ref_low.double() - ref_high.double()).abs().max().item()
    tol = 2 * ref_err + atol * max(1.0, ref_high.double().abs().max().item())
    assert err <= tol, f"error {err} > 2 * reference error {ref_err} + {atol} x max(1, |reference|)"


@pytest.fixture(scope="session", autouse=True)
def triton_only_where_asked():
    """CPU tensors take the plain-PyTorch path unless a test asks for the interpreted kernels
    (the `path` fixture, or a test of the kernels themselves): at model sizes the interpreter
    runs hundreds of Python-level programs a call, which made the model tests most of make
    test's time. The kernels' own tests and the `path`-parametrized model tests keep them covered."""
    from sparse_ops.attention import _dispatch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_dispatch, "INTERPRET", False)
        yield


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """Forces one implementation of the Triton-backed ops: the Triton kernels (which must import;
    on CPU tensors only under the interpreter) or plain PyTorch."""
    from sparse_ops.attention import _dispatch

    if request.param == "triton":
        device = request.getfixturevalue("device") if "device" in request.fixturenames else "cpu"
        if device == "cpu" and not INTERPRET:
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
        for name in ("varlen_attention", "window_attention", "fused_linear"):
            assert _dispatch.triton_kernels(name) is not None, f"sparse_ops.kernels.{name} failed to import"
    monkeypatch.setattr(_dispatch, "use_triton", lambda name, q: request.param == "triton")
    return request.param


@pytest.fixture
def nan_outputs(monkeypatch):
    """Tensors allocated from Python start as NaN (-1 for integers), so an element a kernel
    leaves unwritten shows."""
    def poisoned(allocate):
        def allocate_poisoned(*args, **kwargs):
            t = allocate(*args, **kwargs)
            return t.fill_(float("nan") if t.is_floating_point() else -1)
        return allocate_poisoned

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))


def with_grad(*tensors, dtype=None):
    """Fresh leaves (optionally cast) that require grad."""
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def fresh_process_env() -> dict:
    """The environment of a test's child process that runs code as a user does: without
    TRITON_INTERPRET, and on one thread: on a busy machine two OpenMP threads that wait for
    each other at every barrier ran a training step 7x slower than one (load 12 on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_within_budget(command, budget_s: float, what: str, **kwargs):
    """subprocess.run for a test that must not fail on wall-clock time alone: the limit is
    budget_s (what a quiet machine needs, with room) times the load per core when the run
    starts, and a run past it skips the test, saying so, instead of failing it."""
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    limit = budget_s * max(1.0, load)
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=limit, **kwargs)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""  # bytes even with text=True
        pytest.skip(f"{what} still running after {limit:.0f} s ({budget_s:.0f} s x load {max(1.0, load):.1f} per "
                    f"core): too slow here to judge, not a failure; its stderr ended: {stderr[-2000:]!r}")
