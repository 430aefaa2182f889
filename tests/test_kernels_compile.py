"""The Triton kernels compile for the GPUs the project targets, here on a machine without one:
every autotune config in bf16 (the first in fp16 and fp32), at the head dims and window sizes the
models use; the first config of each, the one SPARSE_OPS_AUTOTUNE=0 runs, fits the target's
shared memory, and no kernel holds an atomic operation (sums are per program, added in a fixed
order: deterministic run to run). The interpreter runs the kernels' logic; only the compiler
sees what a GPU build would reject (types, layouts, shared memory). Also the launch settings
that need no GPU: the autotune switch and the dots' float32 precision."""
import collections
import json
import os
import pathlib
import subprocess
import sys

import pytest

# A process without TRITON_INTERPRET: there the kernels are built for the GPU
COMPILE_ENV = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPARSE_OPS_AUTOTUNE")}


def run_python(code: str, *envs: dict) -> list:
    """stdout of `python -c code` in fresh processes without the interpreter, one per env, side
    by side."""
    runs = [subprocess.Popen([sys.executable, "-c", code], env={**COMPILE_ENV, **env}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for env in envs]
    outputs = [run.communicate() for run in runs]
    for run, (_, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-4000:]
    return [stdout for stdout, _ in outputs]


@pytest.mark.parametrize("arch", [90])
def test_every_config_compiles_and_the_first_fits_shared_memory(arch):
    script = pathlib.Path(__file__).with_name("compile_kernels.py")
    dtypes = ("bf16", "fp16", "fp32")
    # one process per dtype, side by side: a cold compile of all configs takes minutes
    runs = [subprocess.Popen([sys.executable, str(script), str(arch), dtype], env=COMPILE_ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for dtype in dtypes]
    records = []
    for run in runs:
        stdout, stderr = run.communicate()
        assert run.returncode == 0, stderr[-4000:]
        records += [json.loads(line) for line in stdout.splitlines()]
    first = {(r["kernel"], r["dtype"]): r for r in records if r["first"]}
    # 4 varlen kernels x 3 head dims, the window kernels (2 one-block x 6 window shapes, 3
    # key-block x 4; with SAM's relative position 2 one-block x 2, 3 key-block x 1), 3 fused
    # GEMMs, 2 row kernels x 3 widths; fp32 without the large windows at D = 32 (2 one-block x
    # 1, 3 key-block x 2) and without the relative-position ones
    kernels = 4 * 3 + (2 * 6 + 3 * 4) + (2 * 2 + 3) + 3 + 2 * 3
    counts = collections.Counter(dtype for _, dtype in first)
    assert counts == {"bf16": kernels, "fp16": kernels, "fp32": kernels - 2 - 3 * 2 - (2 * 2 + 3)}, counts
    too_big = [key for key, r in first.items() if not r["fits"]]
    assert not too_big, f"the first autotune config does not fit sm_{arch}'s shared memory: {too_big}"
    with_atomics = sorted({(r["kernel"], r["dtype"]) for r in records if r["atomics"]})
    assert not with_atomics, f"atomic operations (results would depend on the schedule): {with_atomics}"
    assert all("regs" in r and "spill_bytes" in r for r in records), "cuobjdump gave no resource usage"


AUTOTUNERS = """
import json
from triton.runtime.autotuner import Autotuner
from sparse_ops.kernels import fused_linear, varlen_attention, window_attention
print(json.dumps({f"{module.__name__}.{name}": [str(c) for c in kernel.configs]
                  for module in (fused_linear, varlen_attention, window_attention)
                  for name, kernel in vars(module).items() if isinstance(kernel, Autotuner)}))
"""


def test_autotune_switch():
    """SPARSE_OPS_AUTOTUNE=0 leaves every autotuned kernel its first config only (the test
    above checks that it fits), so that nothing is benchmarked."""
    tuned, fixed = map(json.loads, run_python(AUTOTUNERS, {"SPARSE_OPS_AUTOTUNE": "1"}, {"SPARSE_OPS_AUTOTUNE": "0"}))
    assert len(tuned) == 11 and tuned.keys() == fixed.keys()
    for name, configs in tuned.items():
        assert len(configs) > 1 and fixed[name] == configs[:1], name


def test_dot_precision_follows_torch():
    """float32 dots take TF32 exactly where torch lets CUDA matmuls (read at each launch), by
    any of torch's switches; other dtypes are unaffected."""
    code = """
import json, torch
from sparse_ops.kernels._common import dot_precision
matmul = torch.backends.cuda.matmul
seen = [dot_precision(torch.float32), dot_precision(torch.bfloat16)]
for switch in ('torch.set_float32_matmul_precision("high")', 'torch.set_float32_matmul_precision("highest")',
               "matmul.allow_tf32 = True", "matmul.allow_tf32 = False",
               'matmul.fp32_precision = "tf32"', 'matmul.fp32_precision = "ieee"'):
    exec(switch)
    seen.append(dot_precision(torch.float32))
print(json.dumps(seen))
"""
    seen = json.loads(run_python(code, {})[0])
    assert seen == ["ieee", "tf32", "tf32", "ieee", "tf32", "ieee", "tf32", "ieee"]
