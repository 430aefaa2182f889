"""torch.compile across densities: changing keep_rate / mass / ratios of a compiled patched model
recompiles once per new density and reuses the graphs of densities seen before. A density is
never a graph input: a float module attribute that changes became a symbolic float after one
recompile, and with several prune layers that recompile never finished (sympy)."""
import pytest
import timm
import torch

import sparse_ops
from sparse_ops import patch


class CountingBackend:
    """A torch.compile backend that runs the graphs as traced and keeps, per graph, its float
    inputs (Python or symbolic floats, 0-dim floating tensors: a density that went symbolic)."""

    def __init__(self):
        self.float_inputs = []

    def __call__(self, gm, example_inputs):
        self.float_inputs.append([i for i in example_inputs if isinstance(i, (float, torch.SymFloat)) or (
            isinstance(i, torch.Tensor) and i.dim() == 0 and i.is_floating_point())])
        return gm.forward

    @property
    def graphs(self) -> int:
        return len(self.float_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _vit(**sparsity):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=32,
                              num_heads=2, num_classes=10).eval()
    return patch.vit(model, prune_layers=(1, 2), **sparsity)


def _run(model, backend, densities, images, **options):
    """model compiled with backend, per density (set_sparsity arguments) its output checked
    against eager -> the graph count after each."""
    compiled, counts = torch.compile(model, backend=backend, **options), []
    for density, x in zip(densities, images):
        sparse_ops.set_sparsity(model, **density)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        counts.append(backend.graphs)
    return counts


@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
def test_keep_rate_recompiles_once_per_density(dynamic):
    torch.manual_seed(0)
    model, backend = _vit(keep_rate=0.7), CountingBackend()
    rates = [0.7, 0.5, 0.6, 0.7, 0.5] if dynamic is None else [0.7, 0.5, 0.7]
    counts = _run(model, backend, [dict(keep_rate=r) for r in rates], [torch.randn(2, 3, 32, 32)] * len(rates),
                  dynamic=dynamic)
    assert counts == ([1, 2, 3, 3, 3] if dynamic is None else [1, 2, 2])
    if dynamic is None:  # (dynamic=True makes every float symbolic: LayerNorm's eps, the scale)
        assert not any(backend.float_inputs), backend.float_inputs


def test_mass_compiles_once_for_any_image_count():
    """Mass mode: per-image counts depend on the data, and the graph breaks where they become
    Python ints (TokenIndex.from_mask), but new images (other counts) reuse the graphs; a new
    mass recompiles the pieces once (after a break the mass may be a symbolic float input of
    a resumed frame: that recompile finishes)."""
    torch.manual_seed(0)
    model, backend = _vit(mass=0.7), CountingBackend()
    images = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    counts = _run(model, backend, [dict(mass=0.7)] * 3 + [dict(mass=0.5)], images)
    assert counts[0] == counts[1] == counts[2] < counts[3]


def test_swin_ratios_recompile_once_per_density():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=32,
                              depths=(2, 2), num_heads=(2, 4), num_classes=10).eval()
    patch.swin(model, ratios=0.25)
    ratios = [0.25, [0.5, 0.0], 0.25, [0.5, 0.0]]
    assert _run(model, CountingBackend(), [dict(ratios=r) for r in ratios], [torch.randn(2, 3, 64, 64)] * 4) == [1, 2, 2, 2]


def test_sam_ratios_recompile_once_per_density():
    from timm.models.vision_transformer_sam import VisionTransformerSAM
    torch.manual_seed(0)
    model = VisionTransformerSAM(img_size=48, patch_size=8, embed_dim=32, depth=3, num_heads=2, window_size=4,
                                 global_attn_indexes=(2,), use_rel_pos=True, neck_chans=16, num_classes=10).eval()
    patch.sam(model, ratios=0.25)  # a 6x6 map in padded windows of 4
    ratios = [0.25, [0.5, 0.0, 0.0], 0.25, [0.5, 0.0, 0.0]]
    assert _run(model, CountingBackend(), [dict(ratios=r) for r in ratios], [torch.randn(2, 3, 48, 48)] * 4) == [1, 2, 2, 2]
