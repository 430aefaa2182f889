"""Importance-based selection: which tokens (SaiT/EViT) or windows (SparseViT) to keep."""
import math
from typing import Optional

import torch

from . import _checks as check
from .layout import TokenIndex


def kept_count(keep_rate: float, candidates: int) -> int:
    """ceil(keep_rate * candidates), robust to float error (0.7 * 10 keeps 7, not 8)."""
    return min(candidates, math.ceil(keep_rate * candidates - 1e-9))


def select_tokens(scores: torch.Tensor, keep_rate: Optional[float] = None, mass: Optional[float] = None,
                  keep_prefix: int = 1, min_keep: int = 1) -> TokenIndex:
    """Choose the tokens to keep from importance scores [B, N].

    The first ``keep_prefix`` tokens (class / register tokens) are always kept; of the
    others ("candidates"), keep per image either the top ``ceil(keep_rate * candidates)``
    (``keep_rate`` in (0, 1]: the same count in every image, no host sync), or the fewest
    whose share of the image's score mass reaches ``mass`` (in (0, 1]; scores must be
    non-negative; counts differ per image). At least ``min_keep`` candidates are kept.
    Kept tokens stay in their original order.
    """
    check.tensor(scores, "scores", 2, "[B, N]")
    if (keep_rate is None) == (mass is None):
        raise ValueError("pass exactly one of keep_rate and mass")
    N = scores.shape[1]
    check.integer(keep_prefix, "keep_prefix")
    if keep_prefix > N:
        raise ValueError(f"keep_prefix must be <= the number of tokens ({N}), got {keep_prefix}")
    check.integer(min_keep, "min_keep")
    if keep_rate is not None:
        check.rate(keep_rate, "keep_rate")
        return top_tokens(scores, keep_rate, keep_prefix, min_keep)
    check.rate(mass, "mass")
    if check.checking_values() and scores.numel() and bool((scores < 0).any()):
        raise ValueError("scores must be non-negative when selecting by mass")
    return mass_tokens(scores, mass, keep_prefix, min_keep)


def top_tokens(scores: torch.Tensor, keep_rate: float, keep_prefix: int = 1, min_keep: int = 1) -> TokenIndex:
    """select_tokens by keep_rate, unchecked (for callers that made the scores themselves)."""
    B, N = scores.shape
    candidates, device = N - keep_prefix, scores.device
    k = min(max(kept_count(keep_rate, candidates), min_keep), candidates)
    top = torch.topk(scores[:, keep_prefix:], k, dim=1, sorted=False).indices.sort(dim=1).values
    prefix = torch.arange(keep_prefix, device=device).expand(B, -1)
    cols = torch.cat([prefix, top + keep_prefix], dim=1)
    index = (cols + torch.arange(B, device=device).unsqueeze(1) * N).reshape(-1)
    cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=device) * (keep_prefix + k)
    return TokenIndex(index, cu_seqlens, keep_prefix + k, B, N)


def mass_tokens(scores: torch.Tensor, mass: float, keep_prefix: int = 1, min_keep: int = 1) -> TokenIndex:
    """select_tokens by mass, unchecked (for callers that made the scores themselves)."""
    B, N = scores.shape
    candidates, device = N - keep_prefix, scores.device
    # float64 so that the cumulative share is exact enough to decide near-ties of the mass;
    # mass 1.0 keeps every candidate whatever the rounding.
    ranked, order = scores[:, keep_prefix:].to(torch.float64).sort(dim=1, descending=True, stable=True)
    share = ranked.cumsum(1) / ranked.sum(1, keepdim=True)
    k = (share < mass).sum(1) + 1 if mass < 1.0 else torch.full((B,), candidates, device=device)
    k = k.clamp(min=min(min_keep, candidates), max=candidates)
    if B == 1:  # its first k ranks back in token order: a third of the small ops of the mask below
        chosen = order[0, : int(k)].sort().values + keep_prefix
        count = keep_prefix + chosen.numel()
        index = torch.cat([torch.arange(keep_prefix, device=device), chosen])
        return TokenIndex(index, torch.tensor([0, count], dtype=torch.int32, device=device), count, 1, N)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(candidates, device=device).expand(B, -1))
    keep = torch.cat([torch.ones(B, keep_prefix, dtype=torch.bool, device=device), rank < k.unsqueeze(1)], dim=1)
    return TokenIndex.from_mask(keep)


def select_windows(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """[B, nW] scores -> int64 [B, num_keep] ids of the highest-scoring windows, best first."""
    check.tensor(scores, "scores", 2, "[B, nW]")
    check.integer(num_keep, "num_keep")
    if num_keep > scores.shape[1]:
        raise ValueError(f"num_keep must be <= the number of windows ({scores.shape[1]}), got {num_keep}")
    return torch.topk(scores, num_keep, dim=1, sorted=True).indices
