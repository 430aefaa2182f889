import math
import random

import pytest
import timm
import torch

from sparse_ops import patch
from sparse_ops.search import (
    LatencyTable,
    _crossover,
    _mutate,
    evolutionary_search,
    measure_latency,
    sorted_within_stages,
)

CHOICES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
SPACE = [CHOICES] * 8
WEIGHTS = [1.0, 0.5, 2.0, 0.3, 1.5, 0.2, 0.8, 0.1]


def accuracy(config):
    """Synthetic: pruning costs accuracy, more in some blocks than others."""
    return 80.0 - sum(w * r * r for w, r in zip(WEIGHTS, config))


def latency(config):
    """Synthetic: every block's time shrinks with its ratio."""
    return sum(1.0 - r for r in config)


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, config):
        self.calls.append(tuple(config))
        return self.fn(config)


def run(**kwargs):
    args = dict(space=SPACE, accuracy_fn=accuracy, latency_fn=latency, latency_range=(4.0, 5.0), population=12,
                parents=4, mutation_prob=0.3, crossover=4, mutations=4, iterations=6, seed=0, progress=False)
    args.update(kwargs)
    return evolutionary_search(**args)


def test_mutation_keeps_values_in_space():
    rng = random.Random(0)
    parent = tuple([0.3] * 8)
    children = [_mutate(parent, SPACE, 0.5, rng) for _ in range(50)]
    assert all(v in CHOICES for child in children for v in child)
    assert any(list(child) != list(parent) for child in children)
    assert all(list(_mutate(parent, SPACE, 0.0, rng)) == list(parent) for _ in range(5))


def test_crossover_mixes_parents():
    rng = random.Random(0)
    a, b = tuple([0.0] * 8), tuple([0.7] * 8)
    children = [_crossover(a, b, rng) for _ in range(20)]
    assert all(v in (0.0, 0.7) for child in children for v in child)
    assert any(0.0 in child and 0.7 in child for child in children)


def test_search_respects_budget_dedups_and_improves():
    acc = Counting(accuracy)
    result = run(accuracy_fn=acc)
    assert len(acc.calls) == len(set(acc.calls)) == len(result.history)
    assert all(4.0 <= c.latency <= 5.0 for c in result.history)
    assert result.best == sorted(result.best, key=lambda c: -c.accuracy)
    first = max(c.accuracy for c in result.history if c.iteration == 0)
    assert result.best[0].accuracy >= first
    assert {c.iteration for c in result.history} <= set(range(6))


def test_search_is_deterministic_under_seed():
    assert run(seed=3) == run(seed=3)
    assert run(seed=3).history != run(seed=4).history


def test_constraint_repairs_candidates():
    repair = sorted_within_stages([2, 2, 2, 2])
    result = run(constraint=repair)
    for c in result.history:
        assert all(c.config[i] <= c.config[i + 1] for i in range(0, 8, 2))


def test_impossible_budget_raises():
    with pytest.raises(RuntimeError, match="latency"):
        run(latency_range=(100.0, 200.0), max_tries=50)
    with pytest.raises(ValueError, match="latency_range"):
        run(latency_range=(5.0, 4.0))
    with pytest.raises(ValueError, match="parents"):
        run(parents=20)
    with pytest.raises(TypeError, match="space"):
        run(space=[])


def test_resume_from_history_equals_uninterrupted_run(tmp_path):
    path = str(tmp_path / "history.json")
    full = run(iterations=6)
    run(iterations=3, history_path=path)
    acc = Counting(accuracy)
    resumed = run(iterations=6, history_path=path, accuracy_fn=acc)
    assert resumed == full
    assert len(acc.calls) == sum(c.iteration >= 3 for c in full.history)  # nothing evaluated twice
    with pytest.raises(ValueError, match="history_path"):
        run(iterations=6, history_path=path, seed=1)


# ------------------------------------------------------------------------------ latency
def tiny_swin():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=72, embed_dim=16, depths=(2, 2, 2, 2),
                              num_heads=(1, 2, 2, 4), window_size=7, num_classes=5)
    return patch.swin(model).eval()


def test_measure_latency_restores_sparsity():
    model = tiny_swin()
    seconds = measure_latency(model, torch.randn(1, 3, 72, 72), repeats=2, warmup=0, ratios=0.5)
    assert seconds > 0
    assert all(b.sparsity == 0.0 for s in model.layers for b in s.blocks)


def test_latency_table_structure_and_check():
    model = tiny_swin()
    table = LatencyTable(model, torch.randn(1, 3, 72, 72), choices=[0.0, 0.5], repeats=2, warmup=0)
    assert len(table.table) == 8 and all(set(row) == {0.0, 0.5} for row in table.table)
    assert table.overhead >= 0
    dense, sparse = [0.0] * 8, [0.0, 0.5] * 4
    assert table(dense) > 0 and math.isfinite(table(sparse))
    errors = table.check([dense, sparse], repeats=2)
    assert len(errors) == 2 and all(math.isfinite(e) and e >= 0 for e in errors)
    assert all(b.sparsity == 0.0 for s in model.layers for b in s.blocks)
    with pytest.raises(ValueError, match="choices"):
        table([0.3] * 8)
    result = evolutionary_search([[0.0, 0.5]] * 8, lambda c: -sum(c), table, (0.0, math.inf), population=4,
                                 parents=2, crossover=1, mutations=1, iterations=2, progress=False,
                                 constraint=sorted_within_stages([2, 2, 2, 2]))
    assert len(result.best) >= 1
