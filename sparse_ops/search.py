"""Evolutionary search of layer-wise sparsity under a latency budget (SparseViT).

Blocks differ in how much accuracy they lose per pruned window and in how much time a
pruned window saves, so the best model at a latency is found by searching one ratio per
block. The space is generic: a list of per-position choice lists. Accuracy is expensive, so
every configuration is evaluated once (cached by its tuple); latency is cheap with a
LatencyTable (per-block timings summed), so candidates outside the budget are rejected
before any evaluation. The search state is
saved to a JSON file after every iteration and a run resumes from it, giving the same
result as an uninterrupted run under the same seed.

The timer is a small median-of-N one (CUDA synchronised) rather than benchmarks/timing.py,
because the benchmarks package is not installed with sparse_ops.
"""
import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import _checks as check

Config = Tuple[float, ...]


# ------------------------------------------------------------------------------ latency
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency(model: nn.Module, images: Tensor, repeats: int = 10, warmup: int = 2, **sparsity) -> float:
    """Median seconds of model(images) without gradients over `repeats` calls (after
    `warmup`), at the density given by `sparsity` (set_sparsity arguments; the model's
    previous density is restored). No arguments: as the model is."""
    from .patch import set_sparsity
    from .patch import _current_sparsity

    previous = _current_sparsity(model) if sparsity else None
    try:
        if sparsity:
            set_sparsity(model, **sparsity)
        return _median_seconds(lambda: model(images), images.device, repeats, warmup)
    finally:
        if previous is not None:
            set_sparsity(model, **previous)


class LatencyTable:
    """Latency of a patched Swin or SAM encoder at any per-block ratios, predicted as a fixed
    overhead (patch embedding, merging, neck, head: the dense model minus its dense blocks)
    plus, per block, its measured time at that ratio on its real input. Each (block, ratio) is
    timed once, so a search can score thousands of candidates for free. A block here ranks its
    own windows, which in the model a stage (a run of SAM's windowed blocks) does once for all
    its blocks: the table slightly overestimates; check() reports how far it is from real
    timings. A SAM block that cannot prune (a dense global block) has only ratio 0.0."""

    def __init__(self, model: nn.Module, images: Tensor, choices: Sequence[float], repeats: int = 5, warmup: int = 1):
        from .patch import window_pruned_blocks

        self.choices = tuple(check.numbers(choices, "choices", "a sequence of ratios"))
        if not self.choices or any(not 0.0 <= c < 1.0 for c in self.choices):
            raise ValueError(f"choices must be non-empty ratios in [0, 1), got {choices!r}")
        self.model, self.images = model, images
        self.blocks = window_pruned_blocks(model)  # (a TypeError for any other model)
        saved = [blk.sparsity for blk in self.blocks]
        try:
            for blk in self.blocks:
                blk.sparsity = 0.0
            inputs = self._block_inputs()
            self.table: List[Dict[float, float]] = []
            for blk, x in zip(self.blocks, inputs):
                row = {}
                for ratio in (0.0,) + (self.choices if blk.prunable else ()):  # 0.0 first: the dense block, for the overhead
                    if ratio not in row:
                        blk.sparsity = ratio
                        row[ratio] = _median_seconds(lambda: blk(x), x.device, repeats, warmup)
                blk.sparsity = 0.0
                self.table.append(row)
            whole = _median_seconds(lambda: model(images), images.device, repeats, warmup)
            self.overhead = max(whole - sum(row[0.0] for row in self.table), 0.0)
            self.table = [{ratio: row[ratio] for ratio in self.choices} if blk.prunable else row
                          for blk, row in zip(self.blocks, self.table)]
        finally:
            for blk, s in zip(self.blocks, saved):
                blk.sparsity = s

    def _block_inputs(self) -> List[Tensor]:
        """What each block receives in one forward of the model as it is set."""
        inputs = {}
        hooks = [blk.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].clone()))
                 for i, blk in enumerate(self.blocks)]
        try:
            with torch.no_grad():
                self.model(self.images)
        finally:
            for hook in hooks:
                hook.remove()
        return [inputs[i] for i in range(len(self.blocks))]

    def __call__(self, config: Sequence[float]) -> float:
        """Predicted seconds of the model at per-block ratios `config`."""
        if len(config) != len(self.table):
            raise ValueError(f"config must have one ratio per block ({len(self.table)}), got {len(config)}")
        try:
            return self.overhead + sum(row[float(r)] for row, r in zip(self.table, config))
        except KeyError as missing:
            raise ValueError(f"config has ratio {missing} that is not among the table's choices {self.choices}") from None

    def check(self, configs: Sequence[Sequence[float]], repeats: int = 5) -> List[float]:
        """Relative error |predicted - measured| / measured of each config, measured on the
        whole model."""
        errors = []
        for config in configs:
            real = measure_latency(self.model, self.images, repeats=repeats, ratios=list(config))
            errors.append(abs(self(config) - real) / real)
        return errors


# ------------------------------------------------------------------------------- search
@dataclass(frozen=True)
class Candidate:
    """One evaluated configuration, and the iteration that first evaluated it."""

    config: Config
    accuracy: float
    latency: float
    iteration: int


@dataclass(frozen=True)
class SearchResult:
    """best: the final population, most accurate first. history: every evaluated candidate
    in evaluation order."""

    best: List[Candidate]
    history: List[Candidate]


def _check_space(space) -> List[Tuple[float, ...]]:
    """space: a non-empty sequence (list, tuple, 2-D numpy array or tensor, ...) of per-position
    choices, each a non-empty sequence of numbers."""
    what = "a non-empty sequence of per-position choice lists"
    rows = space.tolist() if getattr(space, "ndim", None) == 2 else space
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise TypeError(f"space must be {what}, got {space!r}")
    out = [tuple(check.numbers(choices, f"space[{i}]", "a sequence of numbers")) for i, choices in enumerate(rows)]
    empty = next((i for i, choices in enumerate(out) if not choices), None)
    if empty is not None:
        raise ValueError(f"space[{empty}] must be a non-empty sequence of choices, got none")
    return out


class _Search:
    """The state of one evolutionary search (what the history file holds)."""

    def __init__(self, space, accuracy_fn, latency_fn, latency_range, constraint, max_tries):
        self.space, self.accuracy_fn, self.latency_fn = space, accuracy_fn, latency_fn
        self.low, self.high = latency_range
        self.constraint, self.max_tries = constraint, max_tries
        self.history: List[Candidate] = []
        self.evaluated: Dict[Config, Candidate] = {}
        self.latencies: Dict[Config, float] = {}

    def repair(self, config) -> Config:
        config = tuple(float(c) for c in (self.constraint(list(config)) if self.constraint else config))
        if len(config) != len(self.space) or any(c not in ch for c, ch in zip(config, self.space)):
            raise ValueError(f"constraint must return a config within the space, got {config}")
        return config

    def within_budget(self, config: Config) -> bool:
        if config not in self.latencies:
            self.latencies[config] = float(self.latency_fn(config))
        return self.low <= self.latencies[config] <= self.high

    def draw(self, make: Callable[[], Sequence[float]], taken: set) -> Optional[Config]:
        """A repaired config from make() within the budget and not in taken, or None after
        max_tries; raises if no try at all met the budget."""
        any_in_budget = False
        for _ in range(self.max_tries):
            config = self.repair(make())
            if self.within_budget(config):
                any_in_budget = True
                if config not in taken:
                    return config
        if not any_in_budget:
            raise RuntimeError(f"no candidate with latency in [{self.low}, {self.high}] found in "
                               f"{self.max_tries} tries; widen latency_range or the space")
        return None

    def evaluate(self, config: Config, iteration: int) -> Candidate:
        if config not in self.evaluated:
            candidate = Candidate(config, float(self.accuracy_fn(config)), self.latencies[config], iteration)
            self.evaluated[config] = candidate
            self.history.append(candidate)
        return self.evaluated[config]


def evolutionary_search(space: Sequence[Sequence[float]], accuracy_fn: Callable[[Config], float],
                        latency_fn: Callable[[Config], float], latency_range: Tuple[float, float] = (0.0, math.inf),
                        population: int = 50, parents: int = 10, mutation_prob: float = 0.1,
                        crossover: int = 20, mutations: int = 20, iterations: int = 20, seed: int = 0,
                        history_path: Optional[str] = None, progress: bool = True,
                        constraint: Optional[Callable[[List[float]], Sequence[float]]] = None,
                        max_tries: int = 1000) -> SearchResult:
    """Evolutionary search (OFA / SparseViT): a random first population; then per iteration
    the `parents` most accurate of the population breed `mutations` children (each position
    redrawn with probability mutation_prob) and `crossover` children (each position from one
    of two parents), and parents + children are the next population. Every candidate is
    repaired by constraint(config) -> config (e.g. sort ratios within each Swin stage), must
    have latency_fn(config) in latency_range (re-drawn up to max_tries times, RuntimeError if
    none can be found) and is evaluated by accuracy_fn once (cached by config tuple).

    history_path: a JSON file written after each iteration; if it exists the search resumes
    from it (same result as an uninterrupted run with the same arguments). Deterministic
    under seed. Returns the final population (most accurate first) and the full history."""
    space = _check_space(space)
    low, high = latency_range
    if not low <= high:
        raise ValueError(f"latency_range must be (min, max) with min <= max, got {latency_range!r}")
    for name, value, least in (("population", population, 1), ("parents", parents, 1), ("crossover", crossover, 0),
                               ("mutations", mutations, 0), ("iterations", iterations, 1), ("max_tries", max_tries, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if parents > population:
        raise ValueError(f"parents ({parents}) must be <= population ({population})")
    if not 0.0 <= mutation_prob <= 1.0:
        raise ValueError(f"mutation_prob must be in [0, 1], got {mutation_prob}")
    settings = dict(space=[list(c) for c in space], latency_range=[low, high], population=population,
                    parents=parents, mutation_prob=mutation_prob, crossover=crossover, mutations=mutations, seed=seed)

    search = _Search(space, accuracy_fn, latency_fn, (low, high), constraint, max_tries)
    rng = random.Random(seed)
    current: List[Config] = []
    start = 0
    if history_path is not None and os.path.exists(history_path):
        start, current = _load(history_path, settings, search, rng)

    for iteration in tqdm(range(start, iterations), desc="search", disable=not progress, initial=start, total=iterations):
        if iteration == 0:
            current = []
            while len(current) < population:
                config = search.draw(lambda: [rng.choice(ch) for ch in space], set(current))
                if config is None:
                    break
                current.append(config)
        else:
            ranked = sorted((search.evaluated[c] for c in current), key=lambda c: -c.accuracy)
            elite = [c.config for c in ranked[:parents]]
            taken = set(search.evaluated) | set(elite)
            children = []
            for count, breed in ((mutations, lambda: _mutate(rng.choice(elite), space, mutation_prob, rng)),
                                 (crossover, lambda: _crossover(rng.choice(elite), rng.choice(elite), rng))):
                for _ in range(count):
                    child = search.draw(breed, taken)
                    if child is not None:
                        taken.add(child)
                        children.append(child)
            current = elite + children
        for config in current:
            search.within_budget(config)
            search.evaluate(config, iteration)
        if history_path is not None:
            _save(history_path, settings, search, rng, iteration + 1, current)

    best = sorted((search.evaluated[c] for c in current), key=lambda c: -c.accuracy)
    return SearchResult(best=best, history=list(search.history))


def _mutate(parent: Config, space, prob: float, rng: random.Random) -> List[float]:
    return [rng.choice(ch) if rng.random() < prob else value for value, ch in zip(parent, space)]


def _crossover(first: Config, second: Config, rng: random.Random) -> List[float]:
    return [a if rng.random() < 0.5 else b for a, b in zip(first, second)]


def _save(path: str, settings: dict, search: _Search, rng: random.Random, next_iteration: int, current) -> None:
    version, state, gauss = rng.getstate()
    data = dict(settings=settings, next_iteration=next_iteration, population=[list(c) for c in current],
                history=[dict(asdict(c), config=list(c.config)) for c in search.history],
                latencies=[[list(c), t] for c, t in search.latencies.items()],
                rng_state=[version, list(state), gauss])
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)  # never leave a half-written file behind


def _load(path: str, settings: dict, search: _Search, rng: random.Random):
    with open(path) as f:
        data = json.load(f)
    if data["settings"] != json.loads(json.dumps(settings)):
        raise ValueError(f"history_path {path} holds a search with other settings: {data['settings']}")
    for entry in data["history"]:
        candidate = Candidate(tuple(entry["config"]), entry["accuracy"], entry["latency"], entry["iteration"])
        search.history.append(candidate)
        search.evaluated[candidate.config] = candidate
    search.latencies.update((tuple(c), t) for c, t in data["latencies"])
    version, state, gauss = data["rng_state"]
    rng.setstate((version, tuple(state), gauss))
    return data["next_iteration"], [tuple(c) for c in data["population"]]


def sorted_within_stages(depths: Sequence[int]) -> Callable[[List[float]], List[float]]:
    """A constraint for evolutionary_search over per-block Swin ratios: sort each stage's
    ratios non-decreasing (a stage's blocks keep nested window sets)."""
    def repair(config: List[float]) -> List[float]:
        out, start = [], 0
        for depth in depths:
            out += sorted(config[start:start + depth])
            start += depth
        return out
    return repair
