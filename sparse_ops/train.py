"""Training a patched model for many densities at once.

SaiT trains one set of weights dense and sparse in the same step, the sparse pass distilled
from the dense one (so the pruned model learns to match what it would have predicted with
every token); SparseViT fine-tunes with a random per-block window ratio each step
(sparsity-aware adaptation) so that any configuration the search later picks already works.
Both run the SAME patched model at two densities via sparse_ops.set_sparsity.
"""
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import _checks as check
from .nn import SparseVisionTransformer, Tokens
from .patch import _current_sparsity, _is_patched_sam, _is_patched_swin, _swin_stages, set_sparsity, window_pruned_blocks


@dataclass(frozen=True)
class StepLosses:
    """The loss parts of one dense_sparse_step (detached floats)."""

    dense: float
    sparse: float
    distill: float
    total: float


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, averaged over the batch.
    Logits [B, K], or [B, K, *positions] for dense prediction (classes in dim 1, as
    F.cross_entropy takes them): then per position, averaged over all positions. The
    teacher is detached: gradients reach the student only."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if student_logits.dim() > 2:  # one distribution per position: rows of K classes
        student_logits, teacher_logits = (t.movedim(1, -1).flatten(0, -2) for t in (student_logits, teacher_logits))
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2


def cls_attention_distillation_loss(student: Tensor, teacher: Tensor, eps: float = 1e-8) -> Tensor:
    """SaiT's class-attention distillation: KL(teacher || student) between two class-attention
    distributions [B, N] (each row sums to 1, e.g. an early block's against a late block's),
    averaged over images. The teacher is detached."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be [B, N]")
    teacher = teacher.detach().float().clamp_min(eps)
    student = student.float().clamp_min(eps)
    return (teacher * (teacher.log() - student.log())).sum(-1).mean()


def class_attentions(model: SparseVisionTransformer, images: Tensor, blocks: Sequence[int]) -> List[Tensor]:
    """Run a patched ViT densely (no pruning) and return the class attention [B, N] (mean over
    heads, each row sums to 1) of each block in `blocks`, for cls_attention_distillation_loss.
    Works by setting emit_cls_attn on those blocks and reading Tokens.cls_attn; the model's
    flags are restored afterwards."""
    if not isinstance(model, SparseVisionTransformer):
        raise TypeError(f"model must be patched by sparse_ops.patch.vit, got {type(model).__name__}")
    if any(not 0 <= b < len(model.blocks) for b in blocks):
        raise ValueError(f"blocks must be indices in [0, {len(model.blocks)}), got {list(blocks)}")
    saved = [(blk.keep_rate, blk.mass, blk.emit_cls_attn) for blk in model.blocks]
    try:
        for blk in model.blocks:
            blk.keep_rate, blk.mass, blk.emit_cls_attn = 1.0, None, False
        for b in blocks:
            model.blocks[b].emit_cls_attn = True
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        tokens, found = Tokens.from_dense(x), {}
        for i, blk in enumerate(model.blocks[:max(blocks) + 1]):
            tokens = blk(tokens)
            if i in blocks:
                found[i] = tokens.cls_attn.view(tokens.batch_size, tokens.seq_len)
        return [found[b] for b in blocks]
    finally:
        for blk, (keep_rate, mass, emit) in zip(model.blocks, saved):
            blk.keep_rate, blk.mass, blk.emit_cls_attn = keep_rate, mass, emit


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _dense_sparsity(model: nn.Module) -> dict:
    return dict(keep_rate=1.0) if isinstance(model, SparseVisionTransformer) else dict(ratios=0.0)


def dense_sparse_step(model: nn.Module, images: Tensor, targets: Tensor, sparse_options: dict,
                      criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                      distill_weight: float = 1.0, temperature: float = 1.0,
                      optimizer: Optional[torch.optim.Optimizer] = None,
                      backbone: Optional[nn.Module] = None) -> StepLosses:
    """One SaiT dense/sparse step on a patched ViT or Swin (or a DistributedDataParallel
    around one), or on any model holding one as `backbone` (e.g. a segmentation head over a
    patched features_only Swin, logits [B, K, H, W]): loss = criterion(dense) +
    criterion(sparse) + distill_weight * distillation_loss(sparse, dense, temperature).
    sparse_options go to set_sparsity of the patched model (e.g. dict(keep_rate=0.7),
    dict(mass=0.9), dict(ratios=[...])). Its previous sparsity is restored afterwards. With
    an optimizer: zero_grad, one backward per pass (the dense one before the sparse forward),
    step; without one the caller owns backward (the loss parts returned are detached floats
    either way).

    Under DDP both passes run through the wrapper and the dense backward under no_sync, so
    gradients are reduced once per step: wrap with find_unused_parameters=True when the sparse
    pass may skip parameters (e.g. a package token path), and static_graph=False. Under FSDP2
    (fully_shard per block and at the root) pass the model itself. Either way every rank
    must prune at the same density: draw it with sample_keep_rate / sample_swin_ratios from
    a generator seeded alike on every rank, not from the per-rank seeded global RNG."""
    if not isinstance(sparse_options, dict):
        raise TypeError(f"sparse_options must be a dict of set_sparsity arguments, got {type(sparse_options).__name__}")
    if distill_weight < 0:
        raise ValueError(f"distill_weight must be >= 0, got {distill_weight}")
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    inner = _unwrap(model) if backbone is None else backbone
    previous = _current_sparsity(inner)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    try:
        set_sparsity(inner, **_dense_sparsity(inner))
        dense_logits = model(images)
        dense_loss = criterion(dense_logits, targets)
        if optimizer is not None:
            # The distillation target is detached, so the dense loss alone reaches the dense
            # graph: its backward frees that graph before the sparse forward builds its
            # own (the step's peak memory is one pass's, not both), with the same gradients
            # as one backward of the total.
            with model.no_sync() if isinstance(model, DistributedDataParallel) else nullcontext():
                dense_loss.backward()  # DDP reduces once, in the sparse backward
        set_sparsity(inner, **sparse_options)
        sparse_logits = model(images)
    finally:
        set_sparsity(inner, **previous)
    sparse_loss = criterion(sparse_logits, targets)
    distill = distillation_loss(sparse_logits, dense_logits, temperature)
    if optimizer is not None:
        (sparse_loss + distill_weight * distill).backward()
        optimizer.step()
    dense, sparse, distill = dense_loss.item(), sparse_loss.item(), distill.item()
    return StepLosses(dense, sparse, distill, dense + sparse + distill_weight * distill)


def sample_keep_rate(choices: Optional[Sequence[float]] = None, low: float = 0.5, high: float = 1.0,
                     generator: Optional[torch.Generator] = None) -> float:
    """A keep rate for one training step: one of `choices` when given, else uniform in
    [low, high]. Deterministic under `generator` (in multi-process training one seeded alike
    on every rank, so that all ranks prune alike)."""
    if choices is not None:
        values = check.numbers(choices, "choices", "a sequence of keep rates")
        if not values or any(not 0.0 < v <= 1.0 for v in values):
            raise ValueError(f"choices must be non-empty keep rates in (0, 1], got {choices!r}")
        return values[int(torch.randint(len(values), (), generator=generator))]
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"low and high must satisfy 0 < low <= high <= 1, got low={low}, high={high}")
    return low + (high - low) * torch.rand((), generator=generator).item()


def sample_swin_ratios(model: nn.Module, choices: Sequence[float] = tuple(i / 10 for i in range(8)),
                       generator: Optional[torch.Generator] = None) -> List[float]:
    """SparseViT's sparsity-aware adaptation: one random window ratio per block of a patched
    Swin (or a features_only wrapper around one: the stages it holds), drawn from `choices`
    and sorted non-decreasing within each stage (a stage's blocks keep nested window sets);
    or of a patched SAM encoder (patch.sam): one per block that can prune, 0 for the global
    blocks that run dense. Deterministic under `generator`."""
    inner = _unwrap(model)
    if not (_is_patched_swin(inner) or _is_patched_sam(inner)):
        raise TypeError(f"model must be patched by sparse_ops.patch.swin or patch.sam, got {type(inner).__name__}")
    values = check.numbers(choices, "choices", "a sequence of ratios")
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise ValueError(f"choices must be non-empty ratios in [0, 1), got {choices!r}")
    if _is_patched_sam(inner):
        blocks = window_pruned_blocks(inner)
        drawn = torch.randint(len(values), (len(blocks),), generator=generator).tolist()
        return [values[i] if blk.prunable else 0.0 for blk, i in zip(blocks, drawn)]
    ratios = []
    for _, stage in _swin_stages(inner):
        drawn = torch.randint(len(values), (len(stage.blocks),), generator=generator).tolist()
        ratios += sorted(values[i] for i in drawn)
    return ratios
