import os
import socket
import sys
import textwrap

import pytest
import timm
import torch
from conftest import run_within_budget

import sparse_ops
from sparse_ops import patch
from sparse_ops.nn import SparseVisionTransformer
from sparse_ops.train import (
    class_attentions,
    cls_attention_distillation_loss,
    dense_sparse_step,
    distillation_loss,
    sample_keep_rate,
    sample_swin_ratios,
)


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4,
                              num_heads=2, num_classes=5, **kwargs)
    return patch.vit(model, prune_layers=[1, 3])


def tiny_swin(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=72, embed_dim=16, depths=(2, 2, 2, 2),
                              num_heads=(1, 2, 2, 4), window_size=7, num_classes=5, **kwargs)
    return patch.swin(model)


# ----------------------------------------------------------------------------- losses
def test_distillation_loss_matches_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0]])
    T = 2.0
    p, q = (teacher / T).softmax(-1), (student / T).softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * T * T
    torch.testing.assert_close(distillation_loss(student, teacher, T), expected)
    assert distillation_loss(teacher, teacher, T).abs().item() < 1e-6


def test_distillation_gradient_reaches_student_only():
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    distillation_loss(student, teacher, 1.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_cls_attention_loss():
    a = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    b = torch.tensor([[0.2, 0.3, 0.5], [0.3, 0.3, 0.4]], requires_grad=True)
    expected = (a * (a.log() - b.log())).sum(-1).mean()
    torch.testing.assert_close(cls_attention_distillation_loss(b, a), expected)
    assert cls_attention_distillation_loss(a, a).abs().item() < 1e-6
    cls_attention_distillation_loss(b, a).backward()
    assert b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="student"):
        cls_attention_distillation_loss(a[0], a[0])


def test_class_attentions_are_distributions():
    model = tiny_vit()
    sparse_ops.set_sparsity(model, keep_rate=0.5)
    early, late = class_attentions(model, torch.randn(2, 3, 32, 32), [0, 3])
    assert early.shape == late.shape == (2, 17)
    torch.testing.assert_close(early.sum(-1), torch.ones(2))
    assert [b.keep_rate for b in model.blocks] == [1.0, 0.5, 1.0, 0.5]  # restored
    assert [b.emit_cls_attn for b in model.blocks] == [True, False, True, False]


def test_distillation_loss_errors():
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 3))


# ---------------------------------------------------------------------------- sampling
def test_sample_keep_rate():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    rates = [sample_keep_rate(low=0.5, high=0.9, generator=g()) for _ in range(3)]
    assert rates[0] == rates[1] == rates[2] and 0.5 <= rates[0] <= 0.9
    gen = torch.Generator().manual_seed(0)
    drawn = {sample_keep_rate([0.5, 0.7, 1.0], generator=gen) for _ in range(50)}
    assert drawn == {0.5, 0.7, 1.0}
    assert {sample_keep_rate((0.6, 0.8), generator=gen) for _ in range(50)} == {0.6, 0.8}  # a list, never a range
    ranged = [sample_keep_rate(low=0.6, high=0.8, generator=gen) for _ in range(50)]
    assert all(0.6 <= r <= 0.8 for r in ranged) and len(set(ranged)) == 50
    with pytest.raises(ValueError, match="choices"):
        sample_keep_rate([1.5])
    with pytest.raises(ValueError, match="low and high"):
        sample_keep_rate(low=0.9, high=0.5)


def test_sample_swin_ratios():
    model = tiny_swin()
    choices = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    first = sample_swin_ratios(model, choices, torch.Generator().manual_seed(1))
    assert first == sample_swin_ratios(model, choices, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ratios = sample_swin_ratios(model, choices, gen)
        assert len(ratios) == 8 and all(r in choices for r in ratios)
        assert all(ratios[i] <= ratios[i + 1] for i in range(0, 8, 2))
    with pytest.raises(TypeError, match="model"):
        sample_swin_ratios(tiny_vit())


# ------------------------------------------------------------------ dense/sparse step
@pytest.mark.parametrize("kind, options", [("vit", dict(keep_rate=0.5)),
                                           ("vit", dict(mass=0.8)),
                                           ("swin", dict(ratios=[0.0, 0.5] * 4))])
def test_dense_sparse_step_trains_and_restores(kind, options):
    model = tiny_vit() if kind == "vit" else tiny_swin()
    if kind == "vit":
        sparse_ops.set_sparsity(model, keep_rate=0.7)
    else:
        sparse_ops.set_sparsity(model, ratios=0.25)
    torch.manual_seed(0)
    size, batch, steps = (32, 4, 5) if kind == "vit" else (72, 2, 3)  # Swin under the Triton interpreter is slow
    images, targets = torch.randn(batch, 3, size, size), torch.arange(batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [dense_sparse_step(model, images, targets, options, temperature=2.0, optimizer=optimizer)
              for _ in range(steps)]
    assert losses[-1].total < losses[0].total
    assert abs(losses[0].total - (losses[0].dense + losses[0].sparse + losses[0].distill)) < 1e-4
    if kind == "vit":
        assert [b.keep_rate for b in model.blocks] == [1.0, 0.7, 1.0, 0.7]
    else:
        assert all(b.sparsity == 0.25 for s in model.layers for b in s.blocks)


def test_dense_sparse_step_without_optimizer_leaves_backward_to_caller():
    model = tiny_vit()
    losses = dense_sparse_step(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), dict(keep_rate=0.5))
    assert isinstance(losses.total, float)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TypeError, match="sparse_options"):
        dense_sparse_step(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), 0.5)



# ------------------------------------------------------------ dense prediction backbones
def test_distillation_loss_per_pixel():
    student, teacher = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)  # [B, K, H, W]
    T = 1.5
    p, q = (teacher / T).softmax(1), (student / T).softmax(1)
    expected = (p * (p.log() - q.log())).sum(1).mean() * T * T  # KL per pixel, mean over pixels
    torch.testing.assert_close(distillation_loss(student, teacher, T), expected)


def tiny_swin_features(out_indices=(0, 1, 2)):
    torch.manual_seed(0)
    return patch.swin(timm.create_model("swin_tiny_patch4_window7_224", features_only=True, out_indices=out_indices,
                                        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2, 2),
                                        num_heads=(1, 2, 4)))


def test_sample_swin_ratios_features_only():
    gen = torch.Generator().manual_seed(0)
    for out_indices, blocks in (((0, 1, 2), 6), ((0, 1), 4)):  # the wrapper holds stages up to the last index
        ratios = sample_swin_ratios(tiny_swin_features(out_indices), (0.0, 0.3, 0.6), gen)
        assert len(ratios) == blocks and all(ratios[i] <= ratios[i + 1] for i in range(0, blocks, 2))


class PixelHead(torch.nn.Module):
    """A patched features_only Swin and a 1x1 classifier on its finest map: logits [B, K, H, W]."""

    def __init__(self):
        super().__init__()
        self.backbone = tiny_swin_features()
        self.classifier = torch.nn.Conv2d(self.backbone.feature_info.channels()[0], 3, 1)

    def forward(self, images):
        return self.classifier(self.backbone(images)[0].permute(0, 3, 1, 2))


def test_dense_sparse_step_on_a_backbone():
    model = PixelHead()
    sparse_ops.set_sparsity(model.backbone, ratios=0.25)
    torch.manual_seed(1)
    images, targets = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 16, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [dense_sparse_step(model, images, targets, dict(ratios=[0.0, 0.5] * 3), optimizer=optimizer,
                                backbone=model.backbone) for _ in range(3)]
    assert losses[-1].total < losses[0].total and losses[0].distill > 0
    blocks = [b for name, stage in model.backbone.items() if name.startswith("layers_") for b in stage.blocks]
    assert [b.sparsity for b in blocks] == [0.25] * 6  # restored
    with pytest.raises(TypeError, match="PixelHead"):  # the head itself has no density
        dense_sparse_step(model, images, targets, dict(ratios=0.5))


# ------------------------------------------------------ the cost of a dense/sparse step
def one_backward_of_the_total(model, images, targets, options, backbone=None):
    """dense_sparse_step's loss (distill_weight 0.5, temperature 2) as it was first written:
    both passes' graphs alive at once, one backward of the total."""
    inner = model if backbone is None else backbone
    dense = dict(keep_rate=1.0) if isinstance(inner, SparseVisionTransformer) else dict(ratios=0.0)
    sparse_ops.set_sparsity(inner, **dense)
    dense_logits = model(images)
    sparse_ops.set_sparsity(inner, **options)
    sparse_logits = model(images)
    sparse_ops.set_sparsity(inner, **dense)
    criterion = torch.nn.CrossEntropyLoss()
    (criterion(dense_logits, targets) + criterion(sparse_logits, targets)
     + 0.5 * distillation_loss(sparse_logits, dense_logits, 2.0)).backward()


STEP_CASES = {  # model, sparse_options, images, targets (drop path on: both must draw alike)
    "vit keep_rate": (lambda: tiny_vit(drop_path_rate=0.2), dict(keep_rate=0.5), (4, 3, 32, 32), (4,)),
    "vit mass": (lambda: tiny_vit(drop_path_rate=0.2), dict(mass=0.8), (4, 3, 32, 32), (4,)),
    "swin": (lambda: tiny_swin(drop_path_rate=0.2), dict(ratios=[0.0, 0.5] * 4), (2, 3, 72, 72), (2,)),
    "backbone": (PixelHead, dict(ratios=[0.0, 0.5] * 3), (2, 3, 32, 32), (2, 16, 16)),
}


@pytest.mark.parametrize("case", STEP_CASES)
def test_dense_sparse_step_gradients_equal_one_backward_of_the_total(case):
    build, options, image_shape, target_shape = STEP_CASES[case]
    images, targets = torch.randn(image_shape), torch.randint(0, 3, target_shape)
    grads = []
    for separate_backwards in (True, False):
        model = build()
        backbone = getattr(model, "backbone", None)
        torch.manual_seed(3)  # the same drop-path draws
        if separate_backwards:  # lr 0: the step leaves the gradients and moves nothing
            dense_sparse_step(model, images, targets, options, distill_weight=0.5, temperature=2.0,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.0), backbone=backbone)
        else:
            one_backward_of_the_total(model, images, targets, options, backbone)
        grads.append({name: p.grad for name, p in model.named_parameters()})
    separate, total = grads
    unused = {name for name, g in total.items() if g is None}  # the backbone's stages past the head's map
    assert unused == {name for name, g in separate.items() if g is None} and len(unused) < len(total)
    for name in total.keys() - unused:
        err = (separate[name] - total[name]).abs().max().item()
        assert err <= 1e-6 * max(1.0, total[name].abs().max().item()), f"{name}: {err:.2e}"


class SavedForBackward:
    """Counts the bytes of the tensors autograd keeps for backward while they are kept, and
    their peak (a freed graph drops its saved tensors, and with them the holders made here)."""

    def __init__(self):
        self.alive = self.peak = 0

    def watch(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)

    def _pack(self, tensor):
        return _Held(self, tensor.detach())  # detached: a saved output would hold its own node (a cycle)


class _Held:
    def __init__(self, counter: SavedForBackward, tensor):
        self.counter, self.tensor, self.nbytes = counter, tensor, tensor.numel() * tensor.element_size()
        counter.alive += self.nbytes
        counter.peak = max(counter.peak, counter.alive)

    def __del__(self):
        self.counter.alive -= self.nbytes


@pytest.mark.parametrize("case", ["vit keep_rate", "swin"])
def test_dense_sparse_step_keeps_one_pass_for_backward(case):
    """The dense graph is freed before the sparse forward: the step keeps no more for backward
    at once than a dense step (with both graphs alive: the sum of the two passes)."""
    build, options, image_shape, target_shape = STEP_CASES[case]
    model, images, targets = build(), torch.randn(image_shape), torch.randint(0, 3, target_shape)
    dense, step = SavedForBackward(), SavedForBackward()
    with dense.watch():  # the model is dense: patched at zero sparsity
        torch.nn.functional.cross_entropy(model(images), targets).backward()
    with step.watch():
        dense_sparse_step(model, images, targets, options, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    assert dense.peak > 0 and step.alive == 0
    assert step.peak <= dense.peak, f"the step kept {step.peak / dense.peak:.2f}x a dense step's saved bytes"


# --------------------------------------------------------------------------------- DDP
DDP_WORKER = textwrap.dedent("""
    import os, sys, torch, timm, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from sparse_ops import patch
    from sparse_ops.train import dense_sparse_step
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = patch.vit(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                                        depth=4, num_heads=2, num_classes=5), prune_layers=[1, 3])
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)  # each rank its own data
    images, targets = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    dense_sparse_step(ddp, images, targets, dict(keep_rate=0.5), optimizer=optimizer)
    torch.save([p.detach() for p in model.parameters()], f"{sys.argv[1]}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
""")


def test_ddp_two_ranks_stay_in_sync(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script, out = tmp_path / "worker.py", tmp_path / "params.pt"
    script.write_text(DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # TRITON_INTERPRET as conftest set it
    result = run_within_budget([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                "--master_addr=127.0.0.1", f"--master_port={port}", str(script), str(out)], 120,
                               "two DDP ranks", env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-4000:]
    first, second = (torch.load(f"{out}.{rank}") for rank in (0, 1))
    initial = [p.detach() for p in tiny_vit().parameters()]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, initial))  # the step moved them
