"""Input checks at the Python boundary: a bad argument raises a TypeError (wrong type or
dtype) or ValueError (wrong shape, size, device or value) that names it.

Index values are checked too (one small reduction, which synchronises on CUDA). Inside
``no_index_checks()`` and under torch.compile those value checks are skipped; the kernels
still never read or write out of bounds (a CPU kernel raises, a CUDA kernel asserts).
"""
import collections.abc
import contextlib
import numbers as _numbers
from typing import List, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_index_checks = True


@contextlib.contextmanager
def no_index_checks():
    """Skip the value checks of indices (window ids, rows, token indices), e.g. in a model
    whose indices come from select_tokens / select_windows, to avoid host syncs."""
    global _index_checks
    previous, _index_checks = _index_checks, False
    try:
        yield
    finally:
        _index_checks = previous


def checking_values() -> bool:
    return _index_checks and not torch.compiler.is_compiling()


def tensor(value, name: str, ndim: int, what: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """Checks that value is a tensor of rank ndim (described by `what`, e.g. '[B, N, C]')
    with a dtype in dtypes."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor {what}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {list(value.shape)}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {value.dtype}")
    return value


def qkv(q, k, v, what: str) -> None:
    """Checks attention inputs: float tensors of one shape `what` (e.g. '[T, H, D]'), dtype
    and device, with at least one element along every dim but the first."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(t, name, len(what.split(",")), what)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {list(q.shape)}, got {list(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if min(q.shape[1:]) < 1:
        raise ValueError(f"q {what} must have at least one head, token and channel, got shape {list(q.shape)}")
    same_device(q=q, k=k, v=v)


def scale(value, head_dim: int) -> float:
    """An attention scale: a float, or None for head_dim ** -0.5."""
    if value is None:
        return head_dim**-0.5
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(value).__name__}")
    return float(value)


def index(value, name: str, ndim: int, what: str) -> torch.Tensor:
    return tensor(value, name, ndim, what, dtypes=(torch.int64,))


def same_device(**tensors) -> None:
    """The tensors among the arguments are on one device (None, and anything else that is
    not a tensor, is skipped: its own check names it). Asked before any index value is read."""
    present = [(name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor)]
    for name, t in present[1:]:
        first, t0 = present[0]
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {t0.device}")


def integer(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, _numbers.Real):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(value).__name__}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def in_range(values: torch.Tensor, name: str, low: int, high: int) -> None:
    """Every entry of values in [low, high)."""
    if checking_values() and values.numel():
        lo, hi = (int(v) for v in torch.aminmax(values))
        if lo < low or hi >= high:
            raise ValueError(f"{name} has entries outside [{low}, {high}): min {lo}, max {hi}")


def unique_rows(rows: torch.Tensor, name: str) -> None:
    """No target row (other than the padding row -1) appears twice."""
    if checking_values() and rows.numel():
        real = rows[rows >= 0]
        if bool((real[1:] > real[:-1]).all()):  # increasing, as TokenIndex rows are: no sort needed
            return
        if torch.unique(real).numel() != real.numel():
            raise ValueError(f"{name} repeats a row: rows that are written must be unique")


def unique_windows(windows: torch.Tensor, name: str) -> None:
    """No window id appears twice in one image."""
    if checking_values() and windows.shape[1] > 1:
        ids = windows.sort(dim=1).values
        if bool((ids[:, 1:] == ids[:, :-1]).any()):
            raise ValueError(f"{name} repeats a window id within an image: written windows must be unique")


# ------------------------------------------------------------ arguments of the model API
def scalar(value) -> Optional[float]:
    """value as a float if it is one real number (a Python or numpy number, or a 0-d tensor
    or array), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, _numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        item = value.item()
        if isinstance(item, _numbers.Real) and not isinstance(item, bool):
            return float(item)
    return None


def _sequence(value, name: str, what: str) -> list:
    """The entries of a 1-D sequence: a list, tuple, range, numpy array, tensor or any other
    collections.abc.Sequence (not a str)."""
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # tensor or numpy array
        if value.ndim != 1:
            raise ValueError(f"{name} must be {what} (1-D), got shape {list(value.shape)}")
        return value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return list(value)


def numbers(value, name: str, what: str = "a sequence of numbers") -> List[float]:
    """Any 1-D sequence of real numbers (list, tuple, numpy array, tensor, ...) as floats."""
    entries = _sequence(value, name, what)
    out = [scalar(v) for v in entries]
    if any(v is None for v in out):
        bad = next(e for e, v in zip(entries, out) if v is None)
        raise TypeError(f"{name} must be {what}, got an entry {bad!r} ({type(bad).__name__})")
    return out


def integers(value, name: str, what: str = "a sequence of ints") -> List[int]:
    """Any 1-D sequence of ints (list, tuple, range, integer numpy array or tensor) as ints."""
    entries = _sequence(value, name, what)
    bad = [v for v in entries if isinstance(v, bool) or not isinstance(v, _numbers.Integral)]
    if bad:
        raise TypeError(f"{name} must be {what}, got an entry {bad[0]!r} ({type(bad[0]).__name__})")
    return [int(v) for v in entries]


def window_ratios(ratios, depths: Sequence[int]) -> List[float]:
    """Per-block window pruning ratios of a Swin whose stages have `depths` blocks, from one
    number, one per stage or one per block (any sequence of numbers). Each must be in [0, 1)
    and, within a stage, not below the block before it: a stage ranks its windows once and its
    blocks keep nested sets of them, so a decrease raises a ValueError naming stage and block."""
    total = sum(depths)
    expected = f"a float, one per stage ({len(depths)}) or one per block ({total})"
    single = scalar(ratios)
    if single is not None:
        per_block = [single] * total
    else:
        values = numbers(ratios, "ratios", expected)
        if len(values) == len(depths):
            per_block = [r for r, depth in zip(values, depths) for _ in range(depth)]
        elif len(values) == total:
            per_block = values
        else:
            raise ValueError(f"ratios must be {expected}, got {len(values)} values {values}")
    bad = [r for r in per_block if not 0.0 <= r < 1.0]
    if bad:
        raise ValueError(f"ratios must be in [0, 1) (the fraction of windows pruned), got {bad[0]}")
    start = 0
    for stage, depth in enumerate(depths):
        for block in range(1, depth):
            before, now = per_block[start + block - 1], per_block[start + block]
            if now < before:
                raise ValueError(
                    f"ratios decrease within stage {stage}: block {block} has {now} after block {block - 1}'s "
                    f"{before}. A stage's blocks keep nested window sets, so ratios must not decrease within a "
                    "stage (sparse_ops.search.sorted_within_stages sorts a configuration that way)")
        start += depth
    return per_block
