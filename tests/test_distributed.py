"""dense_sparse_step under DDP and FSDP2 (fully_shard per block and at the root): gloo, two CPU
processes, each on half the batch, must train as one process on the whole batch, run after run.

One spawn trains every case: its workers each run a case twice per wrapper (the two runs must
agree bit for bit), and rank 0 trains the single-process reference. The keep rate of the ViT
case is drawn each step by the multi-process recipe: sample_keep_rate with a generator seeded
alike on every rank, while the global RNG is seeded per rank."""
import os
import tempfile
import warnings

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparse_ops import patch
from sparse_ops.nn import SparseBlock, SparseSamBlock, SparseSwinBlock
from sparse_ops.train import dense_sparse_step, sample_keep_rate

WORLD = 2
STEPS = 3
BATCH = 4  # per rank
CASES = ["vit_keep_rate", "vit_mass", "swin_ratios", "swin_features_only", "sam_ratios"]
WRAPPERS = ["ddp", "fsdp"]
SWIN = dict(img_size=64, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), drop_path_rate=0.0)


def _vit():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=32,
                              num_heads=2, num_classes=10)
    return patch.vit(model, prune_layers=(1, 2))


class _Segmenter(nn.Module):
    """A per-pixel classifier over a patched features_only Swin: logits [B, K, 8, 8]."""

    def __init__(self):
        super().__init__()
        self.backbone = patch.swin(timm.create_model("swin_tiny_patch4_window7_224", features_only=True,
                                                     out_indices=(1,), **SWIN))
        self.head = nn.Linear(64, 10)

    def forward(self, images):
        return self.head(self.backbone(images)[-1]).permute(0, 3, 1, 2)


def _model(case):
    if case.startswith("vit"):
        return _vit()
    if case == "swin_ratios":
        return patch.swin(timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **SWIN))
    if case == "sam_ratios":  # an 8x8 map in padded windows of 3, global attention in block 2
        return patch.sam(timm.create_model("samvit_base_patch16", img_size=64, patch_size=8, embed_dim=32, depth=3,
                                           num_heads=2, window_size=3, global_attn_indexes=(2,), neck_chans=16,
                                           num_classes=10))
    return _Segmenter()


def _batches(case):
    g = torch.Generator().manual_seed(1)
    size = 32 if case.startswith("vit") else 64
    shape = (WORLD * BATCH,) if case != "swin_features_only" else (WORLD * BATCH, 8, 8)
    return [(torch.randn(WORLD * BATCH, 3, size, size, generator=g), torch.randint(10, shape, generator=g))
            for _ in range(STEPS)]


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(case, wrapper, rank, world):
    """Three dense_sparse_steps (SGD, no momentum) -> (the parameters, FSDP2's view warnings)."""
    torch.manual_seed(0)
    model = inner = _model(case)
    if wrapper == "ddp":
        model = nn.parallel.DistributedDataParallel(inner)
    elif wrapper == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for blk in inner.modules():
            if isinstance(blk, (SparseBlock, SparseSwinBlock, SparseSamBlock)):
                fully_shard(blk)
        fully_shard(inner)
    torch.manual_seed(100 + rank)  # the usual per-rank seeding: the keep rate must not follow it
    same_on_every_rank = torch.Generator().manual_seed(7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for images, targets in _batches(case):
            options = {"vit_keep_rate": dict(keep_rate=sample_keep_rate(low=0.4, high=0.9, generator=same_on_every_rank)),
                       "vit_mass": dict(mass=0.7), "sam_ratios": dict(ratios=0.5)}.get(case, dict(ratios=[0.25, 0.5]))
            dense_sparse_step(model, images.chunk(world)[rank], targets.chunk(world)[rank], options,
                              optimizer=optimizer, backbone=getattr(inner, "backbone", None))
    views = [str(w.message) for w in caught if "view tensor" in str(w.message)]
    return {name: _full(p) for name, p in inner.named_parameters()}, views


def _worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    from sparse_ops.attention import _dispatch

    _dispatch.INTERPRET = False  # plain PyTorch on CPU tensors, as conftest sets for the tests
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        results = {}
        for case in CASES:
            for wrapper in WRAPPERS:
                results[case, wrapper] = [_train(case, wrapper, rank, WORLD) for _ in range(2)]
            if rank == 0:
                results[case, "single"] = _train(case, None, 0, 1)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained():
    with tempfile.TemporaryDirectory() as out_dir:
        # file:// rendezvous in a fresh directory: parallel runs cannot collide, no network
        mp.spawn(_worker, args=(f"file://{out_dir}/rendezvous", out_dir), nprocs=WORLD)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("case", CASES)
def test_matches_one_process_on_the_whole_batch(trained, case, wrapper):
    single, _ = trained[0][case, "single"]
    for rank in range(WORLD):
        for params, _ in trained[rank][case, wrapper]:
            assert params.keys() == single.keys()
            err = max((params[n] - single[n]).abs().max().item() for n in single)
            assert err <= 1e-5, f"rank {rank}: parameters {err:.2e} off one process after {STEPS} steps"


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("case", CASES)
def test_deterministic_and_equal_on_every_rank(trained, case, wrapper):
    (first, views), (second, _) = trained[0][case, wrapper]
    assert all(torch.equal(first[n], second[n]) for n in first), "two runs differ"
    other, _ = trained[1][case, wrapper][0]
    assert all(torch.equal(first[n], other[n]) for n in first), "ranks differ"
    if case.startswith("vit"):  # (timm's Swin block returns a view itself; nothing writes into it in training)
        assert not views, views[0]  # FSDP2: "returned a view tensor" (an in-place op would skip its hook)
