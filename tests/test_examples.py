"""examples/digits.py and examples/digits_seg.py run as a user runs them (a fresh process, no
TRITON_INTERPRET), in their --quick smoke modes, and write their reports; their training
loops run at a step count torch's one-cycle schedule trips on."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def check_digits(report: str):
    rows = [line for line in report.splitlines() if line.startswith("| ViT |") or line.startswith("| Swin |")]
    assert len(rows) == 8, report  # 4 sparsities x 2 models
    assert "Search (Swin" in report and "per-block ratios [" in report


def check_digits_seg(report: str):
    rows = [line.split("|")[1:-1] for line in report.splitlines() if line.startswith("| 0.")]
    assert [row[0].strip() for row in rows] == ["0.0", "0.3", "0.5", "0.7"], report
    for row in rows:  # mIoU and pixel accuracy in [0, 100] %, a latency, a speed-up
        assert all(0.0 <= float(cell.strip().rstrip(" %")) <= 100.0 for cell in row[1:5]), row
        assert row[5].strip().endswith(" ms") and row[6].strip().endswith("x"), row
    assert rows[0][6].strip() == "1.00x"


@pytest.mark.parametrize("example,options,check", [
    ("digits", ["--speed-batch", "16"], check_digits),  # the timings (of 128 images by default) are most of its time
    ("digits_seg", [], check_digits_seg),
], ids=["digits", "digits_seg"])
def test_example_quick(example, options, check, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / f"{example}.md"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / f"{example}.py"), "--quick", *options, "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    check(out.read_text())


def test_training_runs_ten_steps(monkeypatch):
    """Ten steps, where a 0.1 warm-up of the one-cycle schedule is exactly one step (torch's
    OneCycleLR divides by zero there), train in both examples."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import digits
    import digits_seg
    train_set = digits.digits(32)[0]
    digits.train(digits.make_vit(), (train_set[0][:640], train_set[1][:640]), 1, False, seed=1)
    canvases = digits_seg.datasets(160, 16)[0]
    digits_seg.train(digits_seg.Segmenter(), canvases, 1, False, seed=1)
