"""How a sparse set of tokens or windows is described.

Everything sparse is a list of rows of ``x.reshape(-1, C)``: a TokenIndex holds the kept
token rows of a ViT batch; a window selection is turned into rows by ``window_rows``.
"""
from dataclasses import dataclass
from typing import Tuple, Union

import torch

Pair = Union[int, Tuple[int, int]]


def to_pair(value: Pair, name: str = "window_size") -> Tuple[int, int]:
    """An int or a pair of ints as a (height, width) pair."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def window_grid(height: int, width: int, window_size: Pair) -> Tuple[int, int]:
    """Windows per column and per row of timm's padded frame."""
    wh, ww = to_pair(window_size)
    return (-(-height // wh), -(-width // ww))


@dataclass(frozen=True)
class TokenIndex:
    """The kept tokens of a [B, N, C] batch, packed image after image.

    index:      int64 [T], flat row ``b * N + n`` of each kept token, in original order
    cu_seqlens: int32 [B + 1], image b's tokens are ``index[cu_seqlens[b]:cu_seqlens[b+1]]``
    max_seqlen: the largest per-image count (flash-attention's varlen convention)
    batch_size, seq_len: B and N of the dense batch
    """

    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch_size: int
    seq_len: int

    def __post_init__(self):
        if not isinstance(self.index, torch.Tensor) or self.index.dtype != torch.int64 or self.index.dim() != 1:
            raise TypeError(f"TokenIndex.index must be a 1-D int64 tensor, got {_describe(self.index)}")
        cu = self.cu_seqlens
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.shape != (self.batch_size + 1,):
            raise TypeError(
                f"TokenIndex.cu_seqlens must be an int32 tensor of shape [{self.batch_size + 1}], got {_describe(cu)}"
            )
        if cu.device != self.index.device:
            raise ValueError(f"TokenIndex.cu_seqlens is on {cu.device} but index on {self.index.device}")
        if self.batch_size < 0 or self.seq_len < 0 or self.max_seqlen < 0:
            raise ValueError(
                "TokenIndex.batch_size, seq_len and max_seqlen must be >= 0, got "
                f"{self.batch_size}, {self.seq_len}, {self.max_seqlen}"
            )

    @property
    def num_tokens(self) -> int:
        return self.index.numel()

    @property
    def lengths(self) -> torch.Tensor:
        """int32 [B]: kept tokens per image."""
        return self.cu_seqlens.diff()

    @classmethod
    def from_mask(cls, keep: torch.Tensor) -> "TokenIndex":
        """From a bool [B, N] mask of the tokens to keep (per image any count, even 0)."""
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 2:
            raise TypeError(f"keep must be a bool tensor [B, N], got {_describe(keep)}")
        B, N = keep.shape
        lengths = keep.sum(1, dtype=torch.int32)
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=torch.int32)])
        index = keep.reshape(-1).nonzero().squeeze(1)
        return cls(index, cu, int(lengths.max()) if B else 0, B, N)

    def keep_mask(self) -> torch.Tensor:
        """bool [B, N]: True where a token is kept."""
        mask = torch.zeros(self.batch_size * self.seq_len, dtype=torch.bool, device=self.index.device)
        mask[self.index] = True
        return mask.view(self.batch_size, self.seq_len)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
