"""The arguments users naturally pass to the model API (issue 18, item 4): ratios as a numpy
array, a tensor or any sequence of numbers; prune_layers as a range or any sequence of ints;
ratios that decrease within a Swin stage refused with the stage and block named."""
import numpy as np
import pytest
import timm
import torch

import sparse_ops
from sparse_ops import patch
from sparse_ops.attention import _dispatch
from sparse_ops.search import _check_space, sorted_within_stages
from sparse_ops.train import sample_keep_rate, sample_swin_ratios

PER_STAGE = [0.5, 0.0, 0.25, 0.75]
PER_BLOCK = [0.25, 0.5, 0.0, 0.0, 0.25, 0.5, 0.75, 0.75]


def make_swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=72, embed_dim=16,
                             depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7).eval()


def make_vit(depth=12):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=depth, num_heads=2).eval()


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """The plain-PyTorch attention path: these tests are about arguments, and the Triton
    interpreter would take a minute per model forward."""
    monkeypatch.setattr(_dispatch, "use_triton", lambda name, q: False)


def block_ratios(model):
    return [blk.sparsity for stage in model.layers for blk in stage.blocks]


def images(batch=1, size=72):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------ ratios
@pytest.mark.parametrize("form", ["list", "tuple", "numpy", "numpy-float32", "tensor", "tensor-float64"])
def test_swin_ratios_as_any_sequence_of_numbers(form):
    convert = {"list": list, "tuple": tuple, "numpy": np.array, "numpy-float32": lambda r: np.array(r, np.float32),
               "tensor": torch.tensor, "tensor-float64": lambda r: torch.tensor(r, dtype=torch.float64)}[form]
    expected_per_stage = [r for r in PER_STAGE for _ in range(2)]
    model = patch.swin(make_swin(), ratios=convert(PER_STAGE))
    assert block_ratios(model) == pytest.approx(expected_per_stage)
    sparse_ops.set_sparsity(model, ratios=convert(PER_BLOCK))
    assert block_ratios(model) == pytest.approx(PER_BLOCK)
    assert all(type(r) is float for r in block_ratios(model))


def test_swin_ratios_from_numpy_run_as_the_list():
    x = images()
    by_list = patch.swin(make_swin(), ratios=PER_BLOCK)
    by_array = patch.swin(make_swin(), ratios=np.array(PER_BLOCK))
    with torch.no_grad():
        torch.testing.assert_close(by_array(x), by_list(x), rtol=0, atol=0)


@pytest.mark.parametrize("single", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array(0.5), 1 / 2])
def test_one_ratio_as_any_number(single):
    model = patch.swin(make_swin(), ratios=single)
    assert block_ratios(model) == [0.5] * 8


def test_bad_ratios_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"one per stage \(4\) or one per block \(8\), got 3 values"):
        patch.swin(make_swin(), ratios=np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"ratios must be .* \(1-D\), got shape \[2, 4\]"):
        patch.swin(make_swin(), ratios=np.zeros((2, 4)))
    with pytest.raises(TypeError, match="ratios must be a float, one per stage .* got str"):
        patch.swin(make_swin(), ratios="0.5")
    with pytest.raises(TypeError, match="got an entry '0.5'"):
        patch.swin(make_swin(), ratios=["0.5"] * 4)
    with pytest.raises(TypeError, match="ratios must be"):
        patch.swin(make_swin(), ratios=True)
    with pytest.raises(ValueError, match=r"ratios must be in \[0, 1\) .* got nan"):
        patch.swin(make_swin(), ratios=[0.0, float("nan"), 0.0, 0.0])
    with pytest.raises(ValueError, match=r"ratios must be in \[0, 1\) .* got -0.5"):
        patch.swin(make_swin(), ratios=torch.tensor([0.0, -0.5, 0.0, 0.0]))


@pytest.mark.parametrize("stage, block", [(0, 1), (2, 1)])
def test_ratios_decreasing_within_a_stage_raise_naming_stage_and_block(stage, block):
    ratios = [0.0] * 8
    ratios[2 * stage] = 0.5  # the stage's first block prunes more than its second
    model = patch.swin(make_swin())
    with pytest.raises(ValueError, match=fr"ratios decrease within stage {stage}: block {block} has 0.0 after "
                                         fr"block {block - 1}'s 0.5"):
        sparse_ops.set_sparsity(model, ratios=ratios)
    assert block_ratios(model) == [0.0] * 8  # refused before any block changed
    with pytest.raises(ValueError, match=f"within stage {stage}"):
        patch.swin(make_swin(), ratios=np.array(ratios))
    sparse_ops.set_sparsity(model, ratios=sorted_within_stages([2, 2, 2, 2])(ratios))  # the documented repair
    # Decreasing across stages is fine: each stage ranks its own windows.
    sparse_ops.set_sparsity(model, ratios=[0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0])


# ------------------------------------------------------------------------ prune_layers
def test_prune_layers_as_a_range_or_any_sequence_of_ints():
    x = images(size=32)
    with torch.no_grad():
        expected = patch.vit(make_vit(), keep_rate=0.5, prune_layers=[3, 6, 9])(x)
        for layers in (range(3, 12, 3), (9, 6, 3), np.array([3, 6, 9]), torch.tensor([3, 6, 9]),
                       [np.int64(3), np.int32(6), 9]):
            model = patch.vit(make_vit(), keep_rate=0.5, prune_layers=layers)
            assert model.prune_layers == (3, 6, 9)
            assert all(type(i) is int for i in model.prune_layers)
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_bad_prune_layers():
    with pytest.raises(TypeError, match=r"prune_layers must be a sequence of ints, got an entry 3.0 \(float\)"):
        patch.vit(make_vit(4), keep_rate=0.5, prune_layers=[3.0])
    with pytest.raises(TypeError, match="prune_layers must be a sequence of ints, got int"):
        patch.vit(make_vit(4), keep_rate=0.5, prune_layers=3)
    with pytest.raises(TypeError, match="prune_layers must be a sequence of ints, got an entry True"):
        patch.vit(make_vit(4), keep_rate=0.5, prune_layers=[True])
    with pytest.raises(TypeError, match="prune_layers must be a sequence of ints, got set"):
        patch.vit(make_vit(4), keep_rate=0.5, prune_layers={1, 2})
    with pytest.raises(ValueError, match=r"prune_layers must be distinct block indices in \[1, 4\) .*, got \[1, 1\]"):
        patch.vit(make_vit(4), keep_rate=0.5, prune_layers=np.array([1, 1]))


# ------------------------------------------------------------ rates, training, search
def test_keep_rate_and_mass_as_numpy_numbers():
    model = patch.vit(make_vit(4), keep_rate=np.float32(0.5), prune_layers=[2])
    assert model.blocks[2].keep_rate == 0.5 and type(model.blocks[2].keep_rate) is float
    sparse_ops.set_sparsity(model, mass=np.float64(0.9))
    assert model.blocks[2].mass == pytest.approx(0.9)


def test_training_and_search_choices_as_arrays():
    swin = patch.swin(make_swin())
    gen = torch.Generator().manual_seed(0)
    ratios = sample_swin_ratios(swin, np.array([0.0, 0.25, 0.5]), gen)
    assert len(ratios) == 8 and set(ratios) <= {0.0, 0.25, 0.5}
    assert sample_keep_rate(torch.tensor([0.5, 0.75]), generator=gen) in (0.5, 0.75)
    space = [[0.0, 0.25], [0.0, 0.5]]
    assert _check_space(np.array(space)) == _check_space(space) == [(0.0, 0.25), (0.0, 0.5)]
    assert _check_space([np.array(c) for c in space]) == [(0.0, 0.25), (0.0, 0.5)]
    with pytest.raises(ValueError, match=r"space\[1\] must be a non-empty sequence of choices"):
        _check_space([[0.0], []])
    with pytest.raises(TypeError, match=r"space\[0\] must be a sequence of numbers, got float"):
        _check_space([0.0, 0.5])
