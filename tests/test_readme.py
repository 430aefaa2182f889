"""The README's examples run as written, as a user runs them: in a fresh process without
TRITON_INTERPRET (under the interpreter, Triton kernels at DeiT-S sizes take minutes)."""
import os
import pathlib
import re
import subprocess
import sys


def test_readme_examples_run():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
