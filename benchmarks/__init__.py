"""Benchmarks of sparse_ops against dense and naive sparse baselines: ``python -m benchmarks``
(or ``make bench``); ``--help`` lists the suites and cases.

core.py       Case / Setup: what a benchmark is
suites/       ops, attention, blocks, models: the cases
baselines.py  the timm models, the naive EViT / SparseViT baselines, ours via sparse_ops.patch
flops.py      analytical FLOP counts (the ideal speedups)
timing.py     interleaved timing, median and spread, peak memory
run.py        runs a case, records the environment
report.py     results.json, results.md, plots
"""
