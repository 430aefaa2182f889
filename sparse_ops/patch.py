"""Make a timm model skip pruned tokens or windows: ``patch.vit(model, ...)`` and
``patch.swin(model, ...)`` swap the classes of its modules for the sparse ones of
sparse_ops.nn (as ToMe patches timm), in place. Parameters, buffers and state_dict keys stay
the same, so timm checkpoints load before or after patching, and at zero sparsity the model
computes exactly what timm's does. ``set_sparsity`` changes the density at run time."""
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Iterable, Optional, Sequence, Union

from timm.layers import GluMlp, Mlp, RotaryEmbeddingCat, SwiGLU
from timm.layers.attention import AttentionRope
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3, RotaryEmbeddingMixed
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Stage
from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from timm.models import vision_transformer_sam as timm_sam
from torch import nn

from . import _checks as check
from .nn import (SparseBlock, SparseEva, SparseEvaBlock, SparseSamBlock, SparseSwinBlock, SparseSwinStage,
                 SparseVisionTransformer, SparseVisionTransformerDistilled, SparseVisionTransformerSAM, swinv2)


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
        prune_layers: Optional[Sequence[int]] = None, package: bool = False,
        ratios: Union[None, float, Sequence[float]] = None) -> VisionTransformer:
    """Token pruning (SaiT / EViT) for a timm VisionTransformer (vit_*, deit_*, the distilled
    deit_*_distilled_*), or the features_only wrapper timm builds around one, in place.

    Before each block in prune_layers (default: EViT's 3, 6, 9 of 12), keep per image the
    tokens the class token attended to most in the previous block: the top ceil(keep_rate *
    candidates), or with mass the fewest whose attention mass (normalised over the
    candidates) reaches it (per image a different count; batches run packed, never padded).
    A model without a class token (class_token=False, 'avg' or 'map' pooling, e.g. SigLIP)
    ranks each token by the attention it receives in the previous block instead: its softmax
    column, averaged over all queries of its image (the kept tokens, prefix tokens included)
    and over the heads; 'map' pooling uses this rule too, not the pooling query's attention
    (which is only defined after the last block), and its attention pool attends to the kept
    tokens only. Class, distillation and register tokens are always kept. package=True
    appends each image's pruned tokens, averaged by attention, as one token (EViT's fused
    token; 'token' pooling only). keep_rate=1.0 without mass: no pruning (timm's forward).
    forward_features and forward_intermediates return full token grids (pruned tokens hold
    their last value); forward_tokens the packed kept tokens (see SparseVisionTransformer).

    A VisionTransformer subclass that defines its own forward, forward_features,
    forward_head, forward_intermediates, _pos_embed or pool (other than timm's distilled
    DeiT) is refused with a TypeError, and on any error the model is left as it was.
    A timm Eva (or a wrapper around one) goes to patch.eva; timm's SAM encoder
    (VisionTransformerSAM), which prunes windows, not tokens, to patch.sam with `ratios`
    (ratios is for SAM only). Returns the model (the wrapper, for a features_only one)."""
    if _is_sam(model):
        if (keep_rate, mass, prune_layers, package) != (1.0, None, None, False):
            raise ValueError("a VisionTransformerSAM prunes windows: pass ratios (see patch.sam), not keep_rate, "
                             "mass, prune_layers or package")
        return sam(model, ratios=0.0 if ratios is None else ratios)
    if ratios is not None:
        raise ValueError("ratios is for window pruning (SAM, Swin); a ViT takes keep_rate or mass")
    if isinstance(model, Eva) or isinstance(getattr(model, "model", None), Eva):
        return eva(model, keep_rate=keep_rate, mass=mass, prune_layers=prune_layers, package=package)
    wrapper = model
    if isinstance(model, FeatureGetterNet) and isinstance(getattr(model, "model", None), VisionTransformer):
        model = model.model
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    sparse_class = _sparse_vit_class(type(model))
    for i, blk in enumerate(model.blocks):
        _check_vit_block(blk, f"model.blocks[{i}]")
    _check_vit_pool(model)
    _install_token_pruning(model, sparse_class, SparseBlock, keep_rate, mass, prune_layers, package)
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


def _check_vit_pool(model: VisionTransformer) -> None:
    from timm.layers import AttentionPoolLatent  # here, not at the top: only this check needs it

    if model.global_pool not in ("token", "avg", "", "map") or (
            model.global_pool == "map") != (type(model.attn_pool) is AttentionPoolLatent):
        raise ValueError(f"patch.vit supports global_pool 'token', 'avg', '' or 'map' (timm's AttentionPoolLatent), "
                         f"got {model.global_pool!r} with attn_pool {type(model.attn_pool).__name__}")


def _check_vit_block(blk: nn.Module, name: str) -> None:
    if type(blk) not in (Block, SparseBlock):
        raise TypeError(f"{name} is a {type(blk).__name__}; patch.vit supports timm's Block")
    attn = blk.attn
    if type(attn) is not Attention or attn.gate is not None:
        raise TypeError(f"{name}.attn must be timm's Attention without a gate, got {type(attn).__name__}")
    if attn.attn_drop.p > 0:
        raise ValueError(f"{name}.attn has attention dropout ({attn.attn_drop.p}), which packed attention lacks")
    _check_norms_and_mlp(blk, name)


def _check_norms_and_mlp(blk: nn.Module, name: str) -> None:
    """A ViT or SAM block's norm1 and norm2 LayerNorms and timm's Mlp (what the fused GEMMs take)."""
    for part in ("norm1", "norm2"):
        if not isinstance(getattr(blk, part), nn.LayerNorm):
            raise TypeError(f"{name}.{part} must be a LayerNorm (fused into the next GEMM), got "
                            f"{type(getattr(blk, part)).__name__}")
    if not isinstance(blk.mlp, Mlp):
        raise TypeError(f"{name}.mlp must be timm's Mlp, got {type(blk.mlp).__name__}")


# ------------------------------------------------------------------------------ Eva
# get_embed(): one [N, 2 * head_dim] table for every block, or (Mixed) one [num_heads, N, 2 * head_dim] per block
_EVA_ROPES = (RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed)


def eva(model: Eva, keep_rate: float = 1.0, mass: Optional[float] = None,
        prune_layers: Optional[Sequence[int]] = None, package: bool = False) -> Eva:
    """Token pruning for a timm Eva (eva02_*, eva_*, the ROPE-ViTs vit_*_rope_*: rotary
    position embeddings, SwiGLU or GELU MLP, q/k norms, LayerScale) or the features_only wrapper timm builds around one, in
    place, as patch.vit does for a VisionTransformer (patch.vit hands Eva models here; same
    arguments and return types). Each kept token takes its rotary embedding with it, so a
    pruned block is timm's EvaBlock on the kept tokens with their own rope
    (sparse_ops.nn.eva).

    Supported: a class token (its attention row ranks the tokens) or none (the attention each
    token receives ranks them, as in patch.vit), register tokens, rope None, 'cat' /
    'dinov3' (one table for all blocks) or 'mixed' (one learnt table per block and head), at a
    fixed or dynamic image size, EvaBlock with EvaAttention or AttentionRope (attn_type
    'rope': fused or separate q/k/v, grouped-query attention) without gate or attention
    dropout, global_pool 'token', 'avg' or ''. Anything else (EvaBlockPostNorm, 'mrope' rope,
    a gate, 'map' pooling, a subclass of Eva) raises a TypeError or ValueError naming it,
    before the model is changed; on any error it is left as it was."""
    wrapper = model
    if isinstance(model, FeatureGetterNet) and isinstance(getattr(model, "model", None), Eva):
        model = model.model
    if type(model) not in (Eva, SparseEva):
        raise TypeError(f"patch.eva takes timm's Eva (or a features_only wrapper around one), "
                        f"got {type(model).__name__}")
    if model.rope is not None and not isinstance(model.rope, _EVA_ROPES):
        raise TypeError(f"patch.eva supports Eva's rope_type 'cat', 'dinov3' and 'mixed', not "
                        f"{type(model.rope).__name__}")
    for i, blk in enumerate(model.blocks):
        _check_eva_block(blk, f"model.blocks[{i}]", model.num_prefix_tokens)
    if model.attn_pool is not None or model.global_pool not in ("token", "avg", ""):
        raise ValueError(f"patch.eva supports global_pool 'token', 'avg' or '', got {model.global_pool!r}")
    _install_token_pruning(model, SparseEva, SparseEvaBlock, keep_rate, mass, prune_layers, package)
    for i, blk in enumerate(model.blocks):  # 'mixed': SparseEva hands every block all the tables
        blk.rope_index = i if model.rope_mixed else None
    return wrapper


def _install_token_pruning(model: nn.Module, model_class: type, block_class: type, keep_rate: float,
                           mass: Optional[float], prune_layers: Optional[Sequence[int]], package: bool) -> None:
    """What patch.vit and patch.eva share after their own model checks: the checks of
    prune_layers and package, then the class swaps and the blocks' settings (the model as it
    was on any error)."""
    depth = len(model.blocks)
    layers = default_prune_layers(depth) if prune_layers is None else check.integers(prune_layers, "prune_layers")
    if any(not 1 <= i < depth for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"prune_layers must be distinct block indices in [1, {depth}) (a block prunes on the "
                         f"previous block's attention), got {list(layers)}")
    if not isinstance(package, bool):
        raise TypeError(f"package must be a bool, got {type(package).__name__}")
    if package and model.global_pool != "token":
        raise ValueError(f"package=True needs global_pool 'token' (a package token has no place in the token "
                         f"grid that 'avg' pooling reads), got {model.global_pool!r}")
    with _restored_on_failure([model, *model.blocks]):
        model.__class__ = model_class
        for blk in model.blocks:
            blk.__class__ = block_class
            blk.num_prefix_tokens = model.num_prefix_tokens
            blk.received_attention = model.cls_token is None
            blk.package = package
        model.prune_layers = tuple(sorted(layers))
        set_sparsity(model, keep_rate=keep_rate, mass=mass)


def _check_eva_block(blk: nn.Module, name: str, num_prefix_tokens: int) -> None:
    if isinstance(blk, EvaBlockPostNorm):
        raise TypeError(f"{name} is an EvaBlockPostNorm (use_post_norm=True: the norms follow attention and MLP), "
                        f"which patch.eva does not support; it supports timm's EvaBlock")
    if type(blk) not in (EvaBlock, SparseEvaBlock):
        raise TypeError(f"{name} is a {type(blk).__name__}; patch.eva supports timm's EvaBlock")
    attn = blk.attn
    if type(attn) not in (EvaAttention, AttentionRope):
        raise TypeError(f"{name}.attn must be timm's EvaAttention or AttentionRope, got {type(attn).__name__}")
    if attn.gate is not None:
        raise TypeError(f"{name}.attn has a gate (gated_attn=True: a sigmoid gate on the attention output), "
                        f"which patch.eva does not support")
    if attn.attn_drop.p > 0:
        raise ValueError(f"{name}.attn has attention dropout ({attn.attn_drop.p}), which packed attention lacks")
    if attn.num_prefix_tokens != num_prefix_tokens:
        raise ValueError(f"{name}.attn leaves {attn.num_prefix_tokens} prefix tokens unrotated, the model has "
                         f"{num_prefix_tokens}")
    if not isinstance(blk.norm1, nn.LayerNorm):
        raise TypeError(f"{name}.norm1 must be a LayerNorm (fused into the qkv GEMM), got {type(blk.norm1).__name__}")
    if not isinstance(blk.mlp, (Mlp, GluMlp, SwiGLU)):
        raise TypeError(f"{name}.mlp must be timm's Mlp, GluMlp or SwiGLU, got {type(blk.mlp).__name__}")


# ------------------------------------------------------------------------------ SAM
def _sam_encoder(model: nn.Module) -> nn.Module:
    """The model itself, or the one a features_only FeatureGetterNet wraps (SAM's wrapper)."""
    return model.model if isinstance(model, FeatureGetterNet) else model


def _is_sam(model: nn.Module) -> bool:
    return isinstance(_sam_encoder(model), timm_sam.VisionTransformerSAM)


def sam(model: nn.Module, ratios: Union[float, Sequence[float]] = 0.0, query_pruned_global: bool = False) -> nn.Module:
    """Window pruning (SparseViT) for timm's SAM image encoder (VisionTransformerSAM:
    samvit_*, ViTDet-style windowed plain ViTs) or the features_only wrapper timm builds
    around it, in place, at any input size (sparse_ops.nn.sam). patch.vit hands such models
    here.

    ratios: the fraction of windows each block prunes, in [0, 1): one float (every windowed
    block; with query_pruned_global every global block too) or one per block (a list, tuple,
    numpy array or tensor; a global block's entry must be 0 unless query_pruned_global).
    Windows are ranked once per run of consecutive windowed blocks and its blocks keep
    prefixes of that ranking (nested sets, in any order of ratios). A kept window runs the
    whole block; a pruned one passes through, so global blocks and the neck see a complete
    map. Global blocks are timm's, dense, unless query_pruned_global: then a global block
    with a ratio r takes as queries the tokens of the (1 - r) windows of its input with the
    largest activation norm, every token as a key and value. 0 everywhere: timm's forward.

    Supported: timm's Block with its Attention (decomposed relative position, RoPE or
    neither; qk_norm), LayerNorms, Mlp, LayerScale, no attention dropout, one window size.
    Anything else raises a TypeError or ValueError naming it, before the model is changed.
    Returns the model (the wrapper, for a features_only one)."""
    inner = _sam_encoder(model)
    if type(inner) not in (timm_sam.VisionTransformerSAM, SparseVisionTransformerSAM):
        raise TypeError(f"model must be timm's VisionTransformerSAM or a features_only wrapper around one, got "
                        f"{type(inner).__name__}")
    if not isinstance(query_pruned_global, bool):
        raise TypeError(f"query_pruned_global must be a bool, got {type(query_pruned_global).__name__}")
    for i, blk in enumerate(inner.blocks):
        _check_sam_block(blk, f"model.blocks[{i}]")
    sizes = {blk.window_size for blk in inner.blocks if blk.window_size}
    if len(sizes) > 1:
        raise ValueError(f"patch.sam needs one window size for the windowed blocks, got {sorted(sizes)}")
    if query_pruned_global and not sizes:
        raise ValueError("query_pruned_global needs windowed blocks: their window grid ranks the queries")
    with _restored_on_failure([inner, *inner.blocks]):
        inner.__class__ = SparseVisionTransformerSAM
        for blk in inner.blocks:
            blk.__class__ = SparseSamBlock
            blk.query_pruned = query_pruned_global and not blk.window_size
            blk.grid_window = next(iter(sizes), 0)
        set_sparsity(inner, ratios=ratios)
    return model


def _check_sam_block(blk: nn.Module, name: str) -> None:
    if type(blk) not in (timm_sam.Block, SparseSamBlock):
        raise TypeError(f"{name} is a {type(blk).__name__}; patch.sam supports timm's vision_transformer_sam.Block")
    if type(blk.attn) is not timm_sam.Attention:
        raise TypeError(f"{name}.attn must be timm's vision_transformer_sam.Attention, got {type(blk.attn).__name__}")
    if blk.attn.attn_drop.p > 0:
        raise ValueError(f"{name}.attn has attention dropout ({blk.attn.attn_drop.p}), which the window kernel lacks")
    _check_norms_and_mlp(blk, name)


def _sam_ratios(model: SparseVisionTransformerSAM, ratios) -> list:
    """One ratio per block from patch.sam's ratios (see there)."""
    blocks = list(model.blocks)
    prunable = [blk.prunable for blk in blocks]
    expected = f"a float or one per block ({len(blocks)})"
    single = check.scalar(ratios)
    values = [single if p else 0.0 for p in prunable] if single is not None else check.numbers(ratios, "ratios",
                                                                                              expected)
    if len(values) != len(blocks):
        raise ValueError(f"ratios must be {expected}, got {len(values)} values {values}")
    bad = [r for r in values if not 0.0 <= r < 1.0]
    if bad:
        raise ValueError(f"ratios must be in [0, 1) (the fraction of windows pruned), got {bad[0]}")
    for i, (r, p) in enumerate(zip(values, prunable)):
        if r and not p:
            raise ValueError(f"ratios[{i}] is {r} but block {i} is a global block, which runs dense unless "
                             "patch.sam(..., query_pruned_global=True)")
    return values


# ------------------------------------------------------------------------------ Swin
def swin(model: nn.Module, ratios: Union[float, Sequence[float]] = 0.0, inplace: bool = True) -> nn.Module:
    """Window pruning (SparseViT) for a timm SwinTransformer (v1) or SwinTransformerV2
    (sparse_ops.nn.swinv2), in place, at any input size; or for the backbone
    timm.create_model(..., features_only=True) builds around one (FeatureListNet,
    FeatureDictNet, FeatureHookNet, or FeatureGetterNet over forward_intermediates), which
    then returns timm's feature maps, pruned. ratios: the fraction of windows each block
    prunes, in [0, 1): one float, one per stage, or one per block (of the stages the model
    holds), as a list, tuple, numpy array or tensor. A stage scores its windows once (L2 norm
    of the activations) and its blocks keep nested sets, so ratios must not decrease within a
    stage: a decrease raises a ValueError naming the stage and block. 0 runs timm's block
    unchanged. inplace: in inference a block may write into activations its stage made that
    no forward hook can see (see SparseSwinStage); False: every block allocates its output.
    Returns the model."""
    if isinstance(model, SwinTransformerV2Cr):
        raise TypeError("SwinTransformerV2Cr (swinv2_cr_*) is not supported: its blocks (SwinTransformerV2CrBlock: "
                        "meta-MLP position bias without 16*sigmoid, extra norm3) and NCHW stages have no sparse "
                        "classes; SwinTransformerV2 (swinv2_*) is supported")
    stages = _swin_stages(model)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    _per_block_ratios(stages, ratios)  # bad ratios fail before any change
    if any(isinstance(stage, SwinTransformerV2Stage) for _, stage in stages):
        swinv2.swap_classes(SimpleNamespace(layers=[stage for _, stage in stages]))
    else:
        _swap_swin_classes(stages)
    for _, stage in stages:
        stage.inplace = inplace
    set_sparsity(model, ratios=ratios)
    return model


def _swap_swin_classes(stages: list) -> None:
    for name, stage in stages:
        if type(stage) not in (SwinTransformerStage, SparseSwinStage):
            raise TypeError(f"{name} is a {type(stage).__name__}; patch.swin supports timm's SwinTransformerStage")
        for b, blk in enumerate(stage.blocks):
            where = f"{name}.blocks[{b}]"
            if type(blk) not in (SwinTransformerBlock, SparseSwinBlock):
                raise TypeError(f"{where} is a {type(blk).__name__}; patch.swin supports timm's SwinTransformerBlock")
            if not isinstance(blk.norm1, nn.LayerNorm) or not isinstance(blk.norm2, nn.LayerNorm):
                raise TypeError(f"{where}: norm1 and norm2 must be LayerNorms (fused into the next GEMM)")
            if not isinstance(blk.mlp, Mlp) or blk.attn.attn_drop.p > 0:
                raise TypeError(f"{where}: patch.swin needs timm's Mlp and no attention dropout")
    for _, stage in stages:
        stage.__class__ = SparseSwinStage
        for blk in stage.blocks:
            blk.__class__ = SparseSwinBlock


_SWINS = (SwinTransformer, SwinTransformerV2)
_SWIN_MODELS = "a timm SwinTransformer, SwinTransformerV2 or a features_only wrapper around one"


def _swin_stages(model: nn.Module) -> list:
    """(name, stage) for each Swin stage model holds, in order; a TypeError for anything
    that is not a Swin or a feature wrapper timm builds around one."""
    if isinstance(model, _SWINS):
        return [(f"model.layers[{s}]", stage) for s, stage in enumerate(model.layers)]
    if isinstance(model, FeatureGetterNet) and isinstance(model.model, _SWINS):
        stages = [(f"model.model.layers[{s}]", stage) for s, stage in enumerate(model.model.layers)]
        _check_out_indices(model.out_indices, len(stages), model)
        return stages
    if isinstance(model, FeatureHookNet) and isinstance(model["body"] if "body" in model else None, _SWINS):
        return [(f"model.body.layers[{s}]", stage) for s, stage in enumerate(model["body"].layers)]
    if isinstance(model, (FeatureDictNet, FeatureHookNet)):  # the Swin's children, its Sequential flattened
        names = list(model.keys())
        if names[:1] == ["patch_embed"] and names[1:] == [f"layers_{s}" for s in range(len(names) - 1)]:
            _check_out_indices(model.feature_info.out_indices, len(names) - 1, model)
            return [(f"model.{name}", model[name]) for name in names[1:]]
        raise TypeError(f"model is a {type(model).__name__} holding {names}, not a Swin's patch_embed and "
                        f"layers_0, layers_1, ...; patch.swin takes {_SWIN_MODELS}")
    around = f" around a {type(model.model).__name__}" if isinstance(model, FeatureGetterNet) else ""
    raise TypeError(f"model must be {_SWIN_MODELS} (FeatureListNet, FeatureDictNet, FeatureHookNet, "
                    f"FeatureGetterNet), got {type(model).__name__}{around}")


def _check_out_indices(out_indices, num_stages: int, model: nn.Module) -> None:
    if any(not -num_stages <= i < num_stages for i in out_indices):
        raise ValueError(f"out_indices {tuple(out_indices)} of the {type(model).__name__} are out of range: "
                         f"it holds {num_stages} Swin stages")


def _per_block_ratios(stages: list, ratios) -> list:
    return check.window_ratios(ratios, [len(stage.blocks) for _, stage in stages])


# ---------------------------------------------------------------------------- density
_TOKEN_PRUNED = (SparseVisionTransformer, SparseEva)  # the models patch.vit / patch.eva make


def set_sparsity(model: nn.Module, keep_rate: Optional[float] = None, mass: Optional[float] = None,
                 ratios: Union[None, float, Sequence[float]] = None) -> nn.Module:
    """Change the density of a patched model at run time, on the same weights (SaiT's one
    model for many densities). ViT (patch.vit): keep_rate or mass (keep_rate=1.0: dense).
    Swin (patch.swin): ratios as in patch.swin (0.0: dense; a ValueError where they decrease
    within a stage). SAM (patch.sam): ratios as in patch.sam. Returns the model."""
    wrapper = model
    if _is_patched_sam(model):
        if keep_rate is not None or mass is not None:
            raise ValueError("keep_rate and mass are for token pruning; a SAM model takes ratios")
        if ratios is None:
            raise ValueError("pass ratios")
        inner = _sam_encoder(model)
        for blk, r in zip(inner.blocks, _sam_ratios(inner, ratios)):
            blk.sparsity = r
        return wrapper
    if isinstance(model, FeatureGetterNet) and isinstance(getattr(model, "model", None), _TOKEN_PRUNED):
        model = model.model
    if isinstance(model, _TOKEN_PRUNED):
        if ratios is not None:
            raise ValueError("ratios is for Swin models; a ViT takes keep_rate or mass")
        if (keep_rate is None and mass is None) or (mass is not None and keep_rate not in (None, 1.0)):
            raise ValueError("pass exactly one of keep_rate and mass")
        if mass is not None:
            mass, keep_rate = check.rate(mass, "mass"), 1.0
        else:
            keep_rate = check.rate(keep_rate, "keep_rate")
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
        stages = _swin_stages(model)
        blocks = [blk for _, stage in stages for blk in stage.blocks]
        for blk, r in zip(blocks, _per_block_ratios(stages, ratios)):
            blk.sparsity = r
        return model
    raise TypeError(f"model must be patched by sparse_ops.patch.vit, patch.swin or patch.sam first, got "
                    f"{type(model).__name__}")


def _is_patched_sam(model: nn.Module) -> bool:
    return isinstance(_sam_encoder(model), SparseVisionTransformerSAM)


def window_pruned_blocks(model: nn.Module) -> list:
    """The blocks of a model patched by patch.swin or patch.sam, in the order of its ratios."""
    if _is_patched_sam(model):
        return list(_sam_encoder(model).blocks)
    if _is_patched_swin(model):
        return [blk for _, stage in _swin_stages(model) for blk in stage.blocks]
    raise TypeError(f"model must be patched by sparse_ops.patch.swin or patch.sam, got {type(model).__name__}")


def _is_patched_swin(model: nn.Module) -> bool:
    try:
        stages = _swin_stages(model)
    except (TypeError, ValueError):
        return False
    return all(isinstance(stage, (SparseSwinStage, swinv2.SparseSwinV2Stage)) for _, stage in stages)


def _current_sparsity(model: nn.Module) -> dict:
    """The set_sparsity arguments that restore the model's present density."""
    if isinstance(model, _TOKEN_PRUNED):
        blk = next((b for b in model.blocks if b.prunes), None)
        if blk is None:
            return dict(keep_rate=1.0)
        return dict(mass=blk.mass) if blk.mass is not None else dict(keep_rate=blk.keep_rate)
    if _is_patched_swin(model) or _is_patched_sam(model):
        return dict(ratios=[blk.sparsity for blk in window_pruned_blocks(model)])
    raise TypeError(f"model must be patched by sparse_ops.patch.vit, patch.swin or patch.sam, got "
                    f"{type(model).__name__}")
