"""sparse_ops: kernels that turn token pruning (SaiT) and window pruning (SparseViT) in
vision transformers into wall-clock speed. Everything sparse is a list of rows of
``x.reshape(-1, C)``; see README.md for the API."""
from ._backend import backends
from ._checks import no_index_checks
from ._export import ExportError  # noqa: F401 (raised where tracing or export is refused)
from .attention import varlen_attention, window_attention
from .fused import gather_layernorm_linear, linear_residual_scatter
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


def __getattr__(name):
    # sparse_ops.patch needs timm: imported on first use of the attribute, so that
    # `import sparse_ops` stays free of timm's import cost.
    if name == "patch":
        import importlib

        return importlib.import_module(".patch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def set_sparsity(model, keep_rate=None, mass=None, ratios=None):
    """sparse_ops.patch.set_sparsity (imported on use: sparse_ops.patch needs timm)."""
    from .patch import set_sparsity as set_model_sparsity

    return set_model_sparsity(model, keep_rate=keep_rate, mass=mass, ratios=ratios)

__all__ = [
    "TokenIndex", "backends", "gather_layernorm_linear", "gather_rows", "gather_tokens", "gather_windows", "linear_residual_scatter", "no_index_checks",
    "package_tokens", "scatter_add_rows", "scatter_rows", "scatter_tokens", "scatter_windows",
    "select_tokens", "select_windows", "set_sparsity", "varlen_attention", "window_attention", "window_grid", "window_rows",
    "window_scores",
]
