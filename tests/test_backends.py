"""Which implementation runs, the reference fallback, packaging and torch.compile."""
import os
import subprocess
import sys

import pytest
import torch

import sparse_ops
from sparse_ops import _backend, reference
from conftest import needs_interpreter


@needs_interpreter
def test_backends_table():
    table = sparse_ops.backends()
    for name in _backend.COMPILED_OPS + _backend.COMPOSITE_OPS + tuple(_backend.TRITON_OPS):
        assert set(table[name]) == {"cpu", "cuda"}
    for name in _backend.TRITON_OPS:  # conftest sets TRITON_INTERPRET=1; make test installs triton
        assert table[name] == {"cpu": "triton (interpreter)", "cuda": "triton"}
    for name in _backend.COMPILED_OPS:
        assert table[name]["cpu"] in ("C++", "reference") and table[name]["cuda"] in ("CUDA", "reference")


@pytest.mark.skipif(os.environ.get("SPARSE_OPS_REQUIRE_EXT") != "1", reason="`make test` sets SPARSE_OPS_REQUIRE_EXT=1")
def test_compiled_kernels_registered():
    """Under `make test` the extension must load, with CPU kernels and (compile check on a
    machine without a GPU) CUDA kernels, so no test silently runs the fallback."""
    assert _backend.extension is not None, _backend.load_error
    cuda = "CUDA" if os.environ.get("SPARSE_OPS_REQUIRE_CUDA") == "1" else sparse_ops.backends()["gather_rows"]["cuda"]
    for name in _backend.COMPILED_OPS:
        assert sparse_ops.backends()[name] == {"cpu": "C++", "cuda": cuda}, name


def test_reference_fallback_in_subprocess():
    code = (
        "import torch, sparse_ops\n"
        "from sparse_ops import reference\n"
        "assert all(b['cpu'] == 'reference' for n, b in sparse_ops.backends().items() if n == 'gather_rows')\n"
        "x = torch.randn(2, 9, 10, 3); w = torch.tensor([[0, 3], [2, 1]])\n"
        "assert torch.equal(sparse_ops.gather_windows(x, w, 5, 2), reference.gather_windows(x, w, 5, 2))\n"
        "import sparse_ops  # a second import says nothing more\n"
    )
    env = dict(os.environ, SPARSE_OPS_BACKEND="reference")
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("compiled kernels unavailable on cpu (SPARSE_OPS_BACKEND=reference)") == 1, result.stderr


@needs_interpreter
@pytest.mark.parametrize("name", sorted(set(_backend.TRITON_OPS.values())))
def test_attention_dispatch(name, monkeypatch):
    from sparse_ops.attention import _dispatch

    monkeypatch.setattr(_dispatch, "INTERPRET", True)  # as TRITON_INTERPRET=1 sets it (conftest turns it off)
    cpu32 = torch.zeros(1)
    assert _dispatch.use_triton(name, cpu32)
    assert not _dispatch.use_triton(name, cpu32.double())  # the kernels accumulate in float32
    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    assert not _dispatch.use_triton(name, cpu32)


def test_triton_kernels_package_ships():
    import sparse_ops.kernels

    assert sparse_ops.kernels.__doc__


def test_torch_compile_fullgraph():
    x = torch.randn(2, 17, 8)
    scores = torch.rand(2, 17)
    xw = torch.randn(2, 10, 9, 4, requires_grad=True)

    def pruned_step(x, scores, xw):
        idx = sparse_ops.select_tokens(scores, keep_rate=0.5)
        tokens = sparse_ops.scatter_tokens(sparse_ops.gather_tokens(x, idx) * 2, idx, x)
        windows = sparse_ops.select_windows(sparse_ops.window_scores(xw, 4, 2), 3)
        packed = sparse_ops.gather_windows(xw, windows, 4, 2)
        return tokens, sparse_ops.scatter_windows(packed * 2, xw, windows, 4, 2)

    compiled = torch.compile(pruned_step, fullgraph=True, backend="aot_eager")
    expected = pruned_step(x, scores, xw)
    got = compiled(x, scores, xw)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    (grad,) = torch.autograd.grad(got[1].square().sum(), xw)
    (expected_grad,) = torch.autograd.grad(expected[1].square().sum(), xw)
    torch.testing.assert_close(grad, expected_grad)
