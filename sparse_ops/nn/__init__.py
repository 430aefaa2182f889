"""Drop-in sparse versions of timm's ViT, Eva, SAM and Swin modules (same parameters and state_dict
keys), swapped in by sparse_ops.patch."""
from .eva import SparseEva, SparseEvaBlock
from .sam import SparseSamBlock, SparseVisionTransformerSAM
from .swin import SparseSwinBlock, SparseSwinStage
from .swinv2 import SparseSwinV2Block, SparseSwinV2Stage
from .vit import SparseBlock, SparseVisionTransformer, SparseVisionTransformerDistilled, Tokens

__all__ = ["SparseBlock", "SparseEva", "SparseEvaBlock", "SparseSamBlock", "SparseSwinBlock", "SparseSwinStage",
           "SparseSwinV2Block", "SparseSwinV2Stage", "SparseVisionTransformer", "SparseVisionTransformerDistilled",
           "SparseVisionTransformerSAM", "Tokens"]
