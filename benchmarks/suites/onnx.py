"""onnx: deployment in ONNX Runtime on the CPU: the pruned model exported by
torch.onnx.export(dynamo=True) (sparse_ops.patch at a fixed keep rate / window ratios: its
gathers, scatters and top-k become standard ONNX ops) against the dense timm model exported the
same way, both run by onnxruntime's CPU provider on one batch of images. DeiT-S at 224 by keep
rate (pruning at blocks 3, 6, 9) and Swin-T at 224 with a window sparsity in every block and
SparseViT's per-block ratios (--quick: the tiny test models). The ideal is the FLOP ratio, as in
the models suite. CPU only; skipped where onnx, onnxscript or onnxruntime is missing.
Speedups are over dense; sparsity is the fraction of the model's FLOPs pruned."""
import functools
import importlib.util

import torch

from .. import baselines, flops
from ..core import Case, Config, Setup, Unavailable, pick
from .models import SPARSEVIT_SWIN_T

NAME = "onnx"
MEMORY_BOUND = False
X_LABEL = "fraction of FLOPs pruned"


def _session(net, images: torch.Tensor):
    """A zero-argument callable running net, exported to ONNX, in onnxruntime on images."""
    import onnxruntime

    program = torch.onnx.export(net, (images,), dynamo=True, verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the run's thread count, as torch's methods
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images.numpy()}
    return lambda: session.run(None, feed)


def _methods(net, patched, images: torch.Tensor) -> dict:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        reason = Unavailable(f"{', '.join(missing)} not installed")
        return {"dense": reason, "ours": reason}
    ours = patched if isinstance(patched, Unavailable) else _session(patched, images)
    return {"dense": _session(net, images), "ours": ours}


def _vit(cfg: Config, model: str, batch: int, keep_rate: float) -> Setup:
    net = baselines.model(model, "cpu", torch.float32, None)
    images = torch.randn(batch, 3, *net.patch_embed.img_size)
    layers = baselines.prune_layers(len(net.blocks))
    with torch.no_grad():
        counts = []  # [prune layer][image]: the same count in every image at a fixed keep rate
        baselines.evit_forward(net, images, keep_rate=keep_rate, layers=layers, counts=counts)
    N = net.patch_embed.num_patches + net.num_prefix_tokens
    schedules = [flops.evit_schedule(N, len(net.blocks), layers, [c[b] for c in counts], net.num_prefix_tokens)
                 for b in range(batch)]
    dense, sparse = flops.vit(net, batch), flops.vit(net, batch, schedules)
    patched = baselines.patched("vit", net, keep_rate=keep_rate, prune_layers=layers, package=False)
    return Setup(_methods(net, patched, images), flops=(dense, sparse), sparsity=1 - sparse / dense)


def _swin(cfg: Config, model: str, batch: int, ratios) -> Setup:
    net = baselines.model(model, "cpu", torch.float32, None)
    images = torch.randn(batch, 3, *net.patch_embed.img_size)
    blocks = sum(len(stage.blocks) for stage in net.layers)
    ratios = [ratios] * blocks if isinstance(ratios, float) else list(ratios)
    kept = baselines.swin_kept_windows(net, ratios)
    dense, sparse = flops.swin(net, batch), flops.swin(net, batch, kept)
    patched = baselines.patched("swin", net, ratios=ratios)
    return Setup(_methods(net, patched, images), flops=(dense, sparse), sparsity=1 - sparse / dense)


def cases(cfg: Config):
    if cfg.device != "cpu" or cfg.dtype != torch.float32:  # onnxruntime's CPU provider, float32 exports
        return
    vit, swin = pick(cfg, quick=("vit_test", "swin_test"), cpu=("deit_small", "swin_tiny"), cuda=(None, None))
    batch = pick(cfg, quick=2, cpu=1, cuda=None)
    for r in pick(cfg, quick=(0.5,), cpu=(0.7, 0.5), cuda=()):
        yield Case(NAME, f"{NAME}/{vit}/b{batch}/keep{r}", f"{vit} b{batch} onnxruntime",
                   dict(model=vit, batch=batch, keep_rate=r), functools.partial(_vit, cfg, vit, batch, r))
    configs = pick(cfg, quick=[("s0.5", 0.5)], cpu=[("s0.5", 0.5), ("sparsevit", SPARSEVIT_SWIN_T)], cuda=[])
    for label, ratios in configs:
        if label == "sparsevit" and swin != "swin_tiny":
            continue
        yield Case(NAME, f"{NAME}/{swin}/b{batch}/{label}", f"{swin} b{batch} onnxruntime",
                   dict(model=swin, batch=batch, ratios=ratios), functools.partial(_swin, cfg, swin, batch, ratios))
