"""The suites, in the order they run. Each module has NAME, MEMORY_BOUND (report GB/s and %
of a copy instead of FLOP-based ideals), X_LABEL (what its sparsity is a fraction of), a
docstring that says what its methods are, and cases(cfg) -> Cases."""
from . import attention, blocks, models, onnx, ops, training

SUITES = {suite.NAME: suite for suite in (ops, attention, blocks, models, onnx, training)}
