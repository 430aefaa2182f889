"""The CMake build (CMakeLists.txt) loads on its own and registers the ops of the setup.py build."""
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
for name in sys.argv[2:]:
    assert hasattr(torch.ops.sparse_ops, name), f"sparse_ops::{name} is missing"
x = torch.randn(5, 3)
rows = torch.tensor([4, -1, 0, 0, 2])
expected = torch.cat([x, torch.zeros(1, 3)])[rows]  # row -1 is the appended zero row
assert torch.equal(torch.ops.sparse_ops.gather_rows(x, rows), expected)
"""


@pytest.mark.skipif(not LIB, reason="SPARSE_OPS_CMAKE_LIB is unset; `make test` sets it to the CMake-built library")
def test_cmake_library():
    result = subprocess.run([sys.executable, "-c", CHECK, LIB, *COMPILED_OPS], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
