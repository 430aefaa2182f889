"""Interleaved timing of the methods of one case.

All methods of a case are timed in the same process, round after round, each round running
every method once (on CPU: one block of calls), so that clock and thermal drift hit them
alike. Reported: median and spread over the rounds.

- CUDA: one call between two CUDA events, after writing a 256 MiB buffer so that no method
  finds its inputs in L2 (triton.testing.do_bench's convention); warm-up first.
- CPU: torch.utils.benchmark.Timer, one block of calls (at least ~10 ms) per round.
- Peak memory (CUDA only; None on CPU): torch.cuda.max_memory_allocated during one call,
  minus what was allocated before it (activations, workspace and outputs; not weights or
  inputs).
"""
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
import torch.utils.benchmark as torch_benchmark


@dataclass(frozen=True)
class Timing:
    """Seconds per call."""

    median: float
    q25: float
    q75: float
    min: float
    max: float
    rounds: int
    first_call: float  # the first call alone: includes torch.compile's compilation
    peak_mem: Optional[int]  # bytes


@dataclass(frozen=True)
class Budget:
    seconds_per_method: float  # timed rounds stop after about this much per method...
    min_rounds: int  # ...but run at least this many rounds
    max_rounds: int
    warmup_s: float


def budget(device: str, quick: bool, min_rounds: Optional[int] = None) -> Budget:
    if quick:
        return Budget(0.0, min_rounds or 3, min_rounds or 3, 0.0)
    plan = Budget(0.25, 10, 200, 0.025) if device == "cuda" else Budget(0.4, 5, 30, 0.05)
    if min_rounds is None:
        return plan
    return Budget(plan.seconds_per_method, min_rounds, max(min_rounds, plan.max_rounds), plan.warmup_s)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(methods: Dict[str, Callable[[], object]], device: str, plan: Budget) -> Dict[str, Union[Timing, Exception]]:
    """Times every method; a method that raises gets its exception instead of a Timing."""
    failed: Dict[str, Exception] = {}
    first: Dict[str, float] = {}
    per_call: Dict[str, float] = {}
    for name, fn in methods.items():
        try:
            first[name] = _seconds(fn, device)
            calls, spent = 1, _seconds(fn, device)
            while spent < plan.warmup_s or calls < 2:
                spent += _seconds(fn, device)
                calls += 1
            per_call[name] = spent / calls
        except Exception as e:  # a failing method is reported; the others still run
            failed[name] = e
    running = {name: fn for name, fn in methods.items() if name not in failed}
    if device == "cuda":
        times = _rounds_cuda(running, per_call, plan, failed)
    else:
        times = _rounds_cpu(running, per_call, plan, failed)
    results: Dict[str, Union[Timing, Exception]] = dict(failed)
    for name, samples in times.items():
        if name in failed:
            continue
        q25, _, q75 = statistics.quantiles(samples, n=4, method="inclusive")
        results[name] = Timing(statistics.median(samples), q25, q75, min(samples), max(samples), len(samples),
                               first[name], _peak_memory(methods[name]) if device == "cuda" else None)
    return {name: results[name] for name in methods}


def _rounds(per_round: float, count: int, plan: Budget) -> int:
    wanted = plan.seconds_per_method * count / max(per_round, 1e-9)
    return int(min(max(wanted, plan.min_rounds), plan.max_rounds))


def _rounds_cpu(methods, per_call, plan: Budget, failed) -> Dict[str, list]:
    timers, numbers = {}, {}
    for name, fn in methods.items():
        timers[name] = torch_benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        numbers[name] = max(1, int(0.01 / per_call[name]))
    rounds = _rounds(sum(numbers[n] * per_call[n] for n in methods), len(methods), plan)
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name in methods:
            if name in failed:
                continue
            try:
                times[name].append(timers[name].timeit(numbers[name]).median)
            except Exception as e:
                failed[name] = e
    return times


def _rounds_cuda(methods, per_call, plan: Budget, failed) -> Dict[str, list]:
    l2_flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    rounds = _rounds(sum(per_call.values()), len(methods), plan)
    events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                     for _ in range(rounds)] for name in methods}
    for r in range(rounds):
        for name, fn in methods.items():
            if name in failed:
                continue
            l2_flush.zero_()
            start, end = events[name][r]
            start.record()
            try:
                fn()
            except Exception as e:
                failed[name] = e
            end.record()
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) / 1e3 for s, e in pairs] for name, pairs in events.items() if name not in failed}


def _peak_memory(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
