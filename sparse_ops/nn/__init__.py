"""Drop-in sparse versions of timm's ViT and Swin modules (same parameters and state_dict
keys), swapped in by sparse_ops.patch."""
from .swin import SparseSwinBlock, SparseSwinStage
from .vit import SparseBlock, SparseVisionTransformer, SparseVisionTransformerDistilled, Tokens

__all__ = ["SparseBlock", "SparseSwinBlock", "SparseSwinStage", "SparseVisionTransformer",
           "SparseVisionTransformerDistilled", "Tokens"]
