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

from sparse_ops.kernels import fused_linear, varlen_attention, window_attention
from sparse_ops.kernels._common import dot_precision

# The most shared memory one block may opt in to: 227 KiB on sm_90 (H100 / H200).
MAX_SHARED = {90: 227 * 1024}
TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
ACTIVATIONS = {"q", "k", "v", "out", "dout", "dq", "dk", "dv",  # pointers in the inputs' dtype
               "x", "h", "weight", "residual", "ln_weight", "ln_bias", "dxn", "xn", "dx"}
FLOAT32 = {"lse", "cls_heads", "received_heads", "delta", "bias", "mask", "dbias", "mean", "rstd", "partials", "head_scale",
           "dhead_scale"}  # pointers to float32
SCALARS = {"qk_scale": "fp32", "scale": "fp32", "eps": "fp32", "cu_seqlens": "*i32", "window_ids": "*i64",
           "rows": "*i64"}


def signature(fn, dtype, constexprs, types=None):
    """Triton types of fn's arguments by name; types overrides that for this kernel."""
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if types and name in types:
            return types[name]
        if name in ACTIVATIONS:
            return "*" + TRITON_DTYPES[dtype]
        if name in FLOAT32:
            return "*fp32"
        return SCALARS.get(name, "i32")  # sizes and strides
    return {name: kind(name) for name in fn.arg_names}


def compile_configs(label, autotuner, dtype, constexprs, target, types=None, configs=None, divisible=()):
    """Every config of an autotuned kernel, or of a plain triton.jit kernel the given configs.
    divisible: arguments a launch would see as multiples of 16 (aligned pointers, strides and
    sizes), as triton specializes them; it decides whether loads are vectorized and pipelined."""
    fn = autotuner.fn if configs is None else autotuner
    # float32 dots take minutes to compile over all configs: there, only the first (smallest)
    if configs is None:
        configs = autotuner.configs[:1] if dtype == torch.float32 else autotuner.configs
    for config in configs:
        values = {k: v for k, v in {**constexprs, **config.kwargs}.items() if k in fn.arg_names}
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in divisible
                 if k in fn.arg_names and k not in values}
        source = ASTSource(fn, signature(fn, dtype, values, types),
                           {(fn.arg_names.index(k),): v for k, v in values.items()}, attrs)
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
        for name in ("_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel", "_received_kernel"):
            compile_configs(f"varlen_attention.{name} D={head_dim}", getattr(varlen_attention, name), dtype,
                            constexprs, target)
    # Swin's windows of 7x7, 8x8 and 12x12 tokens at its head dim 32; 7x7 also at 64. 8x8 with
    # Swin V2's per-head scale.
    for dtype, (n, head_dim) in itertools.product(dtypes, ((49, 32), (64, 32), (144, 32), (49, 64))):
        q = torch.empty(1, 1, n, head_dim, dtype=dtype, device="meta")
        head_scale = q if n == 64 else None
        constexprs = dict(window_attention._constexprs(q, q, q, head_scale), UPCAST=False, BIAS_GRAD=True)
        for name in ("_forward_kernel", "_backward_kernel"):
            compile_configs(f"window_attention.{name} n={n} D={head_dim}", getattr(window_attention, name), dtype,
                            constexprs, target)
    # The fused GEMMs with every fusion on (and the prologue without LayerNorm: a plain gathered
    # GEMM), as a ViT / Swin layer launches them: W [N, C] contiguous (stride_wk = 1 is
    # specialized), aligned pointers, strides and sizes multiples of 16 (the row count R is
    # not). Their bias is in the activations' dtype.
    for dtype in dtypes:
        gemm = dict(UPCAST=False, DOT_PRECISION=dot_precision(dtype), HAS_ROWS=True, HAS_BIAS=True, stride_wk=1)
        types = {"bias": "*" + TRITON_DTYPES[dtype]}
        aligned = ("x", "h", "rows", "mean", "rstd", "ln_weight", "ln_bias", "weight", "bias", "residual", "out",
                   "C", "K", "N", "stride_xr", "stride_hr", "stride_wn", "stride_resr")
        for ln in (True, False):
            compile_configs(f"fused_linear._ln_linear_kernel{'' if ln else ' no-ln'}", fused_linear._ln_linear_kernel,
                            dtype, dict(gemm, HAS_LN=ln), target, types, divisible=aligned)
        compile_configs("fused_linear._linear_scatter_kernel", fused_linear._linear_scatter_kernel, dtype,
                        dict(gemm, HAS_RESIDUAL=True), target, types, divisible=aligned)
    # The LayerNorm row kernels hold whole rows: ViT-S / Swin-T stage 3, ViT-B / Swin-B stage 4,
    # Swin-L stage 4.
    for dtype, width in itertools.product(dtypes, (384, 768, 1536)):
        blocks = fused_linear._row_blocks(width)
        configs = [triton.Config({}, num_warps=blocks.pop("num_warps"))]
        flags = dict(HAS_ROWS=True, WRITE_XN=True, WRITE_DX=True, PARTIALS=True)
        for name in ("_row_stats_kernel", "_ln_backward_rows_kernel"):
            compile_configs(f"fused_linear.{name} C={width}", getattr(fused_linear, name), dtype,
                            dict(blocks, **flags), target, configs=configs)


if __name__ == "__main__":
    main(*sys.argv[1:])
