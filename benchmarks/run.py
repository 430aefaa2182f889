"""Runs one case (build, time its methods, derive the metrics) and records the environment."""
import datetime
import gc
import pathlib
import platform
import shlex
import subprocess
import time
import traceback
from typing import Optional

import timm
import torch

import sparse_ops

from .core import METHOD_ORDER, Case, Config, Unavailable
from .timing import Timing, budget, measure

SPARSE_METHODS = ("naive", "naive+compile", "ours", "ours+cls")  # the ones an efficiency is reported for
REPO = pathlib.Path(__file__).resolve().parents[1]


def _error(e: Exception) -> dict:
    lines = str(e).strip().splitlines()
    return {"status": "error", "error": f"{type(e).__name__}: {lines[0] if lines else ''}"[:300],
            "traceback": "".join(traceback.format_exception(e))}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _metrics(name: str, t: Timing, base: Optional[float], ideal: Optional[float], nbytes: Optional[int],
             copy: Optional[float]) -> dict:
    speedup = _ratio(base, t.median) if name != "copy" else None  # the copy is a yardstick, not a contender
    return {
        "status": "ok", "median_s": t.median, "q25_s": t.q25, "q75_s": t.q75, "min_s": t.min, "max_s": t.max,
        "rounds": t.rounds, "first_call_s": t.first_call, "peak_mem_bytes": t.peak_mem, "speedup": speedup,
        "efficiency": _ratio(speedup, ideal) if name in SPARSE_METHODS else None,
        "gbps": nbytes / t.median / 1e9 if nbytes else None,
        "pct_of_copy": 100 * (copy / t.median) if nbytes and copy else None,  # exactly 100 for the copy
    }


def run_case(case: Case, cfg: Config) -> dict:
    """The case's record in results.json; a case or method that fails is recorded, not raised."""
    if cfg.compile:
        torch._dynamo.reset()  # each case compiles on its own, and does not hit the recompile limit
    record = _run(case, cfg)
    gc.collect()  # the case's tensors and compiled graphs go before the next case
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    return record


def _run(case: Case, cfg: Config) -> dict:
    record = {"suite": case.suite, "name": case.name, "group": case.group, "params": case.params, "error": None}
    start = time.perf_counter()
    try:
        setup = case.build()
        with torch.set_grad_enabled(setup.grad):
            timings = measure({n: m for n, m in setup.methods.items() if callable(m)}, cfg.device,
                              budget(cfg.device, cfg.quick, cfg.rounds))
    except Exception as e:  # e.g. out of memory building the case, or an error CUDA reports late
        record.update(error=_error(e), wall_s=time.perf_counter() - start)
        return record
    ideal = _ratio(*setup.flops) if setup.flops else None
    record.update(baseline=setup.baseline, sparsity=setup.sparsity, bytes=setup.bytes, ideal_speedup=ideal,
                  flops=dict(zip(("dense", "sparse"), setup.flops)) if setup.flops else None)

    def median(name):
        t = timings.get(name)
        return t.median if isinstance(t, Timing) else None

    methods = {}
    for name in sorted(setup.methods, key=lambda n: (METHOD_ORDER + (n,)).index(n)):
        method, timing = setup.methods[name], timings.get(name)
        if isinstance(method, Unavailable):
            methods[name] = {"status": "unavailable", "reason": method.reason}
        elif isinstance(method, Exception) or isinstance(timing, Exception):
            methods[name] = _error(method if isinstance(method, Exception) else timing)
        else:
            methods[name] = _metrics(name, timing, median(setup.baseline), ideal, setup.bytes, median("copy"))
    record["methods"] = methods
    ratios = {name: _ratio(median(a), median(b)) for name, (a, b) in setup.overheads.items()}
    record["overheads"] = {name: None if r is None else r - 1 for name, r in ratios.items()}
    record["wall_s"] = time.perf_counter() - start  # building, compiling and timing the case
    return record


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(cfg: Config, argv) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    status = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    return {
        "device": torch.cuda.get_device_name() if cfg.device == "cuda" else _cpu_name(),
        "device_type": cfg.device,
        "dtype": str(cfg.dtype).replace("torch.", ""),
        "compile": cfg.compile,
        "quick": cfg.quick,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "timm": timm.__version__,
        "sparse_ops": sparse_ops.__version__,
        "backends": sparse_ops.backends(),
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks", *argv]),
        "timer": ("CUDA events, one call per round after a 256 MiB L2 flush" if cfg.device == "cuda"
                  else "torch.utils.benchmark.Timer, one block of calls per round"),
    }
