"""`make gpu-check` (`python -m benchmarks.gpu_check`): one command that proves or disproves the
package on a bare GPU machine in under 9 minutes, sized for a short device lease.

Phases run one after another, each in its own process group under its own time budget; one
that fails or runs out of time does not stop the next. Each writes its log as it runs, and
phases.json and the summary are rewritten after every phase, so a run killed at its limit
keeps what it did. Everything lands in benchmarks/results/<device>/:
  build.log       the extension built for this GPU only, with all cores, into the torch present
  cuda-tests.log  tests/test_cuda_shapes.py: every op at the models' real shapes on CUDA
  tests.log       the rest of the suite, Triton compiled (TRITON_INTERPRET=0)
  sanitizer.log   compute-sanitizer memcheck on the row-op and attention tests (where present)
  bench.log, results.json, results.md, *.png, autotune.json, headline.json   the headline cases
                  through the harness, and which autotune config won for each kernel and shape
  summary.md, summary.json   per target set in the issues: the number reached, hit or miss
`--plan` prints the phases, budgets, cases and targets without running anything (no GPU needed).
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple, Union

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SUMMARY_S = 10  # kept back at the end for the summary


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    budget_s: int
    what: str


PHASES = (
    Phase("build", 90, "pip install --no-build-isolation --no-deps -e . for this GPU's arch only, MAX_JOBS = all cores"),
    Phase("cuda-tests", 80, "tests/test_cuda_shapes.py: every op at DeiT-S/B and Swin-T 224/672 shapes, fp32/fp16/bf16"),
    Phase("tests", 150, "the rest of tests/, TRITON_INTERPRET=0 (Triton compiled, on CUDA tensors)"),
    Phase("sanitizer", 60, "compute-sanitizer memcheck on the row-op and attention tests"),
    Phase("bench", 140, "the headline cases through the harness (plus any time the phases before left over)"),
)
TOTAL_S = sum(p.budget_s for p in PHASES) + SUMMARY_S

# The row-op and attention tests memcheck runs: the fp32 real-shape ones at DeiT-S and Swin-T 224,
# and the CUDA cases of the op tests (empty selections, bounds, strides).
SANITIZED = (["tests/test_cuda_shapes.py", "-k", "float32 and (deit_small or swin_tiny_224) and (row_ops or attention)"],
             ["tests/test_rows.py", "tests/test_tokens.py", "tests/test_windows.py", "tests/test_varlen_attention.py",
              "-k", "cuda"])

# The headline cases, fastest first. Names are the harness's (python -m benchmarks --list
# --device cuda); the ones its suites do not list are built here with the suite's own builder:
# name -> (suite, builder, its arguments after cfg, plot group).
HEADLINE = (
    "ops/gather_tokens/64x197x768/s0.5", "ops/scatter_tokens/64x197x768/s0.5",
    "ops/gather_windows/4x168x168x96/s0.5", "ops/scatter_windows/4x168x168x96/s0.5",
    "blocks/swin_tiny_672/b4/stage0/s0.6",
    "models/swin_tiny_672/b4/sparsevit",
    "models/deit_small/b256/keep0.65",
    "attention/varlen/deit_small/b64/fwd", "attention/varlen/deit_small/b64/fwd+bwd",
    "attention/varlen/deit_base/b64/fwd+bwd",
    "attention/window/swin_tiny_672/b4/stage0/s0.0/fwd", "attention/window/swin_tiny_672/b4/stage0/s0.0/fwd+bwd",
    "attention/window/swin_tiny_672/b4/stage1/s0.0/fwd", "attention/window/swin_tiny_672/b4/stage2/s0.0/fwd",
    "attention/window/swin_tiny_672/b4/stage3/s0.0/fwd",
)
EXTRA_CASES = {
    "blocks/swin_tiny_672/b4/stage0/s0.6": ("blocks", "_swin", dict(model="swin_tiny", img_size=672, batch=4, stage=0,
                                                                   ratio=0.6), "swin_tiny_672 b4 stage0"),
    # keep 0.65 at blocks 3, 6, 9: 39 % of deit_small's FLOPs pruned (EViT's count, as the harness reports it)
    "models/deit_small/b256/keep0.65": ("models", "_vit", dict(model="deit_small", batch=256, keep_rate=0.65),
                                       "deit_small b256"),
}
# Timed again with torch.compile of the dense and naive baselines (it compiles for tens of seconds
# per model, so only these), as "<name>/compile".
COMPILED = ("blocks/swin_tiny_672/b4/stage0/s0.6", "models/swin_tiny_672/b4/sparsevit", "models/deit_small/b256/keep0.65")


@dataclasses.dataclass(frozen=True)
class Target:
    source: str  # the issue that set it
    text: str
    case: str
    # "speedup" (over the case's baseline), "over" (versus's time / method's), "pct_of_copy",
    # "efficiency" (speedup / FLOP ideal), "overhead" (a named overhead of the case)
    metric: str
    goal: float  # at least this ("overhead": at most)
    method: str = "ours"
    versus: Optional[str] = None


def _targets() -> List[Target]:
    t = []
    for case, goal, what in (("blocks/swin_tiny_672/b4/stage0/s0.6", 2.2, "Swin-T stage-0 block, 60 % of windows pruned"),
                             ("models/swin_tiny_672/b4/sparsevit", 1.6, "Swin-T 672² b4 backbone, SparseViT ratios"),
                             ("models/deit_small/b256/keep0.65", 1.9, "deit_small b256, ~40 % fewer FLOPs")):
        t += [Target("issue 7", f"{what}: ours over dense", case, "speedup", goal),
              Target("issue 7", f"{what}: ours over naive", case, "over", 1.5, versus="naive"),
              Target("issue 7", f"{what}: ours over torch.compile(naive)", f"{case}/compile", "over", 1.2,
                     versus="naive+compile")]
    for name in HEADLINE:
        if name.startswith("ops/"):
            t.append(Target("issues 2, 7", f"{name.split('/')[1]}: % of copy bandwidth", name, "pct_of_copy", 80))
        elif name.startswith("attention/varlen/"):
            if name.endswith("fwd+bwd"):
                t += [Target("issue 3", f"varlen {name.split('/')[2]} fwd+bwd: ours over padded SDPA", name, "speedup", 1.0),
                      Target("issue 3", f"varlen {name.split('/')[2]} fwd+bwd: ours over nested-jagged SDPA", name, "over",
                             1.0, versus="naive")]
            t.append(Target("issue 3", f"varlen {'/'.join(name.split('/')[2::2])}: cls_attn costs under 5 %", name,
                            "overhead", 0.05, method="cls_attn"))
        elif name.startswith("attention/window/"):
            stage, passes = name.split("/")[4], name.split("/")[-1]
            t.append(Target("issue 3", f"window attention {stage} {passes}: ours over timm WindowAttention", name,
                            "speedup", 1.5))
    return t


TARGETS = _targets()


# ----------------------------------------------------------------------------- the plan
def _catalogue(compile_: bool):
    """The harness's CUDA configuration and its cases by name (listing them needs no GPU)."""
    import torch

    from .core import Config
    from .suites import SUITES
    cfg = Config("cuda", torch.bfloat16, False, compile_)
    return cfg, {case.name: case for suite in SUITES.values() for case in suite.cases(cfg)}


def _extra_case(name: str, cfg):
    from .core import Case
    from .suites import SUITES
    suite, builder, kwargs, group = EXTRA_CASES[name]
    build = getattr(SUITES[suite], builder)
    return Case(suite, name, group, dict(kwargs), lambda: build(cfg, **kwargs))


def bench_cases() -> Tuple[list, Dict[str, str]]:
    """[(Case, Config)] in running order (the harness's case where it lists it, else one built
    here), and {name: why it is skipped}."""
    plain, plain_cases = _catalogue(False)
    compiled_cfg, compiled_cases = _catalogue(True)
    runs, skipped = [], {}
    for names, cfg, catalogue, suffix in ((HEADLINE, plain, plain_cases, ""),
                                          (COMPILED, compiled_cfg, compiled_cases, "/compile")):
        for name in names:
            case = catalogue.get(name) or (_extra_case(name, cfg) if name in EXTRA_CASES else None)
            if case is None:
                skipped[name + suffix] = "not in the harness (python -m benchmarks --list --device cuda)"
            else:
                runs.append((dataclasses.replace(case, name=name + suffix, group=case.group + suffix.replace("/", " ")), cfg))
    return runs, skipped


def plan_text() -> str:
    runs, skipped = bench_cases()
    _, catalogue = _catalogue(False)
    lines = [f"gpu-check plan: {len(PHASES) + 1} phases, {TOTAL_S} s in all (each phase stops at its budget; "
             "a failed phase does not stop the next)", ""]
    for p in PHASES:
        lines.append(f"  {p.name:<11} {p.budget_s:>4} s  {p.what}")
    lines += [f"  {'summary':<11} {SUMMARY_S:>4} s  summary.md / summary.json: per target, the number reached and hit / miss",
              "", "results: benchmarks/results/<device>/", "", "sanitizer runs:"]
    lines += [f"  pytest {shlex.join(args)}" for args in SANITIZED]
    lines += ["", "bench cases (bf16, harness timing):"]
    for case, cfg in runs:
        base = case.name.removesuffix("/compile")
        source = "harness" if base in catalogue else "built here with suites.{}.{}".format(*EXTRA_CASES[base][:2])
        lines.append(f"  {case.name}  [{source}{', torch.compile' if cfg.compile else ''}]")
    lines += [f"  {name}  [skipped: {why}]" for name, why in skipped.items()]
    lines += ["", "targets:"]
    lines += [f"  {t.source}: {t.text}: {_goal_text(t)}  ({t.case})" for t in TARGETS]
    lines.append("  issue 17, on every ops, blocks and models case that ran: ours at least as fast as naive, "
                 "and at 85 % of the FLOP ideal where that is 1.3x or more")
    return "\n".join(lines)


def _goal_text(t: Target) -> str:
    return {"speedup": f">= {t.goal}x", "over": f">= {t.goal}x", "pct_of_copy": f">= {t.goal:.0f} %",
            "efficiency": f">= {100 * t.goal:.0f} % of ideal", "overhead": f"<= {100 * t.goal:.0f} %"}[t.metric]


# ------------------------------------------------------------------------------ running
def no_gpu_reason() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return "gpu-check needs a CUDA device and a CUDA build of torch: torch is not importable here."
    if not torch.cuda.is_available():
        return (f"gpu-check needs a CUDA device: torch {torch.__version__} sees none on this machine "
                f"(torch.cuda.is_available() is False). `python -m benchmarks.gpu_check --plan` shows what it runs.")
    return None


def _pytest_options(workers: int) -> List[str]:
    options = ["-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist"):
        options += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout"):
        options += ["--timeout", "100"]
    return options


def phase_commands(name: str, python: str, out: pathlib.Path) -> Union[List[List[str]], str]:
    """The commands of a phase, or why it is skipped."""
    pytest = [python, "-m", "pytest"]
    workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    if name == "build":
        check = ("import sparse_ops, sparse_ops.kernels; from sparse_ops import _backend; "
                 "assert _backend.extension is not None, _backend.load_error; print(sparse_ops.backends())")
        return [[python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], [python, "-c", check]]
    if name == "cuda-tests":
        return [pytest + ["tests/test_cuda_shapes.py", "-v", "-rfEs"] + _pytest_options(workers)]
    if name == "tests":
        return [pytest + ["tests", "--ignore", "tests/test_cuda_shapes.py", "-q", "-rfEs", "--durations", "15"]
                + _pytest_options(workers)]
    if name == "sanitizer":
        sanitizer = shutil.which("compute-sanitizer") or shutil.which(
            "compute-sanitizer", path=os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin"))
        if sanitizer is None:
            return "compute-sanitizer not found (looked on PATH and in $CUDA_HOME/bin)"
        memcheck = [sanitizer, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "20"]
        return [memcheck + pytest + args + ["-q", "-p", "no:cacheprovider"] for args in SANITIZED]
    if name == "bench":
        return [[python, "-m", "benchmarks.gpu_check", "--bench-worker", str(out)]]
    raise ValueError(f"unknown phase {name!r}")


def phase_env(name: str, arch: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1", SPARSE_OPS_REQUIRE_EXT="1",
               SPARSE_OPS_REQUIRE_CUDA="1")
    if name == "build":  # this GPU only, every core (the Makefile's defaults are for CPU machines)
        env.update(TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count() or 1), FORCE_CUDA="1")
        if "CUDA_HOME" not in env and os.path.exists("/usr/local/cuda/bin/nvcc"):
            env["CUDA_HOME"] = "/usr/local/cuda"
    if name == "sanitizer":  # every allocation its own, so memcheck sees overruns inside torch's cached blocks
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    return env


def run_phase(phase: Phase, python: str, out: pathlib.Path, arch: str, limit_s: float) -> dict:
    commands = phase_commands(phase.name, python, out)
    if isinstance(commands, str):
        return {"status": "skipped", "reason": commands, "seconds": 0.0, "budget_s": phase.budget_s}
    log_path, start, status, rc = out / f"{phase.name}.log", time.monotonic(), "passed", 0
    with open(log_path, "w") as log:
        for command in commands:
            left = limit_s - (time.monotonic() - start)
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            proc = subprocess.Popen(command, cwd=REPO, env=phase_env(phase.name, arch), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the command and everything it started
                proc.wait()
                status, rc = "timed out", None
                log.write(f"\n[gpu-check] {phase.name}: stopped at its {limit_s:.0f} s limit\n")
                break
            if rc != 0:
                status = "failed"
                break
    return {"status": status, "rc": rc, "seconds": round(time.monotonic() - start, 1), "budget_s": phase.budget_s,
            "limit_s": round(limit_s), "log": log_path.name}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true", help="print the phases, budgets, cases and targets; run nothing")
    parser.add_argument("--bench-worker", type=pathlib.Path, metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plan:
        print(plan_text())
        return 0
    reason = no_gpu_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    if args.bench_worker:
        return bench_worker(args.bench_worker)

    import torch

    from .report import slug
    device = torch.cuda.get_device_name()
    arch = "{}.{}".format(*torch.cuda.get_device_capability())
    out = RESULTS / slug(device)
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check on {device} (sm_{arch.replace('.', '')}), torch {torch.__version__}: writing to {out}", flush=True)
    start, phases = time.monotonic(), {}
    for i, phase in enumerate(PHASES):
        left = TOTAL_S - SUMMARY_S - (time.monotonic() - start) - sum(p.budget_s for p in PHASES[i + 1:])
        limit = left if phase is PHASES[-1] else min(phase.budget_s, left)  # the last phase gets what is left
        phases[phase.name] = run_phase(phase, sys.executable, out, arch, max(limit, 1))
        p = phases[phase.name]
        print(f"[{time.monotonic() - start:5.0f} s] {phase.name}: {p['status']}"
              f"{' (' + p['reason'] + ')' if 'reason' in p else ''} in {p['seconds']:.0f} s", flush=True)
        write_summary(out, device, phases)
    print(write_summary(out, device, phases))
    return 0 if all(p["status"] in ("passed", "skipped") for p in phases.values()) else 1


# ------------------------------------------------------------------- the bench phase's worker
def autotune_winners() -> dict:
    """{kernel: {"candidates": n, "winners": {key: config}}} of every autotuned Triton kernel."""
    from triton.runtime.autotuner import Autotuner

    from sparse_ops.kernels import fused_linear, varlen_attention, window_attention
    winners = {}
    for module in (fused_linear, varlen_attention, window_attention):
        for name, kernel in vars(module).items():
            if isinstance(kernel, Autotuner):
                winners[f"{module.__name__.rsplit('.', 1)[1]}.{name}"] = {
                    "candidates": len(kernel.configs), "winners": {str(key): str(config) for key, config in kernel.cache.items()}}
    return winners


def bench_worker(out: pathlib.Path) -> int:
    """Runs the headline cases as `python -m benchmarks` does, rewriting its files after every case."""
    from . import report
    from .run import environment, run_case
    from .suites import SUITES

    runs, skipped = bench_cases()
    if not runs:
        print("no headline case is in the harness", file=sys.stderr)
        return 1
    (out / "headline.json").write_text(json.dumps({"cases": [c.name for c, _ in runs], "skipped": skipped}, indent=1) + "\n")
    env = environment(runs[0][1], ["(the bench phase of python -m benchmarks.gpu_check)"])
    note = ("\nCases named `.../compile` also time torch.compile of the dense and naive baselines; "
            "the others do not (to fit the lease).\n")
    chunks, records = [report.header(env) + note], []
    for i, (case, cfg) in enumerate(runs):
        suite = SUITES[case.suite]
        if i == 0 or case.suite != runs[i - 1][0].suite:
            chunks.append(report.suite_header(suite, "cuda"))
        records.append(run_case(case, cfg))
        chunks.append(report.case_rows(records[-1], report.columns(suite, "cuda")))
        report.write(out, env, records, "".join(chunks))
        (out / "autotune.json").write_text(json.dumps(autotune_winners(), indent=1) + "\n")
        print(f"{case.name}: {records[-1]['wall_s']:.1f} s", flush=True)
    chunks.append(report.plots_section(report.plot(records, SUITES, out, env)))
    report.write(out, env, records, "".join(chunks))
    return 0


# -------------------------------------------------------------------------------- summary
def _reached(t: Target, records: Dict[str, dict]) -> Tuple[Optional[float], str]:
    """(the number, "" or why there is none)."""
    r = records.get(t.case)
    if r is None:
        return None, "not run"
    if r["error"] is not None:
        return None, f"case failed: {r['error']['error']}"
    if t.metric == "overhead":
        value = r["overheads"].get(t.method)
        return value, "" if value is not None else "not measured"
    methods = r["methods"]
    for name in (t.method, t.versus):
        if name is not None and methods.get(name, {}).get("status") != "ok":
            m = methods.get(name, {})
            return None, f"{name} {m.get('status', 'missing')}: {m.get('error') or m.get('reason') or ''}".strip(": ")
    if t.metric == "over":
        return methods[t.versus]["median_s"] / methods[t.method]["median_s"], ""
    return methods[t.method][t.metric], ""


def _rule_targets(records: Dict[str, dict]) -> List[Target]:
    """Issue 17's rules, applied to the cases that ran: ours at least 85 % of the FLOP ideal where
    the ideal is 1.3x or more, and ours at least as fast as naive in every ops, blocks and models case."""
    rules = []
    for name, r in records.items():
        if r["suite"] in ("ops", "blocks", "models"):
            rules.append(Target("issue 17", f"{name}: ours at least as fast as naive", name, "over", 1.0, versus="naive"))
            if (r.get("ideal_speedup") or 0) >= 1.3:
                rules.append(Target("issue 17", f"{name}: ours at 85 % of the FLOP ideal", name, "efficiency", 0.85))
    return rules


def _test_counts(log: pathlib.Path) -> str:
    """pytest's closing counts ("12 passed, 1 failed in 30s"), or what the log shows so far."""
    if not log.exists():
        return ""
    text = log.read_text(errors="replace")
    closing = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|errors|skipped)\b.*?)\s*=*$", text, re.M)
    return closing[-1] if closing else f"{len(re.findall(r' PASSED', text))} passed so far (no closing line)"


def write_summary(out: pathlib.Path, device: str, phases: dict) -> str:
    results = out / "results.json"
    records = {r["name"]: r for r in json.loads(results.read_text())["cases"]} if results.exists() else {}
    rows = []
    for t in TARGETS + _rule_targets(records):
        value, why = _reached(t, records)
        hit = None if value is None else (value <= t.goal if t.metric == "overhead" else value >= t.goal)
        shown = None if value is None else (f"{100 * value:+.1f} %" if t.metric == "overhead" else
                                             f"{value:.0f} %" if t.metric == "pct_of_copy" else
                                             f"{100 * value:.0f} %" if t.metric == "efficiency" else f"{value:.2f}x")
        rows.append({"source": t.source, "target": t.text, "case": t.case,
                     "goal": _goal_text(t),
                     "reached": value, "shown": shown or why, "hit": hit})
    hits = sum(r["hit"] is True for r in rows)
    misses = sum(r["hit"] is False for r in rows)
    for name, p in phases.items():
        if name in ("cuda-tests", "tests", "sanitizer") and "log" in p:
            p["tests"] = _test_counts(out / p["log"])
    (out / "phases.json").write_text(json.dumps(phases, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps({"device": device, "phases": phases, "targets": rows}, indent=1) + "\n")
    md = [f"# gpu-check summary: {device}", "", "| phase | status | time | budget | tests |", "|---|---|---|---|---|"]
    md += [f"| {n} | {p['status']}{': ' + p['reason'] if 'reason' in p else ''} | {p['seconds']:.0f} s | {p['budget_s']} s "
           f"| {p.get('tests', '')} |" for n, p in phases.items()]
    md += ["", f"Targets: {hits} hit, {misses} missed, {len(rows) - hits - misses} not measured.", "",
           "| source | target | goal | reached | |", "|---|---|---|---|---|"]
    md += [f"| {r['source']} | {r['target']} | {r['goal']} | {r['shown']} | "
           f"{ {True: 'hit', False: 'miss', None: '–'}[r['hit']] } |" for r in rows]
    text = "\n".join(md) + "\n"
    (out / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
