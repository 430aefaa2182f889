"""examples/digits.py runs as a user runs it (a fresh process, no TRITON_INTERPRET), in its
--quick smoke mode, and writes its report."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_digits_example_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "digits.md"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "digits.py"), "--quick", "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ViT |") or line.startswith("| Swin |")]
    assert len(rows) == 8, report  # 4 sparsities x 2 models
    assert "Search (Swin" in report and "per-block ratios [" in report
