"""Loads the compiled extension and decides, per op and device, which implementation runs.

Importing sparse_ops never fails because sparse_ops._C is missing (or was built without
CUDA): those ops fall back to the plain-PyTorch reference, and that is said once, at import.
Set SPARSE_OPS_BACKEND=reference to force the fallback (for debugging and tests).

_C is compiled against one torch, recorded in _build_info.py beside it. When _C is there but
fails to load (undefined symbols, a missing CUDA library) and the torch installed is not that
one, the import raises an ImportError naming both: the fallback would hide a broken install.
When it loads under another torch, a RuntimeWarning says so (the symbols it needs resolved,
but the layouts behind them may have changed); rebuilding silences it.
"""
import importlib.util
import logging
import os
import warnings

import torch

from . import reference
from ._export import exporting

log = logging.getLogger("sparse_ops")

# Ops with C++/CUDA kernels (schemas in csrc/ops.cpp).
COMPILED_OPS = ("gather_rows", "scatter_rows", "scatter_add_rows", "window_rows", "window_scores")
# Public ops made of the ops above and of stock torch ops: they run wherever torch does.
COMPOSITE_OPS = (
    "gather_tokens", "scatter_tokens", "package_tokens", "select_tokens",
    "select_windows", "gather_windows", "scatter_windows",
)
# Ops with Triton kernels and a plain-PyTorch path (sparse_ops/attention/_dispatch.py), and
# the module of sparse_ops.kernels that holds each one's kernels.
TRITON_OPS = {"varlen_attention": "varlen_attention", "window_attention": "window_attention",
              "gather_layernorm_linear": "fused_linear", "linear_residual_scatter": "fused_linear"}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _import_extension():
    from . import _C  # loading it registers the ops

    return _C


def _built_for():
    """(torch.__version__, CUDA version or None) that _C was compiled against, as setup.py
    recorded them; None where nothing was recorded (a CMake build, a hand-copied _C)."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info.TORCH_VERSION, _build_info.CUDA_VERSION


def abi_mismatch(built_for):
    """What is wrong when built_for (see _built_for) is not the torch running now, else None."""
    if built_for is None:
        return None
    torch_version, cuda_version = built_for
    if torch_version == torch.__version__ and cuda_version in (None, torch.version.cuda):
        return None
    built = f"CUDA {cuda_version}" if cuda_version else "no CUDA kernels"
    installed = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"sparse_ops._C was built for torch {torch_version} ({built}) but torch {torch.__version__} "
            f"({installed}) is installed; rebuild with `pip install --no-build-isolation --no-deps -e .` "
            "or install the matching torch")


def _load_extension():
    if os.environ.get("SPARSE_OPS_BACKEND") == "reference":
        return None, "SPARSE_OPS_BACKEND=reference"
    mismatch = abi_mismatch(_built_for())
    try:
        extension = _import_extension()
    except (ImportError, OSError) as e:
        missing = isinstance(e, ModuleNotFoundError) and e.name == f"{__package__}._C"
        if mismatch and not missing:
            raise ImportError(f"{mismatch} (loading it failed: {e}; SPARSE_OPS_BACKEND=reference "
                              "runs the plain-PyTorch fallback instead)") from e
        return None, f"{type(e).__name__}: {e}"
    if mismatch:
        warnings.warn(f"{mismatch} (it loaded, but may misbehave)", RuntimeWarning, stacklevel=3)
    return extension, None


extension, load_error = _load_extension()

# (op, device type) -> True where a compiled kernel is registered. Computed once, so that
# dispatching is a dict look-up that torch.compile can trace.
_compiled = {
    (name, device): extension is not None
    and torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_ops::{name}", key)
    for name in COMPILED_OPS
    for device, key in _DISPATCH_KEYS.items()
}


def has_kernel(name: str, device_type: str) -> bool:
    return _compiled.get((name, device_type), False)


def kernel(name: str, device_type: str):
    """The implementation of a compiled op for tensors on device_type (the reference while
    exporting: see sparse_ops._export)."""
    if has_kernel(name, device_type) and not exporting():
        return getattr(torch.ops.sparse_ops, name).default
    return getattr(reference, name)


def backends() -> dict:
    """Which implementation each public op uses, per device type: 'C++' or 'CUDA' for the
    compiled kernels, 'reference' for the plain-PyTorch fallback, 'torch' for ops built
    from other sparse_ops ops and stock torch ops (and for the attention ops where their
    Triton kernels do not run), 'triton' (on the CPU: 'triton (interpreter)', under
    TRITON_INTERPRET=1) for the attention kernels and the fused GEMMs. float64 attention always runs 'torch'."""
    table = {
        name: {device: (key if device == "cuda" else "C++") if has_kernel(name, device) else "reference"
               for device, key in _DISPATCH_KEYS.items()}
        for name in COMPILED_OPS
    }
    table.update({name: {device: "torch" for device in _DISPATCH_KEYS} for name in COMPOSITE_OPS})
    has_triton = importlib.util.find_spec("triton") is not None
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    triton_backend = {"cpu": "triton (interpreter)" if has_triton and interpret else "torch",
                      "cuda": "triton" if has_triton else "torch"}
    table.update({name: dict(triton_backend) for name in TRITON_OPS})
    return table


def _announce():
    summary = ", ".join(f"{n}: cpu={b['cpu']} cuda={b['cuda']}" for n, b in backends().items() if n in COMPILED_OPS)
    log.info("sparse_ops backends: %s", summary)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    missing = sorted({d for d in devices for n in COMPILED_OPS if not has_kernel(n, d)})
    if missing:
        reason = load_error or "the extension was built without kernels for this device"
        warnings.warn(
            f"sparse_ops: compiled kernels unavailable on {', '.join(missing)} ({reason}); those ops run the "
            "plain-PyTorch reference (slow but correct). sparse_ops.backends() shows each op's backend.",
            RuntimeWarning,
            stacklevel=3,
        )


_announce()
