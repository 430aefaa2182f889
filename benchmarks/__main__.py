"""Benchmarks of sparse_ops against dense and naive sparse baselines.

Every case times, in one process and interleaved round by round: the dense timm baseline,
the naive sparse baseline (plain PyTorch index ops around the unchanged timm layers),
torch.compile of both (--compile, the default on CUDA), and ours (sparse_ops; "unavailable"
where this checkout does not have it yet). It reports the median and spread of the rounds,
the speedup over the baseline, the ideal speedup from the FLOP ratio and the efficiency
(achieved / ideal), peak memory (CUDA), and for memory-bound ops GB/s and % of a device copy
measured in the same run. A case that fails is reported and the others still run.

Rows whose spread passes ±10 % (theirs or their baseline's) or whose efficiency passes
100 % are marked unreliable (⚠), with what to do about them.

Writes results.json, results.md (the tables printed here) and speedup-vs-sparsity plots to
the output folder it prints. Defaults: the best device present (CUDA, else CPU), bfloat16 on
CUDA and float32 on CPU; on CPU smaller shapes, one thread (the README's table) and no
torch.compile (about 25 minutes on 2 cores; --quick: tiny shapes, a smoke test in minutes).
"""
import argparse
import datetime
import pathlib
import sys
import textwrap
import time
import warnings

import torch
from tqdm import tqdm

from . import report
from .core import Config
from .run import REPO, environment, run_case
from .suites import SUITES

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CPU_THREADS = 1  # the thread count of the README's CPU table: make bench reproduces it


def _config(device: str, dtype, quick: bool, compile_, rounds=None, flex=None) -> Config:
    dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    return Config(device, dtype, quick, device == "cuda" if compile_ is None else compile_, rounds,
                  not quick if flex is None else flex)


def _catalogue(cfg: Config) -> str:
    text = [f"suites and cases (--case matches any part of a name; shown for --device {cfg.device}"
            f"{' --quick' if cfg.quick else ''}):"]
    for suite in SUITES.values():
        text.append(f"\n  {suite.NAME}: {suite.__doc__.split(':', 1)[1].strip().splitlines()[0]}")
        names = ", ".join(case.name.split("/", 1)[1] for case in suite.cases(cfg))
        text.append(textwrap.fill(names, 100, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(text)


def parse_args(argv):
    best = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     epilog=_catalogue(_config(best, None, False, None)),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default=",".join(SUITES),
                        help=f"comma-separated, of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--case", default="", help="comma-separated parts of case names: run the cases matching any")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=best, help=f"default: {best}")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", type=pathlib.Path, help="output folder (default: benchmarks/out/<time>-<device>)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, 3 rounds, no flex peers: a smoke test of the harness (under 3 minutes)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="add torch.compile of the dense and naive baselines (default: on cuda only)")
    parser.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None,
                        help="time the torch.compile(flex_attention) peers (default: on, off with --quick: they "
                             "compile for minutes on a CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch's CPU threads (default on cpu: {CPU_THREADS}, as the README's table was "
                             "measured; on cuda: torch's default); recorded in the results")
    parser.add_argument("--rounds", type=int, default=None,
                        help="at least this many timed rounds per method (default: 5 on cpu, 10 on cuda, 3 with "
                             "--quick): more rounds for rows marked unreliable")
    parser.add_argument("--list", action="store_true", help="print the names of the selected cases and exit")
    args = parser.parse_args(argv)
    for name in ("threads", "rounds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.list:  # listing needs no GPU
        parser.error("--device cuda: no CUDA device")
    unknown = set(args.suite.split(",")) - set(SUITES)
    if unknown:
        parser.error(f"--suite: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SUITES)}")
    return parser, args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, args = parse_args(argv)
    cfg = _config(args.device, args.dtype, args.quick, args.compile, args.rounds, args.flex)
    patterns = [p for p in args.case.split(",") if p]
    cases = [case for name in args.suite.split(",") for case in SUITES[name].cases(cfg)
             if not patterns or any(p in case.name for p in patterns)]
    if not cases:
        parser.error(f"no case matches --case {args.case!r} in --suite {args.suite}")
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0

    threads = args.threads or (CPU_THREADS if cfg.device == "cpu" else torch.get_num_threads())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(cases, cfg, argv, args.out)
    finally:
        torch.set_num_threads(previous)  # main() called from Python (the tests) leaves torch as it was


def _run(cases, cfg: Config, argv, out) -> int:
    env = environment(cfg, argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out or REPO / "benchmarks" / "out" / f"{stamp}-{report.slug(env['device'])}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing to {out}", file=sys.stderr)
    # The nested-tensor baseline is a torch prototype: its warning says nothing about the timings.
    warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage")

    chunks, records = [report.header(env)], []
    print(chunks[0], end="")
    started = time.perf_counter()
    with tqdm(cases, unit="case", file=sys.stderr, disable=None) as progress:
        for i, case in enumerate(progress):
            progress.set_description(case.name)
            if progress.disable:  # not a terminal (a log, CI): a line per case instead of the bar
                print(f"[{i + 1}/{len(cases)}, {time.perf_counter() - started:.0f} s] {case.name}", file=sys.stderr,
                      flush=True)
            suite = SUITES[case.suite]
            if i == 0 or case.suite != cases[i - 1].suite:
                chunks.append(report.suite_header(suite, cfg.device))
                tqdm.write(chunks[-1], end="")
            records.append(run_case(case, cfg))
            chunks.append(report.case_rows(records[-1], report.columns(suite, cfg.device)))
            tqdm.write(chunks[-1], end="")
            report.write(out, env, records, "".join(chunks))  # after every case: a killed run keeps its results
    chunks.append(report.unreliable_section(records) + report.plots_section(report.plot(records, SUITES, out, env)))
    print(chunks[-1], end="")
    report.write(out, env, records, "".join(chunks))

    flagged = sum(bool(report.unreliable(r, name)) for r in records if r["error"] is None for name in r["methods"])
    if flagged:
        print(f"{flagged} rows marked unreliable (⚠): see 'Unreliable rows'", file=sys.stderr)
    failed = [f"{r['name']} ({name})" for r in records
              for name, m in ([("case", r["error"])] if r["error"] else r["methods"].items())
              if m["status"] == "error"]
    if failed:
        print(f"{len(failed)} failed (see the tables): {', '.join(failed)}", file=sys.stderr)
    print(f"results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
