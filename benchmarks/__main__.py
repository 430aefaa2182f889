"""Row-op bandwidth against a device-to-device copy (clone) of the same bytes, measured in
the same run: gather/scatter of rows, tokens and windows at ViT / Swin shapes.

    python -m benchmarks [--device cuda|cpu] [--dtype bfloat16|float16|float32] [--size small|large]
"""
import argparse
import datetime
import platform

import torch
import torch.utils.benchmark as torch_benchmark

import sparse_ops


def median_seconds(fn, device: str) -> float:
    if device == "cuda":
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(50):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]
    return torch_benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3).median


def cases(device: str, dtype: torch.dtype, size: str):
    """(name, shape, fn, bytes moved) for each op; 60 % of tokens / windows kept."""
    B, N, C = (64, 197, 768) if size == "large" else (8, 197, 384)
    x = torch.randn(B, N, C, device=device, dtype=dtype)
    idx = sparse_ops.select_tokens(torch.rand(B, N, device=device), keep_rate=0.6)
    T, e = idx.num_tokens, x.element_size()
    y = torch.randn(T, C, device=device, dtype=dtype)
    yield "gather_tokens", f"{B}x{N}x{C} keep {T}", lambda: sparse_ops.gather_tokens(x, idx), 2 * T * C * e + 8 * T
    # Out of place: a copy of base, then the kept rows.
    yield "scatter_tokens", f"{B}x{N}x{C} keep {T}", lambda: sparse_ops.scatter_tokens(y, idx, x), (2 * B * N + 2 * T) * C * e

    # Swin-T stage 0 at 672x672: 168x168 tokens of 96 channels, 7x7 windows.
    Bw, H, C = (4, 168, 96) if size == "large" else (1, 84, 96)
    xw = torch.randn(Bw, H, H, C, device=device, dtype=dtype)
    scores = sparse_ops.window_scores(xw, 7, 3)
    windows = sparse_ops.select_windows(scores, int(0.6 * scores.shape[1]))
    K = windows.shape[1]
    packed = sparse_ops.gather_windows(xw, windows, 7, 3)
    moved = Bw * K * 49 * C * e
    shape = f"{Bw}x{H}x{H}x{C} keep {K}/{scores.shape[1]}"
    yield "gather_windows", shape, lambda: sparse_ops.gather_windows(xw, windows, 7, 3), 2 * moved
    yield "scatter_windows", shape, lambda: sparse_ops.scatter_windows(packed, xw, windows, 7, 3), 2 * xw.numel() * e + 2 * moved
    yield "window_scores", shape, lambda: sparse_ops.window_scores(xw, 7, 3), xw.numel() * e


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--size", choices=["small", "large"], default=None, help="default: large on cuda")
    args = parser.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    size = args.size or ("large" if device == "cuda" else "small")
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()

    print(f"# sparse_ops row ops vs device copy — {name}, {dtype}, torch {torch.__version__}, "
          f"{datetime.date.today()}\n")
    print("| op | shape | time (us) | GB/s | % of copy |\n|---|---|---|---|---|")
    with sparse_ops.no_index_checks():  # time the kernels, not the Python-side index checks
        for op, shape, fn, nbytes in cases(device, dtype, size):
            # The ops return new tensors, so the copy allocates its output too (clone).
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
            copy_bw = nbytes / median_seconds(src.clone, device)
            t = median_seconds(fn, device)
            print(f"| {op} | {shape} | {t * 1e6:.1f} | {nbytes / t / 1e9:.1f} | {100 * nbytes / t / copy_bw:.0f} % |")


if __name__ == "__main__":
    main()
