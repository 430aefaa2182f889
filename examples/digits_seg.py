"""A pruned Swin as a segmentation backbone: scikit-learn's digits (shipped with the package, no
download) pasted onto a black 64x64 canvas, one to three per image, each pixel labelled with
its digit (class + 1) where the digit has ink and 0 elsewhere. Most of the canvas is empty, so
most windows are what window pruning skips. A small timm Swin (features_only, every stage)
patched by sparse_ops.patch.swin feeds a light FPN head; it is trained dense-only and
dense/sparse, then compared on mIoU, pixel accuracy and measured speed at several window
ratios. Runs on the CPU in minutes:

    python examples/digits_seg.py            # the README table
    python examples/digits_seg.py --quick    # a smoke run in seconds with one thread (used by the tests)
"""
import argparse
import datetime
import platform
import time

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import sparse_ops
from sparse_ops import patch
from sparse_ops.search import measure_latency
from sparse_ops.train import dense_sparse_step, sample_swin_ratios

CANVAS = 64
DIGIT = 16  # an 8x8 digit upscaled to 16x16 pixels
NUM_CLASSES = 11  # background and the ten digits
RATIOS = (0.0, 0.3, 0.5, 0.7)
# background is ~90 % of the pixels: weighted down, or the model long predicts nothing else
CLASS_WEIGHTS = torch.tensor([0.2] + [1.0] * 10)
CHOICES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def canvases(digits, labels, count: int, seed: int):
    """count images [count, 3, CANVAS, CANVAS] and per-pixel labels [count, CANVAS, CANVAS]:
    1-3 digits of `digits` at random places (a later one covers an earlier one where they
    overlap), ink = an upscaled intensity over a quarter of the maximum."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, CANVAS, CANVAS)
    target = torch.zeros(count, CANVAS, CANVAS, dtype=torch.long)
    for i in range(count):
        for d in torch.randint(len(labels), (int(torch.randint(1, 4, (), generator=gen)),), generator=gen).tolist():
            top, left = torch.randint(CANVAS - DIGIT + 1, (2,), generator=gen).tolist()
            ink = digits[d] > 0.25
            area = (slice(top, top + DIGIT), slice(left, left + DIGIT))
            images[i][area] = torch.where(ink, digits[d], images[i][area])
            target[i][area] = torch.where(ink, labels[d] + 1, target[i][area])
    return ((images - 0.5) / 0.5).unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), target


def datasets(train_count: int, test_count: int):
    """(train, test) canvases drawn from disjoint halves of the digits, fixed by seeds."""
    data = load_digits()
    digits = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    digits = F.interpolate(digits, size=(DIGIT, DIGIT), mode="bilinear", align_corners=False).squeeze(1)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[:600], order[600:]
    return (canvases(digits[train], labels[train], train_count, seed=1),
            canvases(digits[test], labels[test], test_count, seed=2))


class Segmenter(nn.Module):
    """A features_only Swin (NHWC maps at strides 4, 8, 16) and an FPN head: a 1x1 conv per
    stage to `width` channels, coarse to fine upsample-and-add, a small classifier on the
    stride-4 map, logits upsampled to the input size."""

    def __init__(self, width: int = 32):
        super().__init__()
        swin = timm.create_model("swin_tiny_patch4_window7_224", features_only=True, out_indices=(0, 1, 2),
                                 img_size=CANVAS, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2, 2),
                                 num_heads=(1, 2, 4), drop_path_rate=0.1)
        # stages of 16x16, 8x8, 4x4 tokens: 16, 4 and 1 windows of 4x4
        self.backbone = patch.swin(swin)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in swin.feature_info.channels())
        self.classifier = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                        nn.Conv2d(width, NUM_CLASSES, 1))

    def forward(self, images):
        features = [f.permute(0, 3, 1, 2) for f in self.backbone(images)]
        x = self.lateral[-1](features[-1])
        for lateral, feature in zip(self.lateral[-2::-1], features[-2::-1]):
            x = lateral(feature) + F.interpolate(x, size=feature.shape[-2:], mode="nearest")
        return F.interpolate(self.classifier(x), size=images.shape[-2:], mode="bilinear", align_corners=False)


def pixel_loss(logits, labels):
    return F.cross_entropy(logits, labels, weight=CLASS_WEIGHTS)


def train(model, data, epochs: int, dense_sparse: bool, seed: int, batch: int = 16, lr: float = 5e-3):
    """AdamW with a one-cycle schedule, per-pixel weighted cross-entropy. dense_sparse: every step runs
    the model dense and at random per-block ratios (from CHOICES), the sparse logits of every
    pixel distilled towards the dense ones."""
    images, labels = data
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(labels) + batch - 1) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    # 0.1 of 10 steps is exactly one step, where torch's OneCycleLR divides by zero
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.15 if steps == 10 else 0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(labels), batch):
            idx = order[start:start + batch]
            x, y = images[idx], labels[idx]
            if dense_sparse:
                options = dict(ratios=sample_swin_ratios(model.backbone, CHOICES, gen))
                dense_sparse_step(model, x, y, options, criterion=pixel_loss, optimizer=optimizer,
                                  backbone=model.backbone)
            else:
                loss = pixel_loss(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            schedule.step()
    model.eval()
    return model


@torch.no_grad()
def scores(model, data, ratio: float):
    """(mIoU over the classes present in labels or predictions, pixel accuracy) at one window
    ratio for every block."""
    images, labels = data
    sparse_ops.set_sparsity(model.backbone, ratios=ratio)
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)  # [label, prediction]
    for i in range(0, len(labels), 128):
        predicted = model(images[i:i + 128]).argmax(1)
        pairs = labels[i:i + 128].flatten() * NUM_CLASSES + predicted.flatten()
        confusion += torch.bincount(pairs, minlength=NUM_CLASSES ** 2).view(NUM_CLASSES, NUM_CLASSES)
    hits = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    present = union > 0
    return (hits[present] / union[present]).mean().item(), (hits.sum() / confusion.sum()).item()


def latencies(model, speed_batch, repeats: int, rounds: int):
    """Median forward seconds (no gradients) at each of RATIOS, timed in turn `rounds` times,
    each keeping its fastest median: a slow spell of a busy machine hits no ratio more than
    the others."""
    seconds = []
    for _ in range(rounds):
        times = []
        for ratio in RATIOS:
            sparse_ops.set_sparsity(model.backbone, ratios=ratio)
            times.append(measure_latency(model, speed_batch, repeats=repeats))
        seconds.append(times)
    return [min(times) for times in zip(*seconds)]


def empty_windows(images, pixels: int = 16) -> float:
    """The fraction of the first stage's (unshifted) windows, 4x4 tokens of 4x4 pixels, without
    any ink."""
    ink = images[:, 0] > -1  # background is exactly -1 after normalisation
    per_window = ink.view(len(images), CANVAS // pixels, pixels, CANVAS // pixels, pixels).any(4).any(2)
    return 1.0 - per_window.float().mean().item()


def arguments(description: str, epochs: int):
    """The command line of digits_seg.py and digits_sam.py -> (args, and the run's epochs,
    training and test canvases, timing repeats and rounds: --quick's or the full run's)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--quick", action="store_true",
                        help="two epochs on 32 canvases, one timing per ratio on a batch of 16: a smoke run")
    parser.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = parser.parse_args()
    return args, ((2, 32, 32, 1, 1) if args.quick else (args.epochs, args.train_images, 400, 10, 3))


def main():
    args, (epochs, train_count, test_count, repeats, rounds) = arguments(__doc__, epochs=16)
    torch.manual_seed(0)
    start = time.perf_counter()
    train_set, test = datasets(train_count, test_count)
    speed_batch = test[0][:16 if args.quick else 64]

    models = {}
    for kind in ("dense-only", "dense/sparse"):
        torch.manual_seed(0)  # same initial weights for both trainings
        t0 = time.perf_counter()
        models[kind] = train(Segmenter(), train_set, epochs, kind == "dense/sparse", seed=3)
        print(f"{kind}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    results = {kind: [scores(m, test, r) for r in RATIOS] for kind, m in models.items()}
    seconds = latencies(models["dense/sparse"], speed_batch, repeats, rounds)

    lines = [f"Dense-only vs dense/sparse training ({epochs} epochs, {train_count} training canvases of "
             f"{CANVAS}x{CANVAS} with 1-3 digits), mIoU (11 classes: background and ten digits) and pixel "
             f"accuracy on {test_count} test canvases of unseen digits ({100 * empty_windows(test[0]):.0f} % of "
             f"the first stage's windows are empty); forward latency of the dense/sparse model (backbone and "
             f"head) on a batch of {len(speed_batch)} (median of {repeats}, best of {rounds} interleaved rounds).", "",
             *results_table(results, seconds, "latency")]
    write_report(lines, "digits_seg.py", args, start)


def results_table(results: dict, seconds: list, latency: str) -> list:
    """The table of mIoU and pixel accuracy of both trainings and the speed per window ratio
    (the first ratio is dense: the baseline); latency names the latency column."""
    lines = ["| window ratio | mIoU dense-only | mIoU dense/sparse | pixel acc. dense-only | pixel acc. dense/sparse "
             f"| {latency} | speed-up |", "|---|---|---|---|---|---|---|"]
    for r, ratio in enumerate(RATIOS):
        (miou_d, acc_d), (miou_s, acc_s) = results["dense-only"][r], results["dense/sparse"][r]
        lines.append(f"| {ratio} | {100 * miou_d:.1f} % | {100 * miou_s:.1f} % | {100 * acc_d:.1f} % "
                     f"| {100 * acc_s:.1f} % | {1e3 * seconds[r]:.1f} ms | {seconds[0] / seconds[r]:.2f}x |")
    return lines


def write_report(lines: list, script: str, args, start: float) -> None:
    """Prints the report (lines and how it was run) and writes it to args.out where given."""
    threads = torch.get_num_threads()
    lines = lines + ["", f"`python examples/{script}{' --quick' if args.quick else ''}`, "
                         f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
                         f"{threads} thread{'s' if threads > 1 else ''}, torch {torch.__version__}, timm {timm.__version__}, "
                         f"{time.perf_counter() - start:.0f} s in all."]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
