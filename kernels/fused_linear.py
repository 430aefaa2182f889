"""The GEMMs of a pruned ViT / Swin block with the row movement fused in: the prologue
gather + LayerNorm + Linear (``LN(x[rows]) @ W^T + b``, norm1 -> qkv and norm2 -> fc1) and the
epilogue Linear + residual + scatter (``out[rows] = residual + h @ W^T + b``, proj and fc2).

Everything sparse is a list of rows: x is a dense activation [R0, C] and rows an int64 [R]
index into it (-1: a padding row, whose normalized value is 0, as timm pads after norm1, so
its linear output is the bias). The GEMMs run over the R kept rows only, so pruned rows cost
nothing, and the packed activations never exist in memory:

- Prologue (``_ln_linear_kernel``): each A tile is loaded straight from x's rows[m] and
  normalized in registers, (x - mean) * rstd * gamma + beta, before the dot; neither x[rows]
  nor LN(x[rows]) is ever written. The per-row statistics come from a small first pass
  (``_row_stats_kernel``, one read of the R gathered rows, exact two-pass variance with the
  whole row in registers) rather than being recomputed by every program: a program would
  have to sweep its rows' full C once more before its K loop, and that for every one of the
  N / BLOCK_N column blocks; mean and rstd are outputs anyway (the backward needs them).
- Epilogue (``_linear_scatter_kernel``): the accumulator gets bias and residual (or out's
  own rows when there is no residual) added and is stored straight to out[rows[m]]; rows
  of -1 are neither loaded nor stored.
- Backward: the pure GEMMs (dxn = dout @ W, dW = dout^T @ xn) are torch matmuls (cuBLAS);
  one row kernel (``_ln_backward_rows_kernel``) recomputes xhat from x[rows], mean and rstd,
  writes xn for dW, the packed dx rows (the LayerNorm backward) and per-program partial sums
  of dgamma and dbeta (summed in torch afterwards: deterministic, no atomics). The packed dx
  rows go back to [R0, C] through scatter_add_rows (repeats add up, -1 is skipped).

GEMM tiles are grouped along M (GROUP_M row blocks share their column blocks while they are
in L2). Dots take the inputs' dtype on a GPU (float32: IEEE or TF32 products, as torch's matmul
setting says, see dot_precision) and accumulate in float32; under the interpreter the tiles are
upcast to float32 (UPCAST).
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, autotune_configs, bucket, dot_precision, on_device_of, tuned


def _configs(*blocks):
    """Autotune candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for CUDA, the
    smallest first (the compile check builds only the first in float32); one small fixed tile
    under the interpreter (which cannot autotune), so that the tests' shapes span several
    blocks in every dimension and several groups along M."""
    return autotune_configs(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
         for m, n, k, w, s in blocks],
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4))


_GEMM_BLOCKS = ((64, 64, 64, 4, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 32, 8, 4),
                (128, 128, 64, 8, 3))

# Tuned per layer shape and variant and per power-of-two bucket of the kept rows (row_bucket:
# 49 rows and 50K rows want other tiles), not per number of kept rows R (it changes with
# every pruning decision); the autotuner adds the dtypes. stride_wk tells W (1) from a
# transposed view W.t() (N), whose best tiles differ.
_LN_LINEAR_KEY = ["C", "N", "HAS_ROWS", "HAS_LN", "HAS_BIAS", "stride_wk", "row_bucket"]
_LINEAR_SCATTER_KEY = ["K", "N", "HAS_ROWS", "HAS_BIAS", "HAS_RESIDUAL", "stride_wk", "row_bucket"]


@triton.jit
def _tile(num_m, num_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program; GROUP_M row blocks walk their column blocks
    together, so a W tile is read from L2 by all of them."""
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(num_n, BLOCK_N)
    in_group = GROUP_M * blocks_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(tl.cdiv(num_m, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_size, (pid % in_group) // group_size


@triton.jit
def _row_index(rows, offs, num, HAS_ROWS: tl.constexpr):
    """(int64 row of x for each packed row in offs, valid): padding rows (-1) and rows past
    num are not valid and point at row 0, which is never read for them."""
    if HAS_ROWS:
        src = tl.load(rows + offs, mask=offs < num, other=-1)
    else:
        src = tl.where(offs < num, offs, -1).to(tl.int64)
    valid = src >= 0
    return tl.where(valid, src, 0), valid


@triton.jit
def _row_stats_kernel(
    x, rows, mean, rstd, R, C, stride_xr, eps,
    HAS_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """mean and rstd (float32 [R]) of the rows x[rows[r]]; 0 for padding rows."""
    offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    src, valid = _row_index(rows, offs, R, HAS_ROWS)
    cols = tl.arange(0, BLOCK_C)
    inside = valid[:, None] & (cols[None, :] < C)
    xt = tl.load(x + src[:, None] * stride_xr + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    mu = tl.sum(xt, 1) / C
    centered = tl.where(inside, xt - mu[:, None], 0.0)
    rs = 1.0 / tl.sqrt(tl.sum(centered * centered, 1) / C + eps)
    tl.store(mean + offs, tl.where(valid, mu, 0.0), mask=offs < R)
    tl.store(rstd + offs, tl.where(valid, rs, 0.0), mask=offs < R)


@triton.autotune(_configs(*_GEMM_BLOCKS), key=_LN_LINEAR_KEY)
@triton.jit
def _ln_linear_kernel(
    x, rows, mean, rstd, ln_weight, ln_bias, weight, bias, out, R, C, N, stride_xr, stride_wn, stride_wk, row_bucket,
    HAS_ROWS: tl.constexpr, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out [R, N] = LN(x[rows]) @ weight^T + bias, the LayerNorm applied to each A tile as it
    is loaded. weight [N, C] any strides; x's columns contiguous."""
    pid_m, pid_n = _tile(R, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    src, valid = _row_index(rows, offs_m, R, HAS_ROWS)
    if HAS_LN:
        mu = tl.load(mean + offs_m, mask=offs_m < R, other=0.0)
        rs = tl.load(rstd + offs_m, mask=offs_m < R, other=0.0)
    a_rows = x + src[:, None] * stride_xr
    w_cols = weight + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a_inside = valid[:, None] & (ks[None, :] < C)
        a = tl.load(a_rows + ks[None, :], mask=a_inside, other=0.0)
        if HAS_LN:
            gamma = tl.load(ln_weight + ks, mask=ks < C, other=0.0).to(tl.float32)
            beta = tl.load(ln_bias + ks, mask=ks < C, other=0.0).to(tl.float32)
            xn = (a.to(tl.float32) - mu[:, None]) * rs[:, None] * gamma[None, :] + beta[None, :]
            # padding rows (and columns past C) are 0 after the norm, not beta
            a = tl.where(a_inside, xn, 0.0)
        w = tl.load(w_cols + ks[:, None] * stride_wk, mask=(ks[:, None] < C) & (offs_n[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        else:  # the dot in weight's dtype: x's, or under autocast the Linear's (x float32)
            a = a.to(weight.dtype.element_ty)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    inside = (offs_m[:, None] < R) & (offs_n[None, :] < N)
    tl.store(out + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(out.dtype.element_ty), mask=inside)


@triton.jit
def _ln_backward_rows_kernel(
    x, rows, mean, rstd, ln_weight, ln_bias, dxn, xn, dx, partials, R, C, stride_xr,
    HAS_ROWS: tl.constexpr, WRITE_XN: tl.constexpr, WRITE_DX: tl.constexpr, PARTIALS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """LayerNorm backward on the packed rows, BLOCK_R rows at a time, blocks pid, pid + P, ...
    (P programs). From xhat = (x[rows] - mean) * rstd: xn = xhat * gamma + beta [R, C] (for
    dW), dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dxn * gamma [R, C]
    (packed), and partials [2, P, C] float32: this program's sums of dxn * xhat (dgamma) and
    dxn (dbeta). Padding rows: xn = dx = 0 and nothing added."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    col_in = cols < C
    gamma = tl.load(ln_weight + cols, mask=col_in, other=0.0).to(tl.float32)
    dgamma = tl.zeros([BLOCK_C], tl.float32)
    dbeta = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(pid * BLOCK_R, R, num_programs * BLOCK_R):
        offs = r0 + tl.arange(0, BLOCK_R)
        src, valid = _row_index(rows, offs, R, HAS_ROWS)
        inside = valid[:, None] & col_in[None, :]
        packed = offs[:, None].to(tl.int64) * C + cols[None, :]
        out_inside = (offs[:, None] < R) & col_in[None, :]
        xt = tl.load(x + src[:, None] * stride_xr + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        mu = tl.load(mean + offs, mask=offs < R, other=0.0)
        rs = tl.load(rstd + offs, mask=offs < R, other=0.0)
        xhat = tl.where(inside, (xt - mu[:, None]) * rs[:, None], 0.0)
        if WRITE_XN:
            beta = tl.load(ln_bias + cols, mask=col_in, other=0.0).to(tl.float32)
            xn_tile = tl.where(inside, xhat * gamma[None, :] + beta[None, :], 0.0)
            tl.store(xn + packed, xn_tile.to(xn.dtype.element_ty), mask=out_inside)
        if WRITE_DX or PARTIALS:
            dy = tl.load(dxn + packed, mask=inside, other=0.0).to(tl.float32)
            if PARTIALS:
                dgamma += tl.sum(dy * xhat, 0)
                dbeta += tl.sum(dy, 0)
            if WRITE_DX:
                g = dy * gamma[None, :]
                c1 = tl.sum(g * xhat, 1) / C
                c2 = tl.sum(g, 1) / C
                dx_tile = (g - (xhat * c1[:, None] + c2[:, None])) * rs[:, None]
                tl.store(dx + packed, dx_tile.to(dx.dtype.element_ty), mask=out_inside)
    if PARTIALS:
        tl.store(partials + pid * C + cols, dgamma, mask=col_in)
        tl.store(partials + (num_programs + pid) * C + cols, dbeta, mask=col_in)


@triton.autotune(_configs(*_GEMM_BLOCKS), key=_LINEAR_SCATTER_KEY, restore_value=["out"])
@triton.jit
def _linear_scatter_kernel(
    h, rows, weight, bias, residual, out, R, K, N, stride_hr, stride_wn, stride_wk, stride_resr, row_bucket,
    HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[rows[r]] = (residual[r] or out[rows[r]]) + h[r] @ weight^T + bias for rows[r] >= 0
    (in place; out [R0, N] contiguous). weight [N, K] any strides; h's columns contiguous.
    Padding rows are neither loaded nor stored. (autotune restores out after timing the
    configs: without a residual the kernel reads what it writes.)"""
    pid_m, pid_n = _tile(R, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dest, valid = _row_index(rows, offs_m, R, HAS_ROWS)
    a_rows = h + offs_m[:, None].to(tl.int64) * stride_hr
    w_cols = weight + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + ks[None, :], mask=valid[:, None] & (ks[None, :] < K), other=0.0)
        w = tl.load(w_cols + ks[:, None] * stride_wk, mask=(ks[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    inside = valid[:, None] & (offs_n[None, :] < N)
    targets = out + dest[:, None] * N + offs_n[None, :]
    if HAS_RESIDUAL:
        res = tl.load(residual + offs_m[:, None].to(tl.int64) * stride_resr + offs_n[None, :], mask=inside, other=0.0)
    else:
        res = tl.load(targets, mask=inside, other=0.0)
    tl.store(targets, (res.to(tl.float32) + acc).to(out.dtype.element_ty), mask=inside)


# ------------------------------------------------------------------------------ launchers
def _gemm_grid(num_m, num_n):
    return lambda meta: (triton.cdiv(num_m, meta["BLOCK_M"]) * triton.cdiv(num_n, meta["BLOCK_N"]),)


def _row_blocks(C: int) -> dict:
    """Tile of the row kernels: whole rows (BLOCK_C = C padded to a power of two; LayerNorm
    widths of ViT / Swin are at most a few thousand), BLOCK_R rows at a time, about 4K
    elements a tile. Under the interpreter 4 rows, so the tests' R are ragged."""
    block_c = max(16, triton.next_power_of_2(C))
    block_r = 4 if INTERPRET else max(1, min(16, 4096 // block_c))
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_c >= 2048 else 4)


def _num_row_programs(R: int, block_r: int, device: torch.device) -> int:
    """Programs of the backward row kernel: enough to fill the GPU a few times over, each
    walking several row blocks (the fewer programs, the smaller the partial sums). Under the
    interpreter 3, so that programs walk several blocks and one of them fewer."""
    blocks = triton.cdiv(R, block_r)
    if INTERPRET or device.type != "cuda":
        return min(blocks, 3)
    return min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes for a dtype-typed output: float32 for bfloat16 under the
    interpreter, which truncates instead of rounding when it casts to bf16."""
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


def _unit_col_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _row_arg(rows, fallback):
    """rows (contiguous), or fallback as a pointer that is never read when rows is None."""
    return fallback if rows is None else rows.contiguous()


def ln_linear_forward(x, rows, ln_weight, ln_bias, eps: float, weight, bias):
    """-> out [R, N] in weight's dtype (the GEMM's: x's, or under autocast the Linear's), mean
    and rstd float32 [R] (empty [0] without LayerNorm).

    out[r] = LN(x[rows[r]]) @ weight^T + bias; padding rows (-1) give the bias (0 without).
    x [R0, C] (any row stride); rows int64 [R] or None (all R0 rows); ln_weight, ln_bias [C]
    or both None (no LayerNorm); weight [N, C] any strides; bias [N] or None."""
    x = _unit_col_stride(x)
    R = x.shape[0] if rows is None else rows.shape[0]
    C, N = x.shape[1], weight.shape[0]
    has_ln = ln_weight is not None
    mean, rstd = (torch.empty(R if has_ln else 0, dtype=torch.float32, device=x.device) for _ in range(2))
    out = torch.empty(R, N, dtype=_kernel_dtype(weight.dtype), device=x.device)
    if R == 0:
        return out.to(weight.dtype), mean, rstd
    rows_arg = _row_arg(rows, x)
    with on_device_of(x):
        if has_ln:
            blocks = _row_blocks(C)
            _row_stats_kernel[(triton.cdiv(R, blocks["BLOCK_R"]),)](
                x, rows_arg, mean, rstd, R, C, x.stride(0), float(eps), HAS_ROWS=rows is not None, **blocks
            )
        if N:
            tuned(_ln_linear_kernel)[_gemm_grid(R, N)](
                x, rows_arg, mean if has_ln else x, rstd if has_ln else x, ln_weight if has_ln else x,
                ln_bias if has_ln else x, weight, x if bias is None else bias, out, R, C, N, x.stride(0),
                weight.stride(0), weight.stride(1), bucket(R), HAS_ROWS=rows is not None, HAS_LN=has_ln,
                HAS_BIAS=bias is not None, UPCAST=INTERPRET, DOT_PRECISION=dot_precision(weight.dtype),
            )
    return out.to(weight.dtype), mean, rstd


def ln_linear_backward(dout, x, rows, ln_weight, ln_bias, mean, rstd, weight, needs_input_grads):
    """Gradients of ln_linear_forward -> (dx, dln_weight, dln_bias, dweight, dbias), None
    where needs_input_grads (5 bools, same order; False for an absent bias, as autograd
    gives it) says so, and for the LayerNorm's without one.

    dx [R0, C] in x's dtype (rows never gathered: 0; repeated rows add up), dln_weight,
    dln_bias [C] in ln_weight's dtype, dweight [N, C] contiguous in weight's dtype, dbias [N]
    in weight's dtype. mean, rstd: as returned by the forward."""
    from sparse_ops._backend import kernel as row_op  # the compiled row ops, or their reference

    need_dx, need_dgamma, need_dbeta, need_dw, need_db = needs_input_grads
    has_ln = ln_weight is not None
    need_dgamma, need_dbeta = need_dgamma and has_ln, need_dbeta and has_ln
    x = _unit_col_stride(x)
    R0, C = x.shape
    R = R0 if rows is None else rows.shape[0]
    N = weight.shape[0]
    dx = dgamma = dbeta = dw = db = None
    if need_db:
        db = dout.sum(0, dtype=torch.float32).to(weight.dtype)
    if R == 0 or C == 0:
        if need_dx:
            dx = x.new_zeros(R0, C)
        if need_dgamma:
            dgamma = ln_weight.new_zeros(C)
        if need_dbeta:
            dbeta = ln_bias.new_zeros(C)
        if need_dw:
            dw = weight.new_zeros(N, C)
        return dx, dgamma, dbeta, dw, db

    # dxn = dout @ weight: the gradient of the GEMM's A operand (normalized, packed rows)
    dxn = dout.to(x.dtype) @ weight.to(x.dtype) if need_dx or need_dgamma or need_dbeta else None
    xn = None
    if has_ln:
        write_xn = need_dw
        partial_sums = need_dgamma or need_dbeta
        blocks = _row_blocks(C)
        programs = _num_row_programs(R, blocks["BLOCK_R"], x.device)
        xn = torch.empty(R, C, dtype=_kernel_dtype(x.dtype), device=x.device) if write_xn else None
        dx_packed = torch.empty(R, C, dtype=_kernel_dtype(x.dtype), device=x.device) if need_dx else None
        partials = torch.empty(2, programs, C, dtype=torch.float32, device=x.device) if partial_sums else None
        if dxn is not None:
            dxn = dxn.contiguous()
        with on_device_of(x):
            _ln_backward_rows_kernel[(programs,)](
                x, _row_arg(rows, x), mean, rstd, ln_weight, ln_bias, x if dxn is None else dxn,
                x if xn is None else xn, x if dx_packed is None else dx_packed, x if partials is None else partials,
                R, C, x.stride(0),
                HAS_ROWS=rows is not None, WRITE_XN=write_xn, WRITE_DX=need_dx, PARTIALS=partial_sums, **blocks,
            )
        if need_dgamma:  # separate sums: the gradients must not share storage (custom ops' rule)
            dgamma = partials[0].sum(0).to(ln_weight.dtype)
        if need_dbeta:
            dbeta = partials[1].sum(0).to(ln_bias.dtype)
        if xn is not None:
            xn = xn.to(x.dtype)
        if dx_packed is not None:
            dx_packed = dx_packed.to(x.dtype)
    else:
        dx_packed = dxn
        if need_dw:
            xn = x if rows is None else row_op("gather_rows", x.device.type)(x, rows)
    if need_dx:
        dx = dx_packed if rows is None else row_op("scatter_add_rows", x.device.type)(dx_packed, rows, R0)
    if need_dw:
        dw = (dout.to(xn.dtype).t() @ xn).to(weight.dtype).contiguous()
    return dx, dgamma, dbeta, dw, db


def linear_scatter_(h, weight, bias, residual, out, rows) -> None:
    """In place: out[rows[r]] = (residual[r] if residual is not None else out[rows[r]])
    + h[r] @ weight^T + bias for every rows[r] >= 0; rows of -1 are skipped, the others
    unique. h [R, K]; weight [N, K] any strides; bias [N] or None; residual [R, N] or None;
    out [R0, N] contiguous; rows int64 [R] or None (then R == R0)."""
    R, K = h.shape
    N = weight.shape[0]
    if R == 0 or N == 0:
        return
    h = _unit_col_stride(h)
    if residual is not None:
        residual = _unit_col_stride(residual)
    # The interpreter truncates float32 -> bf16: it works on a float32 copy there (exact both
    # ways, so rows it does not write come back unchanged).
    target = out.float() if _kernel_dtype(out.dtype) != out.dtype else out
    with on_device_of(h):
        tuned(_linear_scatter_kernel)[_gemm_grid(R, N)](
            h, _row_arg(rows, h), weight, h if bias is None else bias, h if residual is None else residual, target,
            R, K, N, h.stride(0), weight.stride(0), weight.stride(1), 0 if residual is None else residual.stride(0),
            bucket(R), HAS_ROWS=rows is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            UPCAST=INTERPRET, DOT_PRECISION=dot_precision(h.dtype),
        )
    if target is not out:
        out.copy_(target)
