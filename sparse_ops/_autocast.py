"""torch.autocast for sparse_ops' ops: each op runs in the dtypes timm's dense layers would.

Autocast has no rule for a custom op: it would pass the op float32 activations and weights
(the GEMMs and attention then run in float32), while the plain torch ops inside the op's
PyTorch path (matmuls, SDPA) would each be cast on their own, the residual included. So the
ops' Python entry points cast their inputs as autocast casts the dense layers', then run the
op with autocast off:

- GEMMs (the Linear of gather_layernorm_linear and of linear_residual_scatter) and attention
  (q, k, v): in autocast's dtype, as F.linear and F.scaled_dot_product_attention;
- LayerNorm, softmax and their statistics: float32 inside the op (the LayerNorm reads x as
  given, as torch's layer_norm runs in float32 under autocast);
- the residual and base of the epilogue and its output keep their dtype (timm's x + branch
  stays float32 when x is); row ops (gather, scatter, scores) are not cast.

torch.library.register_autocast does not fit: it casts every floating input of an op, the
residual and the LayerNorm's parameters too. The checks below are constant-folded under
torch.compile, which guards on the autocast state.
"""
import contextlib
from typing import Optional

import torch
from torch import Tensor

_DEVICES = ("cpu", "cuda")


def dtype(t) -> Optional[torch.dtype]:
    """The dtype autocast runs GEMMs and attention in for t: autocast's dtype for t's device
    where autocast is on there and would cast t (a floating tensor, not float64), else None."""
    if not isinstance(t, Tensor) or t.device.type not in _DEVICES or not t.is_floating_point():
        return None
    if t.dtype == torch.float64 or not torch.is_autocast_enabled(t.device.type):
        return None
    return torch.get_autocast_dtype(t.device.type)


def cast(to: Optional[torch.dtype], *tensors):
    """tensors with each floating one (not float64) in dtype `to`, as autocast casts; all of
    them unchanged where `to` is None. Anything else (None, non-tensors) passes through."""
    if to is None:
        return tensors
    return tuple(t.to(to) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def off(device_type: str):
    """A context in which autocast is off for device_type: inside an op, the dtypes it was
    given are the ones it computes in. Nothing to do (a null context) where autocast is off."""
    if device_type in _DEVICES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
