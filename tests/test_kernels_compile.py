"""The Triton kernels compile for the GPUs the project targets, here on a machine without one:
every autotune config in bf16 (the first in fp32), at the head dims and window sizes the models
use. The interpreter runs the kernels' logic; only the compiler sees what a GPU build would
reject (types, layouts, shared memory)."""
import collections
import json
import os
import pathlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("arch", [90])
def test_every_config_compiles_and_one_fits_shared_memory(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = pathlib.Path(__file__).with_name("compile_kernels.py")
    dtypes = ("bf16", "fp32")
    # one process per dtype, side by side: a cold compile of all configs takes minutes
    runs = [subprocess.Popen([sys.executable, str(script), str(arch), dtype], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for dtype in dtypes]
    records = []
    for run in runs:
        stdout, stderr = run.communicate()
        assert run.returncode == 0, stderr[-4000:]
        records += [json.loads(line) for line in stdout.splitlines()]
    fitting = collections.defaultdict(int)
    for r in records:
        fitting[r["kernel"], r["dtype"]] += r["fits"]
    # 4 varlen kernels x 3 head dims + 2 window kernels x 4 window shapes + 3 fused GEMMs + 2 row
    # kernels x 3 widths, in each dtype
    assert len(fitting) == (4 * 3 + 2 * 4 + 3 + 2 * 3) * len(dtypes), sorted(fitting)
    too_big = [key for key, n in fitting.items() if n == 0]
    assert not too_big, f"no autotune config fits sm_{arch}'s shared memory: {too_big}"
