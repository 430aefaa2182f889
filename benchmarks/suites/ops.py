"""ops: the memory-bound row ops, in GB/s and % of a device copy.
Gather / scatter of tokens and windows and window scores at ViT-B and Swin-T 672x672 shapes
(ViT-S and a quarter of that map on CPU), against the naive plain-PyTorch index ops (sparse_ops.reference:
x.reshape(-1, C)[index], index_copy, roll + pad + window_partition + index) and a device
copy (clone) of the same number of bytes, measured in the same run.
Speedups are over naive; sparsity is the fraction of tokens or windows pruned."""
import functools

import torch

import sparse_ops
from sparse_ops import reference
from sparse_ops.select import kept_count

from ..core import Case, Config, Setup, compiled, pick

NAME = "ops"
BASELINE = "naive"
MEMORY_BOUND = True
X_LABEL = "fraction of tokens / windows pruned"


def _ours(op, *args):
    def run():
        with sparse_ops.no_index_checks():  # the kernels, not the Python-side index checks
            return op(*args)
    return run


def _setup(cfg: Config, naive, ours, nbytes: int, sparsity) -> Setup:
    # The ops allocate their outputs, so the copy allocates too: a clone of half the bytes.
    source = torch.empty(nbytes // 2, dtype=torch.uint8, device=cfg.device)
    methods = compiled({"copy": source.clone, "naive": naive, "ours": ours}, cfg, names=("naive",))
    return Setup(methods, baseline=BASELINE, bytes=nbytes, sparsity=sparsity)


def _token_case(cfg: Config, op: str, shape, sparsity: float) -> Setup:
    B, N, C = shape
    x = torch.randn(B, N, C, device=cfg.device, dtype=cfg.dtype)
    idx = sparse_ops.select_tokens(torch.rand(B, N, device=cfg.device), keep_rate=1.0 - sparsity)
    T, e = idx.num_tokens, x.element_size()
    pruned = 1.0 - T / (B * N)
    if op == "gather_tokens":
        return _setup(cfg, lambda: reference.gather_tokens(x, idx), _ours(sparse_ops.gather_tokens, x, idx),
                      2 * T * C * e + 8 * T, pruned)
    y = torch.randn(T, C, device=cfg.device, dtype=cfg.dtype)
    # Out of place: a copy of base, then the kept rows.
    return _setup(cfg, lambda: reference.scatter_tokens(y, idx, x), _ours(sparse_ops.scatter_tokens, y, idx, x),
                  (2 * B * N + 2 * T) * C * e + 8 * T, pruned)


def _window_case(cfg: Config, op: str, shape, sparsity) -> Setup:
    B, H, C = shape
    ws, shift = 7, 3
    x = torch.randn(B, H, H, C, device=cfg.device, dtype=cfg.dtype)
    e = x.element_size()
    if op == "window_scores":
        return _setup(cfg, lambda: reference.window_scores(x, ws, shift),
                      _ours(sparse_ops.window_scores, x, ws, shift), x.numel() * e, None)
    scores = sparse_ops.window_scores(x, ws, shift)
    K = kept_count(1.0 - sparsity, scores.shape[1])
    windows = sparse_ops.select_windows(scores, K)
    moved = B * K * ws * ws * C * e
    pruned = 1.0 - K / scores.shape[1]
    if op == "gather_windows":
        return _setup(cfg, lambda: reference.gather_windows(x, windows, ws, shift),
                      _ours(sparse_ops.gather_windows, x, windows, ws, shift), 2 * moved, pruned)
    y = sparse_ops.gather_windows(x, windows, ws, shift)
    return _setup(cfg, lambda: reference.scatter_windows(y, x, windows, ws, shift),
                  _ours(sparse_ops.scatter_windows, y, x, windows, ws, shift), 2 * x.numel() * e + 2 * moved, pruned)


def cases(cfg: Config):
    tokens = pick(cfg, quick=(2, 17, 16), cpu=(8, 197, 384), cuda=(64, 197, 768))  # B, N, C (ViT-S / ViT-B)
    windows = pick(cfg, quick=(1, 18, 8), cpu=(1, 84, 96), cuda=(4, 168, 96))  # B, H=W, C (Swin-T stage 0)
    sparsities = pick(cfg, quick=(0.5,), cpu=(0.2, 0.5, 0.8), cuda=(0.2, 0.5, 0.8))
    token_shape = "x".join(map(str, tokens))
    window_shape = f"{windows[0]}x{windows[1]}x{windows[1]}x{windows[2]}"
    for op, maker, shape, label in (("gather_tokens", _token_case, tokens, token_shape),
                                    ("scatter_tokens", _token_case, tokens, token_shape),
                                    ("gather_windows", _window_case, windows, window_shape),
                                    ("scatter_windows", _window_case, windows, window_shape)):
        for s in sparsities:
            yield Case(NAME, f"{NAME}/{op}/{label}/s{s}", f"{op} {label}", dict(op=op, shape=shape, sparsity=s),
                       functools.partial(maker, cfg, op, shape, s))
    yield Case(NAME, f"{NAME}/window_scores/{window_shape}", f"window_scores {window_shape}",
               dict(op="window_scores", shape=windows), functools.partial(_window_case, cfg, "window_scores", windows, None))
