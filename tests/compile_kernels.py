"""Compiles every autotune config (float32: the first) of every Triton kernel for a GPU target (sm_90 by default) on
a machine without a GPU, and prints one JSON line per config: its shared memory and whether it
fits the target. `python tests/compile_kernels.py [arch [dtype]]`; run by test_kernels_compile.py in a process without TRITON_INTERPRET (under the
interpreter, triton.jit makes functions that cannot be compiled)."""
import itertools
import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparse_ops.kernels import varlen_attention, window_attention

# The most shared memory one block may opt in to: 227 KiB on sm_90 (H100 / H200).
MAX_SHARED = {90: 227 * 1024}
TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
ACTIVATIONS = {"q", "k", "v", "out", "dout", "dq", "dk", "dv"}  # pointers in the inputs' dtype
FLOAT32 = {"lse", "cls_heads", "delta", "bias", "mask", "dbias"}  # pointers to float32
SCALARS = {"qk_scale": "fp32", "scale": "fp32", "cu_seqlens": "*i32", "window_ids": "*i64"}


def signature(fn, dtype, constexprs):
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in ACTIVATIONS:
            return "*" + TRITON_DTYPES[dtype]
        if name in FLOAT32:
            return "*fp32"
        return SCALARS.get(name, "i32")  # sizes and strides
    return {name: kind(name) for name in fn.arg_names}


def compile_configs(label, autotuner, dtype, constexprs, target):
    fn = autotuner.fn
    # float32 dots take minutes to compile over all configs: there, only the first (smallest)
    configs = autotuner.configs[:1] if dtype == torch.float32 else autotuner.configs
    for config in configs:
        values = {k: v for k, v in {**constexprs, **config.kwargs}.items() if k in fn.arg_names}
        source = ASTSource(fn, signature(fn, dtype, values), {(fn.arg_names.index(k),): v for k, v in values.items()})
        kernel = triton.compile(source, target=target,
                                options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        shared = kernel.metadata.shared
        print(json.dumps({"kernel": label, "dtype": TRITON_DTYPES[dtype], "config": str(config), "shared": shared,
                          "fits": shared <= MAX_SHARED[target.arch]}), flush=True)


def main(arch: str = "90", dtype: str = "bf16"):
    target = GPUTarget("cuda", int(arch), 32)
    dtypes = [d for d, name in TRITON_DTYPES.items() if name == dtype]
    # Head dims 32 / 64 and 80-128 take BLOCK_D 32 / 64 / 128: one compiled variant each.
    for dtype, head_dim in itertools.product(dtypes, (32, 64, 128)):
        q = torch.empty(1, 1, head_dim, dtype=dtype, device="meta")
        shape = varlen_attention._shape_args(q, 197)
        constexprs = dict(BLOCK_D=shape["BLOCK_D"], DOT_PRECISION=shape["DOT_PRECISION"], UPCAST=False,
                          RETURN_CLS=True)
        for name in ("_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel"):
            compile_configs(f"varlen_attention.{name} D={head_dim}", getattr(varlen_attention, name), dtype,
                            constexprs, target)
    # Swin's windows of 7x7, 8x8 and 12x12 tokens at its head dim 32; 7x7 also at 64.
    for dtype, (n, head_dim) in itertools.product(dtypes, ((49, 32), (64, 32), (144, 32), (49, 64))):
        q = torch.empty(1, 1, n, head_dim, dtype=dtype, device="meta")
        constexprs = dict(window_attention._constexprs(q, q, q), UPCAST=False, BIAS_GRAD=True)
        for name in ("_forward_kernel", "_backward_kernel"):
            compile_configs(f"window_attention.{name} n={n} D={head_dim}", getattr(window_attention, name), dtype,
                            constexprs, target)


if __name__ == "__main__":
    main(*sys.argv[1:])
