"""Attention over packed rows: variable-length sequences (token path) and batched active
windows (window path). Triton kernels on CUDA (and on the CPU under TRITON_INTERPRET=1),
a plain-PyTorch path for CPU tensors."""
from .varlen import varlen_attention
from .window import window_attention

__all__ = ["varlen_attention", "window_attention"]
