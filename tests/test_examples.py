"""examples/digits.py, digits_seg.py and digits_sam.py run as a user runs them (a fresh
process, no TRITON_INTERPRET, one thread), in their --quick smoke modes, and write their
reports; their training loops run at a step count torch's one-cycle schedule trips on."""
import pathlib
import sys

import pytest
import torch
from conftest import fresh_process_env, run_within_budget

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


@pytest.mark.parametrize("example,check", [("digits", check_digits), ("digits_seg", check_digits_seg),
                                           ("digits_sam", check_digits_seg)],  # the same table, a SAM backbone
                         ids=["digits", "digits_seg", "digits_sam"])
def test_example_quick(example, check, tmp_path):
    out = tmp_path / f"{example}.md"
    command = [sys.executable, str(ROOT / "examples" / f"{example}.py"), "--quick", "--out", str(out)]
    result = run_within_budget(command, 300, f"examples/{example}.py --quick", env=fresh_process_env())
    assert result.returncode == 0, result.stderr[-4000:]
    check(out.read_text())


@pytest.fixture
def one_thread():
    """Training in this process on one thread: on a busy machine two OpenMP threads that wait
    for each other at every barrier made these ten steps several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_training_runs_ten_steps(monkeypatch, one_thread):
    """Ten steps, where a 0.1 warm-up of the one-cycle schedule is exactly one step (torch's
    OneCycleLR divides by zero there), train in both examples (small batches: the step count
    is what matters)."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import digits
    import digits_seg
    train_set = digits.digits(32)[0]
    digits.train(digits.make_vit(), (train_set[0][:80], train_set[1][:80]), 1, False, seed=1, batch=8)
    canvases = digits_seg.datasets(40, 16)[0]
    digits_seg.train(digits_seg.Segmenter(), canvases, 1, False, seed=1, batch=4)


def test_a_run_past_its_budget_skips_and_says_why():
    """run_within_budget never fails a test on wall-clock alone: past its budget (scaled by the
    load) the child is stopped and the test skipped, with the reason and the child's output."""
    command = [sys.executable, "-c", "import sys, time; print('started', file=sys.stderr, flush=True); time.sleep(60)"]
    with pytest.raises(pytest.skip.Exception, match=r"still running after .* not a failure.*started"):
        run_within_budget(command, 0.5, "a sleeper")
    assert run_within_budget([sys.executable, "-c", "print('done')"], 60, "a quick one").stdout == "done\n"
