"""A pruned SAM-style windowed plain ViT (timm's VisionTransformerSAM: SAM's image encoder,
ViTDet's backbone) as a segmentation backbone, on the digits canvases of digits_seg.py:
scikit-learn's digits (shipped with the package, no download) pasted onto a black 64x64
canvas, one to three per image, each pixel labelled with its digit (class + 1) where it has
ink and 0 elsewhere. Most windows are empty, so most are what window pruning skips. A small
encoder (patch 4, 16x16 tokens, windows of 4x4 tokens in blocks 0-1 and 3-4, global attention
in blocks 2 and 5, decomposed relative position) built with features_only and patched by
sparse_ops.patch.sam feeds a light head; it is trained dense-only and dense/sparse (digits_seg's
training loop: random per-block ratios each step, which here kept more mIoU under pruning than
a fixed ratio of 0.5), then compared on mIoU, pixel accuracy and the backbone's measured speed
at several window ratios (of the windowed blocks; the global ones run dense). Runs on the CPU
in minutes:

    python examples/digits_sam.py            # the README table
    python examples/digits_sam.py --quick    # a smoke run in seconds with one thread (used by the tests)
"""
import time

import timm
import torch
from torch import nn

from digits_seg import (CANVAS, NUM_CLASSES, RATIOS, arguments, datasets, empty_windows, results_table, scores, train,
                        write_report)
from sparse_ops import patch
from sparse_ops.search import measure_latency

PATCH = 4
# 16x16 tokens: windows of 4x4 tokens (16 per image) in blocks 0-1 and 3-4, global attention in 2 and 5
SAM = dict(img_size=CANVAS, patch_size=PATCH, embed_dim=32, depth=6, num_heads=2, window_size=4,
           global_attn_indexes=(2, 5), use_rel_pos=True, neck_chans=32, drop_path_rate=0.1)
BATCH = 8  # in as much time, converged further than digits_seg's 16


class Segmenter(nn.Module):
    """A features_only SAM encoder (NCHW maps of blocks 2 and 5, the global ones, at stride 4)
    and a head: the maps concatenated, a 1x1 conv and GELU, a 1x1 conv to the logits of each
    token's 4x4 pixels, pixel-shuffled to the input size."""

    def __init__(self, width: int = 64):
        super().__init__()
        sam = timm.create_model("samvit_base_patch16", features_only=True, out_indices=SAM["global_attn_indexes"],
                                **SAM)
        self.backbone = patch.sam(sam)
        self.head = nn.Sequential(nn.Conv2d(sum(sam.feature_info.channels()), width, 1), nn.GELU(),
                                  nn.Conv2d(width, NUM_CLASSES * PATCH ** 2, 1), nn.PixelShuffle(PATCH))

    def forward(self, images):
        return self.head(torch.cat(self.backbone(encoder_input(images)), 1))


def encoder_input(images):
    """digits_seg's pixels are in [-1, 1], background -1; the encoder's in [0, 1], background 0,
    so that ink makes a window's activation norm (what window pruning ranks by) larger, not
    smaller: on [-1, 1] the first blocks kept empty windows first."""
    return (images + 1) / 2


def latencies(backbone, speed_batch, repeats: int, rounds: int):
    """Median forward seconds of the backbone (no gradients) at each of RATIOS, timed in turn
    `rounds` times, each keeping its fastest median: a slow spell of a busy machine hits no
    ratio more than the others."""
    seconds = [[measure_latency(backbone, speed_batch, repeats=repeats, ratios=r) for r in RATIOS]
               for _ in range(rounds)]
    return [min(times) for times in zip(*seconds)]


def main():
    args, (epochs, train_count, test_count, repeats, rounds) = arguments(__doc__, epochs=12)
    torch.manual_seed(0)
    start = time.perf_counter()
    train_set, test = datasets(train_count, test_count)
    speed_batch = encoder_input(test[0][:16 if args.quick else 64])

    models = {}
    for kind in ("dense-only", "dense/sparse"):
        torch.manual_seed(0)  # same initial weights for both trainings
        t0 = time.perf_counter()
        models[kind] = train(Segmenter(), train_set, epochs, kind == "dense/sparse", seed=3, batch=BATCH)
        print(f"{kind}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    results = {kind: [scores(m, test, r) for r in RATIOS] for kind, m in models.items()}
    seconds = latencies(models["dense/sparse"].backbone, speed_batch, repeats, rounds)

    lines = [f"Dense-only vs dense/sparse training ({epochs} epochs of batches of {BATCH}, {train_count} training "
             f"canvases of {CANVAS}x{CANVAS} with 1-3 digits) of a SAM-style encoder, mIoU (11 classes: background and ten "
             f"digits) and pixel accuracy on {test_count} test canvases of unseen digits "
             f"({100 * empty_windows(test[0]):.0f} % of the windows are empty); forward latency of the dense/sparse "
             f"model's backbone on a batch of {len(speed_batch)} (median of {repeats}, best of {rounds} interleaved "
             f"rounds).", "",
             *results_table(results, seconds, "backbone latency")]
    write_report(lines, "digits_sam.py", args, start)


if __name__ == "__main__":
    main()
