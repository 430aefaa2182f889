"""Tracing and export of patched models: torch.export, torch.onnx.export (dynamo=True, and the
legacy exporter) and torch.jit.trace.

While a model is traced into a graph for another runtime (``exporting()``), every op and module
runs plain-PyTorch compositions of standard ops instead of the custom ops, which ONNX and a
TorchScript file without sparse_ops cannot run, and instead of the CPU fast paths (oneDNN's
packed weights, direct calls of the ops' implementations, in-place writes, inference caches):
gather and scatter as Gather / ScatterND, selection as TopK, attention as matmul and softmax.
The graph then holds standard ops only, and runs wherever the dense model's graph does.

What is data-dependent cannot be: pruning by mass keeps a count of tokens per image that only
the image decides (the graph's shapes would follow the data), so tracing it raises, as do
TorchScript (torch.jit.script) and FX symbolic tracing, which cannot follow a patched model's
Python control flow.
"""
import torch
from torch import Tensor


class ExportError(RuntimeError):
    """A patched model (or op) asked to do something that cannot be traced into a graph."""


def exporting() -> bool:
    """Whether the code runs to be traced into a graph for another runtime: under torch.export
    (which torch.onnx.export(dynamo=True) runs) or torch.jit.trace (which the legacy ONNX
    exporter runs). torch.compile is not export: it keeps the custom ops. (A few cheap flags:
    every op's dispatch asks.)"""
    if torch.compiler.is_compiling():  # what dynamo can evaluate while it traces this
        return torch.compiler.is_exporting()
    return torch.jit.is_tracing()


def refuse_fx_tracing(what: str) -> None:
    """Raises an ExportError in torch.fx.symbolic_trace, which cannot follow the control flow of
    `what` (the module's class name)."""
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        raise ExportError(
            f"torch.fx.symbolic_trace cannot trace {what}: a patched model's pruning is Python control flow over "
            "index tensors. Use torch.export.export (an FX graph of standard ops), torch.onnx.export(dynamo=True) "
            "or torch.jit.trace at a fixed keep_rate / ratios")


def refuse_scripting(module: torch.nn.Module) -> None:
    """A sparse module's __prepare_scriptable__: torch.jit.script cannot compile its forward."""
    raise ExportError(
        f"torch.jit.script cannot compile {type(module).__name__}: a patched model chooses its path in Python "
        "(prune or not, the token or window selection, Tokens passed between ViT blocks). Use torch.jit.trace "
        "(a TorchScript graph of standard ops, loadable without sparse_ops), torch.export.export or "
        "torch.onnx.export(dynamo=True) at a fixed keep_rate / ratios")


def refuse_mass() -> None:
    """Raises an ExportError where a model pruning by mass is traced or exported."""
    if exporting():
        raise ExportError(
            "a model pruning by mass keeps a data-dependent number of tokens per image, which a traced or "
            "exported graph cannot express with fixed shapes; export it at a fixed keep rate "
            "(sparse_ops.set_sparsity(model, keep_rate=...)) instead")


def equal_length_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float,
                           side: str):
    """varlen attention while exporting, where every sequence has max_seqlen rows (a fixed keep
    rate), as one dense batch -> (out [T, H, D], logsumexp [H, T], side output [T]): side
    'cls' the first query row's attention (mean over heads), 'received' the attention each
    key receives (mean over queries and heads), '' none (empty). Unequal lengths would need
    their values: an ExportError. float32 statistics (float64 for float64) as the kernels."""
    T, H, D = q.shape
    B = cu_seqlens.shape[0] - 1
    if T != B * max_seqlen:  # lengths <= max_seqlen summing to B * max_seqlen are all equal
        raise ExportError("varlen attention over sequences of unequal lengths has data-dependent shapes and "
                          "cannot be exported; export a model at a fixed keep rate")
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    qs, ks, vs = (t.reshape(B, max_seqlen, H, D).transpose(1, 2).to(stat) for t in (q, k, v))
    scores = (qs @ ks.transpose(-1, -2)) * scale  # [B, H, L, L]
    p = scores.softmax(-1)
    out = (p @ vs).transpose(1, 2).reshape(T, H, D).to(q.dtype)
    lse = scores.logsumexp(-1).permute(1, 0, 2).reshape(H, T)
    if side == "cls":
        extra = p[:, :, 0].mean(1).reshape(T)
    elif side == "received":
        extra = p.mean(2).mean(1).reshape(T)
    else:
        extra = q.new_empty(0, dtype=stat)
    return out, lse, extra
