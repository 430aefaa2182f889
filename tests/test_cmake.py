"""The CMake build (CMakeLists.txt) loads on its own and registers the ops of the setup.py build.

`make test` builds it CPU-only (the CUDA sources are compiled once, by the pip build, and
test_backends.test_compiled_kernels_registered checks its CUDA kernels), so this checks the
CPU kernels; a CUDA kernel, where the library has one, must be registered for every op."""
import os
import subprocess
import sys

import pytest

from sparse_ops._backend import COMPILED_OPS

LIB = os.environ.get("SPARSE_OPS_CMAKE_LIB")

# Runs in a fresh interpreter that never imports sparse_ops: the setup.py build defines the
# same sparse_ops namespace, and loading both into one process fails.
CHECK = """
import sys, torch
torch.ops.load_library(sys.argv[1])
has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
for name in sys.argv[2:]:
    assert hasattr(torch.ops.sparse_ops, name), f"sparse_ops::{name} is missing"
    assert has_kernel(f"sparse_ops::{name}", "CPU"), f"sparse_ops::{name} has no CPU kernel"
cuda = [has_kernel(f"sparse_ops::{name}", "CUDA") for name in sys.argv[2:]]
assert all(cuda) or not any(cuda), f"CUDA kernels for some ops only: {dict(zip(sys.argv[2:], cuda))}"
x = torch.randn(5, 3)
rows = torch.tensor([4, -1, 0, 0, 2])
expected = torch.cat([x, torch.zeros(1, 3)])[rows]  # row -1 is the appended zero row
assert torch.equal(torch.ops.sparse_ops.gather_rows(x, rows), expected)
"""


@pytest.mark.skipif(not LIB, reason="SPARSE_OPS_CMAKE_LIB is unset; `make test` sets it to the CMake-built library")
def test_cmake_library():
    result = subprocess.run([sys.executable, "-c", CHECK, LIB, *COMPILED_OPS], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
