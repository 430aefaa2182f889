"""sparse_ops: kernels that turn token pruning (SaiT) and window pruning (SparseViT) in
vision transformers into wall-clock speed. Everything sparse is a list of rows of
``x.reshape(-1, C)``; see README.md for the API."""
from ._backend import backends
from ._checks import no_index_checks
from .attention import varlen_attention, window_attention
from .layout import TokenIndex, window_grid
from .ops import (
    gather_rows,
    gather_tokens,
    gather_windows,
    package_tokens,
    scatter_add_rows,
    scatter_rows,
    scatter_tokens,
    scatter_windows,
    window_rows,
    window_scores,
)
from .select import select_tokens, select_windows

__version__ = "0.1.0"

__all__ = [
    "TokenIndex", "backends", "gather_rows", "gather_tokens", "gather_windows", "no_index_checks",
    "package_tokens", "scatter_add_rows", "scatter_rows", "scatter_tokens", "scatter_windows",
    "select_tokens", "select_windows", "varlen_attention", "window_attention", "window_grid", "window_rows",
    "window_scores",
]
