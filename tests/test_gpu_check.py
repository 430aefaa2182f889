"""benchmarks/gpu_check.py (`make gpu-check`) on a machine without a GPU: its plan names only
cases the harness can run, fits the lease, and the command stops at once without CUDA; the
phase runner, the bench worker and the summary work on stand-ins; the budgets cover the
rehearsal's measured figures, and the parts of the rehearsal that need neither a build nor a
compile run here."""
import inspect
import json
import os
import re
import sys
import time

import pytest
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


def test_budgets_fit_the_lease():
    """Phases, the machine's start and a rerun within the lease's device time; the whole check
    within one command's limit, transfers included; a rerun gets at least the 4 minutes below
    which no machine is started."""
    assert all(p.budget_s > 0 for p in gpu_check.PHASES)
    assert gpu_check.TOTAL_S == sum(p.budget_s for p in gpu_check.PHASES) + gpu_check.SUMMARY_S
    assert gpu_check.TOTAL_S + gpu_check.STARTUP_S + gpu_check.RERUN_S <= gpu_check.LEASE_S == 15 * 60
    assert gpu_check.TOTAL_S + gpu_check.TRANSFER_S <= gpu_check.CALL_LIMIT_S == 10 * 60
    assert gpu_check.STARTUP_S >= 120 and gpu_check.RERUN_S >= 4 * 60


def test_every_budget_covers_its_rehearsed_figure():
    budgets = {p.name: p.budget_s for p in gpu_check.PHASES}
    assert {"build", "cuda-tests", "bench"} <= set(gpu_check.REHEARSED) <= set(budgets)
    for name, rehearsed in gpu_check.REHEARSED.items():
        assert 0 < rehearsed.seconds <= budgets[name], (name, rehearsed)


def test_rehearsal_estimates_and_verdict():
    """The 16-core build: the slowest unit instead of the compile span, scaled by CPU over wall
    time; the bench waits for every bf16 config in one process, the CUDA tests for the largest
    dtype x kernel family group of first configs (CPU seconds); an estimate above its budget is
    named."""
    units = {"ops.o": (100.0, 110.0), "rows_cpu.o": (0.0, 40.0), "rows_cuda.o": (40.0, 106.0)}
    busy = 10.0 + 40.0 + 66.0 + (130.0 - 110.0)
    assert gpu_check.build_estimate(130.0, units, cpu_s=busy) == 130.0 - 110.0 + 66.0  # an idle machine
    assert gpu_check.build_estimate(130.0, units, cpu_s=busy / 2) == (130.0 - 110.0 + 66.0) / 2  # twice as slow
    record = dict(first=True, cpu_s=2.0, seconds=9.0)
    records = [dict(record, kernel="varlen_attention._forward_kernel D=64", dtype="bf16"),
               dict(record, kernel="varlen_attention._forward_kernel D=64", dtype="bf16", first=False, cpu_s=3.0),
               dict(record, kernel="varlen_attention._backward_dq_kernel D=64", dtype="fp32", cpu_s=7.0),
               dict(record, kernel="varlen_attention._backward_dkdv_kernel D=64", dtype="fp32", cpu_s=6.0),
               dict(record, kernel="fused_linear._ln_linear_kernel", dtype="fp32", cpu_s=9.0)]
    assert gpu_check.compile_estimates(records) == {"bench": 5.0, "cuda-tests": 13.0}
    budget = {p.name: p.budget_s for p in gpu_check.PHASES}
    assert gpu_check.over_budget({"build": budget["build"], "bench": budget["bench"] + 1}) == ["bench"]


def test_headline_kernels_are_the_ones_the_headline_cases_run():
    labels = {"varlen_attention._forward_kernel D=64": True, "varlen_attention._forward_kernel D=128": False,
              "window_attention._backward_kernel n=49 D=32": True, "window_attention._forward_kernel n=49 D=64": False,
              "window_attention._forward_blocked_kernel n=576 D=32": False,
              "window_attention._forward_kernel n=196 D=64 rel": True,  # SAM-B, inference only
              "window_attention._backward_kernel n=196 D=64 rel": False, "fused_linear._ln_linear_kernel": True,
              "fused_linear._ln_linear_kernel no-ln": True, "fused_linear._linear_scatter_kernel": True,
              "fused_linear._row_stats_kernel C=384": True, "fused_linear._row_stats_kernel C=1536": False}
    assert {label: bool(gpu_check.HEADLINE_KERNELS.search(label)) for label in labels} == labels


def test_compile_worker_times_each_config_of_the_headline_kernels(monkeypatch, capsys):
    sys.path.insert(0, os.path.dirname(__file__))
    import compile_kernels

    def compile_configs(label, *args, **kwargs):
        for config in ("first", "second"):
            time.sleep(0.05)
            print(json.dumps({"kernel": label, "dtype": "bf16", "config": config, "first": config == "first"}))

    def main(arch, dtype):
        compile_kernels.compile_configs("varlen_attention._forward_kernel D=64")
        compile_kernels.compile_configs("varlen_attention._forward_kernel D=128")  # not a headline kernel

    monkeypatch.setattr(compile_kernels, "compile_configs", compile_configs)
    monkeypatch.setattr(compile_kernels, "main", main)
    assert gpu_check.compile_worker("bf16") == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kernel"], r["config"]) for r in records] == [("varlen_attention._forward_kernel D=64", "first"),
                                                             ("varlen_attention._forward_kernel D=64", "second")]
    assert all(r["seconds"] >= 0.04 and 0 <= r["cpu_s"] <= r["seconds"] + 1 for r in records)


def test_rehearsal_plan_part(capsys):
    """The part of --rehearse that CI can afford: the plan, the lease arithmetic, the figures."""
    assert gpu_check.main(["--rehearse", "plan"]) == 0
    text = capsys.readouterr().out
    assert "plan:" in text and f"of {gpu_check.LEASE_S} s" in text and "within its phase's budget" in text
    assert all(f"  {name}: " in text for name in gpu_check.REHEARSED)


def test_phases_run_offline_and_tests_without_autotuning(monkeypatch):
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    for phase in gpu_check.PHASES:
        env = gpu_check.phase_env(phase.name, "9.0")
        assert {k: env[k] for k in gpu_check.OFFLINE_ENV} == gpu_check.OFFLINE_ENV
        assert env["PIP_NO_INDEX"] == "1" and env["HF_HUB_OFFLINE"] == "1" and env["TRITON_INTERPRET"] == "0"
        assert env.get("SPARSE_OPS_AUTOTUNE") == (None if phase.name == "bench" else "0")
    build = gpu_check.phase_env("build", "9.0")
    assert build["MAX_JOBS"] == str(os.cpu_count()) and build["TORCH_CUDA_ARCH_LIST"] == "9.0"
    # a CUDA_HOME without nvcc (the Makefile sets one) gives way to one that has it, or to torch's search
    assert build.get("CUDA_HOME") == ("/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def test_pytest_runs_in_one_process_without_xdist(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(gpu_check, "_has", lambda module: False)
    assert gpu_check._pytest_options("loadfile", 60) == ["-p", "no:cacheprovider"]
    monkeypatch.setattr(gpu_check, "_has", lambda module: True)
    assert gpu_check._pytest_options("loadfile", 60) == ["-p", "no:cacheprovider", "-n", "8", "--dist", "loadfile",
                                                         "--timeout", "60"]
    assert "-n" not in gpu_check._pytest_options(None, 60)


def test_cuda_tests_split_into_selections_that_cover_every_test_once():
    """Each test id of tests/test_cuda_shapes.py (and any other) is chosen by exactly one of the
    side-by-side processes' -k expressions."""
    (step,) = gpu_check.phase_commands("cuda-tests", sys.executable, None)
    assert isinstance(step, tuple) and len(step) == len(gpu_check.DTYPE_SELECTIONS) * len(gpu_check.FAMILY_SELECTIONS)
    expressions = [command[command.index("-k") + 1] for command in step]
    ids = [f"test_{test}[{param}-{dtype}]" for test in ("varlen_attention", "window_attention", "window_row_ops",
                                                        "gather_layernorm_linear", "new_op")
           for param in ("deit_small", "swin_tiny_224-stage0") for dtype in ("float32", "float16", "bfloat16", "int64")]
    ids.append("test_without_params")
    for test_id in ids:  # -k: each word is true where the id holds it
        chosen = [e for e in expressions if eval(re.sub(r"\b(?!and\b|or\b|not\b)(\w+)\b",
                                                        lambda m: str(m[1] in test_id), e))]
        assert len(chosen) == 1, (test_id, chosen)


def test_side_by_side_commands(tmp_path, monkeypatch):
    """A tuple's commands run at once (each waits to see the other started), their logs end up in
    the phase's; a command that selects no tests (exit 5) passes, a failing one fails the phase,
    and at the limit all are stopped."""
    def command(code, me="", other="", sleep=0):
        wait = (f"pathlib.Path({str(tmp_path / me)!r}).touch(); other = pathlib.Path({str(tmp_path / other)!r}); "
                "deadline = time.monotonic() + 60\nwhile not other.exists() and time.monotonic() < deadline: "
                "time.sleep(0.02)\n") if me else ""
        return [sys.executable, "-c", f"import pathlib, time\n{wait}print('part {code}', flush=True); "
                                      f"time.sleep({sleep}); raise SystemExit({code})"]

    steps = {"ok": [(command(0, "a", "b"), command(5, "b", "a"))], "fails": [(command(0), command(1))],
             "slow": [(command(0, sleep=60), command(0, sleep=60))]}
    monkeypatch.setattr(gpu_check, "phase_commands", lambda name, python, out: steps[name])
    ok = gpu_check.run_phase(gpu_check.Phase("ok", 30, ""), sys.executable, tmp_path, "9.0", 30.0)
    assert ok["status"] == "passed"
    assert "part 0" in (tmp_path / "ok.log").read_text() and "part 5" in (tmp_path / "ok.log").read_text()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a", "b", "ok.log"]
    assert gpu_check.run_phase(gpu_check.Phase("fails", 30, ""), sys.executable, tmp_path, "9.0", 30.0)["rc"] == 1
    start = time.monotonic()
    slow = gpu_check.run_phase(gpu_check.Phase("slow", 1, ""), sys.executable, tmp_path, "9.0", 1.0)
    # killed at its limit: the commands sleep 60 s after their start, however loaded the machine
    assert slow["status"] == "timed out" and time.monotonic() - start < 60


def test_test_counts_add_up_every_run_in_a_log(tmp_path):
    log = tmp_path / "sanitizer.log"
    log.write_text("== 3 passed, 1 skipped, 7 deselected in 4.2s ==\n...\n== 1 failed, 2 passed, 1 error in 1.0s ==\n"
                   "== 9 deselected in 0.5s ==\n")
    assert gpu_check._test_counts(log) == "5 passed, 1 skipped, 1 failed, 1 error"


def _fake_sanitizer(directory, script):
    path = directory / "compute-sanitizer"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def test_sanitizer_refusing_the_device_skips_its_phase_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    _fake_sanitizer(tmp_path, "echo '========= COMPUTE-SANITIZER'; echo '========= Error: Device not supported'; exit 1")
    reason = gpu_check.phase_commands("sanitizer", sys.executable, tmp_path)
    assert isinstance(reason, str) and "Device not supported" in reason and "exit 1" in reason
    status = gpu_check.run_phase(gpu_check.Phase("sanitizer", 60, ""), sys.executable, tmp_path, "9.0", 60)
    assert status["status"] == "skipped" and "Device not supported" in status["reason"]
    sanitizer = _fake_sanitizer(tmp_path, "exit 0")
    commands = gpu_check.phase_commands("sanitizer", sys.executable, tmp_path)
    assert len(commands) == len(gpu_check.SANITIZED) and all(c[0] == str(sanitizer) for c in commands)


def test_only_reruns_the_named_phases_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    ran = []

    def run_phase(phase, python, out, arch, limit_s):
        ran.append((phase.name, limit_s))
        return {"status": "passed", "rc": 0, "seconds": 1.0, "budget_s": phase.budget_s}

    monkeypatch.setattr(gpu_check, "run_phase", run_phase)
    assert gpu_check.main([]) == 0
    assert [name for name, _ in ran] == [p.name for p in gpu_check.PHASES]
    ran.clear()
    monkeypatch.setattr(gpu_check, "run_phase", lambda *args: {**run_phase(*args), "status": "failed", "rc": 1})
    assert gpu_check.main(["--only", "bench"]) == 1
    assert [name for name, _ in ran] == ["bench"] and ran[0][1] > gpu_check.PHASES[-1].budget_s - 1
    phases = json.loads((tmp_path / "fake_gpu" / "phases.json").read_text())
    assert list(phases) == [p.name for p in gpu_check.PHASES]
    assert phases["bench"]["status"] == "failed" and phases["build"]["status"] == "passed"
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "bogus"])


def test_plan_prints_phases_cases_and_targets(capsys):
    assert gpu_check.main(["--plan"]) == 0
    text = capsys.readouterr().out
    for name in [p.name for p in gpu_check.PHASES] + list(gpu_check.HEADLINE) + [t.text for t in gpu_check.TARGETS]:
        assert name in text


def test_without_a_gpu_it_stops_at_once(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run_phase", lambda *args: pytest.fail("a phase ran without a GPU"))
    assert gpu_check.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_a_phase_stops_at_its_limit_and_a_failure_is_recorded(tmp_path, monkeypatch):
    commands = {"sleeps": [[sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"]],
                "fails": [[sys.executable, "-c", "raise SystemExit(3)"], [sys.executable, "-c", "print('not run')"]]}
    monkeypatch.setattr(gpu_check, "phase_commands", lambda name, python, out: commands[name])
    start = time.monotonic()
    slept = gpu_check.run_phase(gpu_check.Phase("sleeps", 1, ""), sys.executable, tmp_path, "9.0", 1.0)
    # killed at its limit: the command sleeps 60 s after it prints, however loaded the machine
    assert slept["status"] == "timed out" and time.monotonic() - start < 60
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
