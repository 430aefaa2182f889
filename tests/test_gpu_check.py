"""benchmarks/gpu_check.py (`make gpu-check`) on a machine without a GPU: its plan names only
cases the harness can run, fits the lease, and the command stops at once without CUDA; the
phase runner, the bench worker and the summary work on stand-ins."""
import inspect
import json
import sys
import time

import torch

from benchmarks import gpu_check
from benchmarks.core import Config
from benchmarks.suites import SUITES


def test_every_planned_case_exists_and_every_target_is_timed():
    runs, skipped = gpu_check.bench_cases()
    assert not skipped, skipped
    _, catalogue = gpu_check._catalogue(False)
    for name in gpu_check.HEADLINE + gpu_check.COMPILED:
        if name not in catalogue:
            suite, builder, kwargs, _ = gpu_check.EXTRA_CASES[name]
            inspect.signature(getattr(SUITES[suite], builder)).bind(Config("cuda", torch.bfloat16, False, False), **kwargs)
    names = [case.name for case, _ in runs]
    assert len(names) == len(set(names))
    assert {t.case for t in gpu_check.TARGETS} <= set(names)
    assert all(cfg.compile == case.name.endswith("/compile") for case, cfg in runs)


def test_budgets_fit_under_nine_minutes():
    assert all(p.budget_s > 0 for p in gpu_check.PHASES)
    assert gpu_check.TOTAL_S == sum(p.budget_s for p in gpu_check.PHASES) + gpu_check.SUMMARY_S <= 9 * 60


def test_plan_prints_phases_cases_and_targets(capsys):
    assert gpu_check.main(["--plan"]) == 0
    text = capsys.readouterr().out
    for name in [p.name for p in gpu_check.PHASES] + list(gpu_check.HEADLINE) + [t.text for t in gpu_check.TARGETS]:
        assert name in text


def test_without_a_gpu_it_stops_at_once(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    start = time.monotonic()
    assert gpu_check.main([]) == 2
    assert time.monotonic() - start < 5
    assert "needs a CUDA device" in capsys.readouterr().err


def test_a_phase_stops_at_its_limit_and_a_failure_is_recorded(tmp_path, monkeypatch):
    commands = {"sleeps": [[sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"]],
                "fails": [[sys.executable, "-c", "raise SystemExit(3)"], [sys.executable, "-c", "print('not run')"]]}
    monkeypatch.setattr(gpu_check, "phase_commands", lambda name, python, out: commands[name])
    start = time.monotonic()
    slept = gpu_check.run_phase(gpu_check.Phase("sleeps", 1, ""), sys.executable, tmp_path, "9.0", 1.0)
    assert slept["status"] == "timed out" and time.monotonic() - start < 10
    assert "started" in (tmp_path / "sleeps.log").read_text()
    failed = gpu_check.run_phase(gpu_check.Phase("fails", 10, ""), sys.executable, tmp_path, "9.0", 10.0)
    assert failed["status"] == "failed" and failed["rc"] == 3
    assert "not run" not in (tmp_path / "fails.log").read_text()


def test_bench_worker_and_summary(tmp_path, monkeypatch):
    """The worker writes the harness's files for the cases it gets; the summary reads them: a
    target on a case that ran gets its number and hit / miss, one on a case that did not, none."""
    cfg = Config("cpu", torch.float32, True, False)
    case = next(c for c in SUITES["ops"].cases(cfg) if c.name.startswith("ops/gather_tokens/"))
    monkeypatch.setattr(gpu_check, "bench_cases", lambda: ([(case, cfg)], {"models/x": "not in the harness"}))
    assert gpu_check.bench_worker(tmp_path) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results["cases"]] == [case.name]
    assert json.loads((tmp_path / "headline.json").read_text())["skipped"] == {"models/x": "not in the harness"}
    assert "winners" in next(iter(json.loads((tmp_path / "autotune.json").read_text()).values()))

    target = gpu_check.Target("issue 2", "gather bandwidth", case.name, "pct_of_copy", 80)
    missing = gpu_check.Target("issue 7", "not run", "blocks/none", "speedup", 2.2)
    monkeypatch.setattr(gpu_check, "TARGETS", [target, missing])
    (tmp_path / "tests.log").write_text("...\n3 passed, 1 failed, 2 skipped in 4.2s\n")
    phases = {"tests": {"status": "failed", "rc": 1, "seconds": 4.0, "budget_s": 150, "log": "tests.log"}}
    text = gpu_check.write_summary(tmp_path, "cpu", phases)
    rows = json.loads((tmp_path / "summary.json").read_text())["targets"]
    pct = results["cases"][0]["methods"]["ours"]["pct_of_copy"]
    assert rows[0]["reached"] == pct and rows[0]["hit"] == (pct >= 80)
    assert rows[1]["reached"] is None and rows[1]["hit"] is None and rows[1]["shown"] == "not run"
    assert any(r["source"] == "issue 17" and r["case"] == case.name for r in rows)  # ours vs naive on an ops case
    assert "3 passed, 1 failed, 2 skipped" in text and "gather bandwidth" in text
