import os

import pytest
import torch

# Triton kernels are tested on the CPU through the interpreter (set before triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW_DTYPES = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32] + LOW_DTYPES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


def poison_allocator(nbytes: int, device) -> None:
    """Leave NaN bytes in the memory the next allocation of this size is likely to get
    (the CUDA caching allocator reuses it), so an output a kernel forgets to write shows."""
    torch.full((max(nbytes, 1),), 255, dtype=torch.uint8, device=device)


def assert_close_to_reference(out, ref_low, ref_high, atol=1e-6):
    """Flash-attention's rule: out may be off the high-precision reference by at most twice
    what the reference itself is off when run in the low dtype."""
    err = (out.double() - ref_high.double()).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_low.double() - ref_high.double()).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * ref_err + atol, f"error {err} > 2 * reference error {ref_err} + {atol}"
