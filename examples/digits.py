"""Train a small ViT and a small Swin on scikit-learn's digits (shipped with the package, no
download), once dense-only and once dense/sparse, then compare accuracy and measured speed at
several sparsities and let the evolutionary search pick a Swin configuration under a latency
budget. Runs on the CPU in a few minutes:

    python examples/digits.py                # the README table (writes digits.md beside --out)
    python examples/digits.py --quick        # a smoke run in seconds with one thread (used by the tests)

Digits are 8x8 grey images of 0-9; upscaled to 32x32 RGB their blank borders become tokens and
windows that pruning can skip.
"""
import argparse
import datetime
import platform
import time

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import sparse_ops
from sparse_ops import patch
from sparse_ops.nn import SparseVisionTransformer
from sparse_ops.search import LatencyTable, evolutionary_search, measure_latency, sorted_within_stages
from sparse_ops.train import dense_sparse_step, sample_keep_rate, sample_swin_ratios

VIT_KEEP_RATES = (1.0, 0.7, 0.5, 0.3)
SWIN_RATIOS = (0.0, 0.3, 0.5, 0.7)
SWIN_CHOICES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def digits(size: int):
    """(train, val, test) splits of (images [N, 3, size, size], labels [N]), fixed by a seed."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, val, train = order[:500], order[500:700], order[700:]
    return [(images[i], labels[i]) for i in (train, val, test)]


def make_vit():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=6,
                              num_heads=4, num_classes=10, drop_path_rate=0.1)
    return patch.vit(model, prune_layers=(2, 4))  # 65 tokens; prune before blocks 2 and 4


def make_swin():
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
                              embed_dim=32, depths=(2, 4, 2), num_heads=(2, 4, 8), num_classes=10,
                              drop_path_rate=0.1)
    return patch.swin(model)  # stages of 16x16, 8x8, 4x4 tokens: 16, 4, 1 windows of 4x4


def train(model, data, epochs: int, dense_sparse: bool, seed: int, batch: int = 64):
    """AdamW with a cosine schedule. dense_sparse: every step runs the model dense and at a
    random sparsity (ViT: keep rate uniform in [0.3, 1]; Swin: per-block ratios from
    SWIN_CHOICES), the sparse logits distilled towards the dense ones."""
    images, labels = data
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(labels) + batch - 1) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    # 0.1 of 10 steps is exactly one step, where torch's OneCycleLR divides by zero
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps,
                                                   pct_start=0.15 if steps == 10 else 0.1)
    is_vit = isinstance(model, SparseVisionTransformer)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(labels), batch):
            idx = order[start:start + batch]
            x, y = images[idx], labels[idx]
            if dense_sparse:
                options = (dict(keep_rate=sample_keep_rate(low=0.3, high=1.0, generator=gen)) if is_vit
                           else dict(ratios=sample_swin_ratios(model, SWIN_CHOICES, gen)))
                dense_sparse_step(model, x, y, options, optimizer=optimizer)
            else:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            schedule.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, data, **sparsity) -> float:
    images, labels = data
    sparse_ops.set_sparsity(model, **sparsity)
    correct = sum((model(images[i:i + 256]).argmax(-1) == labels[i:i + 256]).sum().item()
                  for i in range(0, len(labels), 256))
    return correct / len(labels)


def sparsity_rows(name, models, test, speed_batch, repeats, rounds):
    """One table row per sparsity: accuracy of each training and the measured speed-up. The
    settings are timed in turn, `rounds` times, and each keeps its fastest median: on a busy
    machine a slow spell then hits no setting more than the others."""
    is_vit = name == "ViT"
    settings = [dict(keep_rate=k) for k in VIT_KEEP_RATES] if is_vit else [dict(ratios=r) for r in SWIN_RATIOS]
    model = models["dense/sparse"]
    seconds = [min(times) for times in zip(*[[measure_latency(model, speed_batch, repeats=repeats, **setting)
                                               for setting in settings] for _ in range(rounds)])]
    rows = []
    for setting, time_s in zip(settings, seconds):  # the first setting is dense: the baseline
        label = f"keep rate {setting['keep_rate']}" if is_vit else f"window ratio {setting['ratios']}"
        accs = {kind: accuracy(m, test, **setting) for kind, m in models.items()}
        rows.append(f"| {name} | {label} | {100 * accs['dense-only']:.1f} % | {100 * accs['dense/sparse']:.1f} % "
                    f"| {1e3 * time_s:.1f} ms | {seconds[0] / time_s:.2f}x |")
    sparse_ops.set_sparsity(model, **settings[0])
    return rows


def search_swin(model, val, test, speed_batch, budget: float, quick: bool, repeats: int):
    """SparseViT's search: per-block ratios under `budget` x the dense latency (at least
    halfway to the fastest configuration), scored by validation accuracy, latency from a
    per-block table (checked against real timings)."""
    depths = [len(stage.blocks) for stage in model.layers]
    table = LatencyTable(model, speed_batch, SWIN_CHOICES, repeats=repeats)
    dense, fastest = table([0.0] * sum(depths)), table([max(SWIN_CHOICES)] * sum(depths))
    # a budget that only the fastest configurations meet is rarely drawn: at least the middle
    limit = max(budget * dense, (dense + fastest) / 2)
    result = evolutionary_search(
        [SWIN_CHOICES] * sum(depths), lambda config: accuracy(model, val, ratios=list(config)), table,
        latency_range=(0.0, limit), population=4 if quick else 20, parents=2 if quick else 5,
        mutations=2 if quick else 8, crossover=2 if quick else 8, mutation_prob=0.2,
        iterations=1 if quick else 8, seed=0, constraint=sorted_within_stages(depths), progress=False)
    best = list(result.best[0].config)
    error = table.check([best], repeats=repeats)[0]
    measured = measure_latency(model, speed_batch, repeats=repeats, ratios=best)
    dense_measured = measure_latency(model, speed_batch, repeats=repeats, ratios=0.0)
    return dict(config=best, limit=limit / dense, evaluated=len(result.history),
                test=accuracy(model, test, ratios=best), uniform=_uniform_at(model, test, best),
                speedup=dense_measured / measured, table_error=error)


def _uniform_at(model, test, config):
    """Test accuracy with one ratio for every block (SparseViT's uniform baseline): the
    config's mean ratio, rounded to a choice."""
    ratio = min(SWIN_CHOICES, key=lambda c: abs(c - sum(config) / len(config)))
    return ratio, accuracy(model, test, ratios=ratio)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true",
                        help="one epoch on 128 images, one timing per setting, a 4-configuration search: a smoke run")
    parser.add_argument("--budget", type=float, default=0.7, help="search latency budget, a fraction of dense")
    parser.add_argument("--out", default=None, help="also write the markdown report to this file")
    parser.add_argument("--speed-batch", type=int, default=None,
                        help="images per timed batch (at most the test split; default 256, --quick: 16)")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    train_set, val, test = digits(32)
    epochs, repeats, rounds = (1, 1, 1) if args.quick else (args.epochs, 10, 3)
    if args.quick:
        train_set, val, test = [(x[:n], y[:n]) for (x, y), n in zip((train_set, val, test), (128, 64, 64))]
    speed_batch = test[0][:args.speed_batch or (16 if args.quick else 256)]

    lines = [f"Dense-only vs dense/sparse training ({epochs} epochs, {len(train_set[1])} training images), "
             f"test accuracy on {len(test[1])} images; speed of the dense/sparse model on a batch of "
             f"{len(speed_batch)} (median of {repeats}, best of {rounds} interleaved rounds).", "",
             "| model | sparsity | acc. dense-only | acc. dense/sparse | latency | speed-up |",
             "|---|---|---|---|---|---|"]
    trained = {}
    for name, make in (("ViT", make_vit), ("Swin", make_swin)):
        models = {}
        for kind in ("dense-only", "dense/sparse"):
            torch.manual_seed(0)  # same initial weights for both trainings
            t0 = time.perf_counter()
            models[kind] = train(make(), train_set, epochs, kind == "dense/sparse", seed=1)
            print(f"{name} {kind}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        lines += sparsity_rows(name, models, test, speed_batch, repeats, rounds)
        trained[name] = models["dense/sparse"]

    found = search_swin(trained["Swin"], val, test, speed_batch, args.budget, args.quick, repeats)
    ratio, uniform_acc = found["uniform"]
    lines += ["", f"Search (Swin, dense/sparse weights, latency budget {found['limit']:.0%} of dense, "
              f"{found['evaluated']} configurations evaluated on {len(val[1])} validation images): "
              f"per-block ratios {found['config']}, measured speed-up {found['speedup']:.2f}x, test accuracy "
              f"{100 * found['test']:.1f} % (one ratio {ratio} for every block: {100 * uniform_acc:.1f} %); "
              f"latency table off by {100 * found['table_error']:.0f} % from the measured time.", "",
              f"`python examples/digits.py{' --quick' if args.quick else ''}"
              f"{f' --speed-batch {args.speed_batch}' if args.speed_batch else ''}`, "
              f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}, "
              f"{time.perf_counter() - start:.0f} s in all."]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
