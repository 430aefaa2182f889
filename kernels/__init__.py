"""Triton kernels of sparse_ops, shipped as ``sparse_ops.kernels``: attention over packed
rows and the fused GEMM prologue/epilogue, one kernel per file with its launch wrapper."""
