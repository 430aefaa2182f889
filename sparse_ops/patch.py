"""Make a timm model skip pruned tokens or windows: ``patch.vit(model, ...)`` and
``patch.swin(model, ...)`` swap the classes of its modules for the sparse ones of
sparse_ops.nn (as ToMe patches timm), in place. Parameters, buffers and state_dict keys stay
the same, so timm checkpoints load before or after patching, and at zero sparsity the model
computes exactly what timm's does. ``set_sparsity`` changes the density at run time."""
from contextlib import contextmanager
from typing import Iterable, Optional, Sequence, Union

from timm.layers import Mlp
from timm.models._features import FeatureGetterNet
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from . import _checks as check
from .nn import (SparseBlock, SparseSwinBlock, SparseSwinStage, SparseVisionTransformer,
                 SparseVisionTransformerDistilled, swinv2)


def default_prune_layers(depth: int) -> tuple:
    """EViT's: prune at a quarter, half and three quarters of the depth (3, 6, 9 of 12)."""
    step = max(depth // 4, 1)
    return tuple(range(step, depth, step))[:3]


# ------------------------------------------------------------------------------- ViT
# What SparseVisionTransformer replaces or calls: a subclass defining its own versions would
# lose them (or feed them Tokens), so patch.vit refuses it unless it is one handled here.
_VIT_FORWARD_METHODS = ("forward", "forward_features", "forward_head", "forward_intermediates", "_pos_embed", "pool")
_SUPPORTED_VIT_CLASSES = {VisionTransformer: SparseVisionTransformer,
                          VisionTransformerDistilled: SparseVisionTransformerDistilled}
_SPARSE_VIT_CLASSES = dict(_SUPPORTED_VIT_CLASSES)  # and those made for subclasses


def vit(model: VisionTransformer, keep_rate: float = 1.0, mass: Optional[float] = None,
        prune_layers: Optional[Sequence[int]] = None, package: bool = False) -> VisionTransformer:
    """Token pruning (SaiT / EViT) for a timm VisionTransformer (vit_*, deit_*, the distilled
    deit_*_distilled_*), or the features_only wrapper timm builds around one, in place.

    Before each block in prune_layers (default: EViT's 3, 6, 9 of 12), keep per image the
    tokens the class token attended to most in the previous block: the top ceil(keep_rate *
    candidates), or with mass the fewest whose attention mass reaches it (per image a
    different count; batches run packed, never padded). Class, distillation and register
    tokens are always kept. package=True appends each image's pruned tokens, averaged by
    attention, as one token (EViT's fused token; 'token' pooling only). keep_rate=1.0
    without mass: no pruning (timm's forward). forward_features and forward_intermediates
    return full token grids (pruned tokens hold their last value); forward_tokens the packed
    kept tokens (see SparseVisionTransformer).

    A VisionTransformer subclass that defines its own forward, forward_features,
    forward_head, forward_intermediates, _pos_embed or pool (other than timm's distilled
    DeiT) is refused with a TypeError, and on any error the model is left as it was.
    Returns the model (the wrapper, for a features_only one)."""
    wrapper = model
    if isinstance(model, FeatureGetterNet) and isinstance(getattr(model, "model", None), VisionTransformer):
        model = model.model
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    sparse_class = _sparse_vit_class(type(model))
    for i, blk in enumerate(model.blocks):
        _check_vit_block(blk, f"model.blocks[{i}]")
    if model.attn_pool is not None or model.global_pool not in ("token", "avg", ""):
        raise ValueError(f"patch.vit supports global_pool 'token', 'avg' or '', got {model.global_pool!r}")
    depth = len(model.blocks)
    layers = default_prune_layers(depth) if prune_layers is None else prune_layers
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"prune_layers must be a sequence of ints, got {prune_layers!r}")
    if any(not 1 <= i < depth for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"prune_layers must be distinct block indices in [1, {depth}) (a block prunes on the "
                         f"previous block's class attention), got {list(layers)}")
    if not isinstance(package, bool):
        raise TypeError(f"package must be a bool, got {type(package).__name__}")
    if package and model.global_pool != "token":
        raise ValueError(f"package=True needs global_pool 'token' (a package token has no place in the token "
                         f"grid that 'avg' pooling reads), got {model.global_pool!r}")
    with _restored_on_failure([model, *model.blocks]):
        model.__class__ = sparse_class
        for blk in model.blocks:
            blk.__class__ = SparseBlock
            blk.num_prefix_tokens = model.num_prefix_tokens
            blk.package = package
        model.prune_layers = tuple(sorted(layers))
        set_sparsity(model, keep_rate=keep_rate, mass=mass)
    return wrapper


def _sparse_vit_class(cls: type) -> type:
    """The SparseVisionTransformer class for timm class cls (or for an already patched one)."""
    if issubclass(cls, SparseVisionTransformer):
        cls = cls.timm_class
    for base in cls.__mro__[:cls.__mro__.index(VisionTransformer)]:
        own = [name for name in _VIT_FORWARD_METHODS if name in vars(base)]
        if own and base not in _SUPPORTED_VIT_CLASSES:
            raise TypeError(f"patch.vit cannot patch {cls.__name__}: {base.__name__} defines its own "
                            f"{', '.join(own)} (patch.vit replaces VisionTransformer's; supported: "
                            f"{', '.join(c.__name__ for c in _SUPPORTED_VIT_CLASSES)} and subclasses that keep theirs)")
    if cls not in _SPARSE_VIT_CLASSES:  # a subclass that changes none of them: keep its other methods
        known = next(c for c in cls.__mro__ if c in _SUPPORTED_VIT_CLASSES)
        _SPARSE_VIT_CLASSES[cls] = type(f"Sparse{cls.__name__}", (_SUPPORTED_VIT_CLASSES[known], cls),
                                        {"timm_class": cls, "__module__": __name__})
    return _SPARSE_VIT_CLASSES[cls]


@contextmanager
def _restored_on_failure(modules: Iterable[nn.Module]):
    """On an exception, puts back each module's class and instance attributes as they were
    on entry (a failed patch leaves no module half-changed)."""
    saved = [(m, m.__class__, dict(vars(m))) for m in modules]
    try:
        yield
    except BaseException:
        for m, cls, attrs in saved:
            m.__class__ = cls
            vars(m).clear()
            vars(m).update(attrs)
        raise


def _check_vit_block(blk: nn.Module, name: str) -> None:
    if type(blk) not in (Block, SparseBlock):
        raise TypeError(f"{name} is a {type(blk).__name__}; patch.vit supports timm's Block")
    attn = blk.attn
    if type(attn) is not Attention or attn.gate is not None:
        raise TypeError(f"{name}.attn must be timm's Attention without a gate, got {type(attn).__name__}")
    if attn.attn_drop.p > 0:
        raise ValueError(f"{name}.attn has attention dropout ({attn.attn_drop.p}), which packed attention lacks")
    for part in ("norm1", "norm2"):
        if not isinstance(getattr(blk, part), nn.LayerNorm):
            raise TypeError(f"{name}.{part} must be a LayerNorm (fused into the next GEMM), got "
                            f"{type(getattr(blk, part)).__name__}")
    if not isinstance(blk.mlp, Mlp):
        raise TypeError(f"{name}.mlp must be timm's Mlp, got {type(blk.mlp).__name__}")


# ------------------------------------------------------------------------------ Swin
def swin(model: SwinTransformer, ratios: Union[float, Sequence[float]] = 0.0) -> SwinTransformer:
    """Window pruning (SparseViT) for a timm SwinTransformer (v1) or SwinTransformerV2
    (sparse_ops.nn.swinv2), in place, at any input size. ratios: the fraction of windows
    each block prunes, in [0, 1): one float, one per stage, or one per block. A stage scores
    its windows once (L2 norm of the activations) and its blocks keep nested sets, so ratios
    should not decrease within a stage. 0 runs timm's block unchanged. Returns the model."""
    if isinstance(model, SwinTransformerV2Cr):
        raise TypeError("SwinTransformerV2Cr (swinv2_cr_*) is not supported: its blocks (SwinTransformerV2CrBlock: "
                        "meta-MLP position bias without 16*sigmoid, extra norm3) and NCHW stages have no sparse "
                        "classes; SwinTransformerV2 (swinv2_*) is supported")
    if isinstance(model, SwinTransformerV2):
        _per_block_ratios(model, ratios)  # bad ratios fail before any change
        swinv2.swap_classes(model)
        return set_sparsity(model, ratios=ratios)
    if not isinstance(model, SwinTransformer):
        raise TypeError(f"model must be a timm SwinTransformer or SwinTransformerV2, got {type(model).__name__}")
    for s, stage in enumerate(model.layers):
        if type(stage) not in (SwinTransformerStage, SparseSwinStage):
            raise TypeError(f"model.layers[{s}] is a {type(stage).__name__}; patch.swin supports timm's "
                            "SwinTransformerStage")
        for b, blk in enumerate(stage.blocks):
            name = f"model.layers[{s}].blocks[{b}]"
            if type(blk) not in (SwinTransformerBlock, SparseSwinBlock):
                raise TypeError(f"{name} is a {type(blk).__name__}; patch.swin supports timm's SwinTransformerBlock")
            if not isinstance(blk.norm1, nn.LayerNorm) or not isinstance(blk.norm2, nn.LayerNorm):
                raise TypeError(f"{name}: norm1 and norm2 must be LayerNorms (fused into the next GEMM)")
            if not isinstance(blk.mlp, Mlp) or blk.attn.attn_drop.p > 0:
                raise TypeError(f"{name}: patch.swin needs timm's Mlp and no attention dropout")
    for stage in model.layers:
        stage.__class__ = SparseSwinStage
        for blk in stage.blocks:
            blk.__class__ = SparseSwinBlock
    set_sparsity(model, ratios=ratios)
    return model


def _per_block_ratios(model: SwinTransformer, ratios) -> list:
    depths = [len(stage.blocks) for stage in model.layers]
    if isinstance(ratios, (int, float)) and not isinstance(ratios, bool):
        per_block = [float(ratios)] * sum(depths)
    elif isinstance(ratios, (list, tuple)) and len(ratios) == len(depths):
        per_block = [float(r) for r, d in zip(ratios, depths) for _ in range(d)]
    elif isinstance(ratios, (list, tuple)) and len(ratios) == sum(depths):
        per_block = [float(r) for r in ratios]
    else:
        raise ValueError(f"ratios must be a float, one per stage ({len(depths)}) or one per block "
                         f"({sum(depths)}), got {ratios!r}")
    if any(not 0.0 <= r < 1.0 for r in per_block):
        raise ValueError(f"ratios must be in [0, 1) (the fraction of windows pruned), got {ratios!r}")
    return per_block


# ---------------------------------------------------------------------------- density
def set_sparsity(model: nn.Module, keep_rate: Optional[float] = None, mass: Optional[float] = None,
                 ratios: Union[None, float, Sequence[float]] = None) -> nn.Module:
    """Change the density of a patched model at run time, on the same weights (SaiT's one
    model for many densities). ViT (patch.vit): keep_rate or mass (keep_rate=1.0: dense).
    Swin (patch.swin): ratios as in patch.swin (0.0: dense). Returns the model."""
    wrapper = model
    if isinstance(model, FeatureGetterNet) and isinstance(getattr(model, "model", None), SparseVisionTransformer):
        model = model.model
    if isinstance(model, SparseVisionTransformer):
        if ratios is not None:
            raise ValueError("ratios is for Swin models; a ViT takes keep_rate or mass")
        if (keep_rate is None and mass is None) or (mass is not None and keep_rate not in (None, 1.0)):
            raise ValueError("pass exactly one of keep_rate and mass")
        if mass is not None:
            check.rate(mass, "mass")
            keep_rate = 1.0
        else:
            check.rate(keep_rate, "keep_rate")
        if (mass is not None or keep_rate < 1.0) and model.cls_token is None:
            raise ValueError("token pruning needs a class token (its attention scores the tokens)")
        for i, blk in enumerate(model.blocks):
            prunes = i in model.prune_layers
            blk.keep_rate, blk.mass = (keep_rate, mass) if prunes else (1.0, None)
        for blk, nxt in zip(model.blocks, list(model.blocks)[1:]):
            blk.emit_cls_attn = nxt.prunes
        return wrapper
    if _is_patched_swin(model):
        if keep_rate is not None or mass is not None:
            raise ValueError("keep_rate and mass are for ViT models; a Swin model takes ratios")
        if ratios is None:
            raise ValueError("pass ratios")
        blocks = [blk for stage in model.layers for blk in stage.blocks]
        for blk, r in zip(blocks, _per_block_ratios(model, ratios)):
            blk.sparsity = r
        return model
    raise TypeError(f"model must be patched by sparse_ops.patch.vit or patch.swin first, got {type(model).__name__}")


def _is_patched_swin(model: nn.Module) -> bool:
    return (isinstance(model, SwinTransformer) and all(isinstance(s, SparseSwinStage) for s in model.layers)) or \
        (isinstance(model, SwinTransformerV2) and all(isinstance(s, swinv2.SparseSwinV2Stage) for s in model.layers))


def _current_sparsity(model: nn.Module) -> dict:
    """The set_sparsity arguments that restore the model's present density."""
    if isinstance(model, SparseVisionTransformer):
        blk = next((b for b in model.blocks if b.prunes), None)
        if blk is None:
            return dict(keep_rate=1.0)
        return dict(mass=blk.mass) if blk.mass is not None else dict(keep_rate=blk.keep_rate)
    if _is_patched_swin(model):
        return dict(ratios=[blk.sparsity for stage in model.layers for blk in stage.blocks])
    raise TypeError(f"model must be patched by sparse_ops.patch.vit or patch.swin, got {type(model).__name__}")
