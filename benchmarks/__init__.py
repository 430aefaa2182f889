"""Benchmarks of sparse_ops: ``python -m benchmarks`` (or ``make bench``)."""
