"""Convergence: dense/sparse training of a patched ViT (sparse_ops.train.dense_sparse_step) follows,
step by step, the same training of a plain-PyTorch twin: the unpatched timm model with the
pruning written out in torch (sparse_ops.reference's selection and gather), same weights, data
and keep rates. Losses and parameters are compared after every step (as Liger-Kernel's
convergence tests compare patched and unpatched training)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from sparse_ops import patch, reference
from sparse_ops.train import dense_sparse_step

PRUNE_LAYERS = (1, 3)
KEEP_RATES = (0.5, 0.75)  # of 16 and then 8 or 12 candidates: whole token counts, no rounding rule involved
STEPS = 5


def tiny_vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                             num_classes=10)  # 16 patches and a class token


def block_with_class_attention(block, x):
    """timm's Block with attention written out, returning also the class token's attention row
    averaged over heads: the scores the next block prunes by."""
    attn = block.attn
    B, N, C = x.shape
    q, k, v = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    probs = ((attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)).softmax(-1)
    x = x + block.ls1(attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(B, N, C))))
    x = x + block.ls2(block.mlp(block.norm2(x)))
    return x, probs[:, :, 0].mean(1).detach()


def twin_sparse_logits(net, images, keep_rate: float):
    """The pruned forward on the unpatched model: before each prune layer keep the class token
    and the top ceil(keep_rate * candidates) tokens by the class attention of the block before,
    in their original order; the head reads the class token."""
    x = net.norm_pre(net._pos_embed(net.patch_embed(images)))
    for i, block in enumerate(net.blocks):
        if i in PRUNE_LAYERS:
            kept = reference.select_tokens(scores, keep_rate=keep_rate)
            x = reference.gather_tokens(x, kept).view(len(images), -1, x.shape[-1])
        if i + 1 in PRUNE_LAYERS:
            x, scores = block_with_class_attention(block, x)
        else:
            x = block(x)
    return net.forward_head(net.norm(x))


def twin_step(net, images, labels, keep_rate: float, optimizer) -> float:
    """dense_sparse_step's loss written out: CE(dense) + CE(sparse) + KL(sparse || detached dense)."""
    dense, sparse = net(images), twin_sparse_logits(net, images, keep_rate)
    distill = F.kl_div(F.log_softmax(sparse, -1), F.log_softmax(dense.detach(), -1), reduction="batchmean",
                       log_target=True)
    loss = F.cross_entropy(dense, labels) + F.cross_entropy(sparse, labels) + distill
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def test_dense_sparse_training_follows_its_plain_pytorch_twin():
    """SGD with momentum: Adam divides by each gradient's running size, and turns rounding noise
    on gradients that are zero in exact arithmetic (the key bias) into steps of the full rate."""
    torch.manual_seed(0)
    twin = tiny_vit().train()
    model = patch.vit(copy.deepcopy(twin), prune_layers=PRUNE_LAYERS)
    twin_optimizer, model_optimizer = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (twin, model))
    data = torch.Generator().manual_seed(1)
    first_loss = None
    for step in range(STEPS):
        images, labels = torch.randn(4, 3, 32, 32, generator=data), torch.randint(0, 10, (4,), generator=data)
        keep_rate = KEEP_RATES[step % 2]
        expected = twin_step(twin, images, labels, keep_rate, twin_optimizer)
        losses = dense_sparse_step(model, images, labels, dict(keep_rate=keep_rate), optimizer=model_optimizer)
        assert losses.total == pytest.approx(expected, rel=1e-5), step
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}, {name}: {m}")
        first_loss = expected if first_loss is None else first_loss
    assert expected != first_loss  # it trained
