"""Drop-in sparse versions of timm's ViT, Eva and Swin modules (same parameters and state_dict
keys), swapped in by sparse_ops.patch."""
from .eva import SparseEva, SparseEvaBlock
from .swin import SparseSwinBlock, SparseSwinStage
from .swinv2 import SparseSwinV2Block, SparseSwinV2Stage
from .vit import SparseBlock, SparseVisionTransformer, SparseVisionTransformerDistilled, Tokens

__all__ = ["SparseBlock", "SparseEva", "SparseEvaBlock", "SparseSwinBlock", "SparseSwinStage", "SparseSwinV2Block",
           "SparseSwinV2Stage", "SparseVisionTransformer", "SparseVisionTransformerDistilled", "Tokens"]
