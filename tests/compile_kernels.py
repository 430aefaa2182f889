"""Compiles the autotune configs of every Triton kernel for a GPU target (sm_90 by default) on a
machine without a GPU, and prints one JSON line per config: its shared memory and whether it
fits the target, its registers and spilled bytes per thread (from the cubin: Triton's n_regs
and n_spills need a GPU to load it), and how many atomic operations it holds.
bf16 compiles every config of every kernel; fp16 and fp32 (whose dots compile slowly) the first
config of every kernel, fp32 the large windows at head dim 64 only. The first config is the one
SPARSE_OPS_AUTOTUNE=0 runs. `python tests/compile_kernels.py [arch [dtype]]`; run by
test_kernels_compile.py in a process without TRITON_INTERPRET (under the interpreter,
triton.jit makes functions that cannot be compiled)."""
import itertools
import json
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparse_ops.kernels import fused_linear, varlen_attention, window_attention
from sparse_ops.kernels._common import dot_precision

# The most shared memory one block may opt in to: 227 KiB on sm_90 (H100 / H200).
MAX_SHARED = {90: 227 * 1024}
TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
ACTIVATIONS = {"q", "k", "v", "out", "dout", "dq", "dk", "dv",  # pointers in the inputs' dtype
               "x", "h", "weight", "residual", "ln_weight", "ln_bias", "dxn", "xn", "dx", "rel_h", "rel_w"}
FLOAT32 = {"lse", "cls_heads", "received_heads", "delta", "bias", "mask", "dbias_partials", "dscale_rows", "mean",
           "rstd", "partials", "head_scale", "drel_h", "drel_w"}  # pointers to float32
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


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack frame (bytes per thread: in a Triton kernel, which calls nothing, the
    slots of spilled registers) of a cubin's kernel, as cuobjdump reads them; empty where this
    triton ships no cuobjdump."""
    try:
        tool = knobs.nvidia.cuobjdump.path
    except (AttributeError, RuntimeError):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {"regs": int(found[1]), "spill_bytes": int(found[2])} if found else {}


def compile_configs(label, autotuner, dtype, constexprs, target, types=None, configs=None, divisible=()):
    """Every config of an autotuned kernel (fp16 and fp32: the first), or of a plain triton.jit
    kernel the given configs. divisible: arguments a launch would see as multiples of 16
    (aligned pointers, strides and sizes), as triton specializes them; it decides whether
    loads are vectorized and pipelined."""
    fn = autotuner.fn if configs is None else autotuner
    # float32 dots take minutes to compile over all configs: there, only the first (the one
    # SPARSE_OPS_AUTOTUNE=0 runs, which must fit); fp16 builds the same tiles as bf16
    if configs is None:
        configs = autotuner.configs if dtype == torch.bfloat16 else autotuner.configs[:1]
    for position, config in enumerate(configs):
        values = {k: v for k, v in {**constexprs, **config.kwargs}.items() if k in fn.arg_names}
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in divisible
                 if k in fn.arg_names and k not in values}
        source = ASTSource(fn, signature(fn, dtype, values, types),
                           {(fn.arg_names.index(k),): v for k, v in values.items()}, attrs)
        kernel = triton.compile(source, target=target,
                                options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        shared = kernel.metadata.shared
        print(json.dumps({"kernel": label, "dtype": TRITON_DTYPES[dtype], "config": str(config), "first": position == 0,
                          "shared": shared, "fits": shared <= MAX_SHARED[target.arch],
                          "atomics": kernel.asm["ttir"].count("tt.atomic_"), **resource_usage(kernel.asm["cubin"])}),
              flush=True)


# the window kernels, by whether a window is one key block
WINDOW_KERNELS = {True: ("_forward_kernel", "_backward_kernel"),
                  False: ("_forward_blocked_kernel", "_backward_dq_blocked_kernel", "_backward_dkdv_blocked_kernel")}


def main(arch: str = "90", dtype: str = "bf16"):
    target = GPUTarget("cuda", int(arch), 32)
    dtypes = [d for d, name in TRITON_DTYPES.items() if name == dtype]
    # Head dims 32 / 64 and 80-128 take BLOCK_D 32 / 64 / 128: one compiled variant each.
    for dtype, head_dim in itertools.product(dtypes, (32, 64, 128)):
        q = torch.empty(1, 1, head_dim, dtype=dtype, device="meta")
        shape = varlen_attention._shape_args(q, 197, 64)
        constexprs = dict(BLOCK_D=shape["BLOCK_D"], DOT_PRECISION=shape["DOT_PRECISION"], UPCAST=False,
                          RETURN_CLS=True)
        for name in ("_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel", "_received_kernel"):
            compile_configs(f"varlen_attention.{name} D={head_dim}", getattr(varlen_attention, name), dtype,
                            constexprs, target)
    # Swin's windows of 7x7, 8x8 and 12x12 tokens at its head dim 32; 7x7 also at 64. Swin V2's
    # 8x8 and its larger windows (16x16, 18x18, 24x24; the last two take the key-block
    # kernels) with its per-head scale, at head dims 32 and 64 (fp32, the slowest to compile: at
    # 64 only, the larger tiles).
    shapes = ((49, 32), (64, 32), (144, 32), (49, 64)) + tuple(itertools.product((256, 324, 576), (32, 64)))
    for dtype, (n, head_dim) in itertools.product(dtypes, shapes):
        if dtype == torch.float32 and n >= 256 and head_dim < 64:
            continue
        q = torch.empty(1, 1, n, head_dim, dtype=dtype, device="meta")
        head_scale = q if n == 64 or n >= 256 else None
        constexprs = dict(window_attention._constexprs(q, q, q, head_scale), UPCAST=False, BIAS_GRAD=True)
        for name in WINDOW_KERNELS[window_attention.one_key_block(n)]:
            compile_configs(f"window_attention.{name} n={n} D={head_dim}", getattr(window_attention, name), dtype,
                            constexprs, target)
    # SAM's windows with its decomposed relative position (rel_h, rel_w in q's dtype, no bias or
    # mask) at its head dim 64: 14x14 (196 tokens, padded to 256 keys), 16x16, and 24x24 (the
    # key-block kernels); bf16 and fp16.
    for dtype, side in itertools.product([d for d in dtypes if d != torch.float32], (14, 16, 24)):
        q = torch.empty(1, 1, side * side, 64, dtype=dtype, device="meta")
        rel = torch.empty(1, 1, side * side, side, dtype=dtype, device="meta")
        constexprs = dict(window_attention._constexprs(q, None, None, None, rel, rel), UPCAST=False, BIAS_GRAD=False)
        for name in WINDOW_KERNELS[window_attention.one_key_block(side * side)]:
            compile_configs(f"window_attention.{name} n={side * side} D=64 rel", getattr(window_attention, name),
                            dtype, constexprs, target)
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
