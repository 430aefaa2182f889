"""A patched model saves at any time: torch.save / torch.load, pickle, copy.deepcopy and
load_state_dict round-trip every patched family (ViT, distilled DeiT, EVA, Swin, Swin V2, the
features_only backbones of ViT and Swin) in train and eval mode, before any forward and after
forwards that fill the blocks' inference caches (no_grad, inference_mode); the
copy computes what the original does, and no cache is part of what is saved."""
import copy
import io
import pickle

import pytest
import timm
import torch

from sparse_ops import patch
from test_eva import make as make_eva
from test_patch import VIT, make_swin, make_vit
from test_swinv2 import make_swinv2


def make_deit_distilled():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **VIT)


SWIN = dict(img_size=56, depths=(2, 2), num_heads=(1, 2))
# family -> (make a patched tiny model, input size)
FAMILIES = {
    "vit": (lambda: patch.vit(make_vit(), keep_rate=0.5), (32, 32)),
    "deit-distilled": (lambda: patch.vit(make_deit_distilled(), keep_rate=0.5), (32, 32)),
    "eva": (lambda: patch.vit(make_eva("eva02-avg"), keep_rate=0.5, prune_layers=(1, 3)), (32, 32)),
    "swin": (lambda: patch.swin(make_swin(**SWIN), ratios=0.5), (56, 56)),
    "swinv2": (lambda: patch.swin(make_swinv2(img_size=32), ratios=0.5), (32, 32)),
    "swin-features": (lambda: patch.swin(make_swin(**SWIN, features_only=True, out_indices=(0, 1)), ratios=0.5),
                      (56, 56)),
    "vit-features": (lambda: patch.vit(make_vit(features_only=True, out_indices=(1, 3)), keep_rate=0.5), (32, 32)),
}


def saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {
    "torch.save": saved_and_loaded,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "deepcopy": copy.deepcopy,
}


def outputs(model, x):
    """model(x) as a list of tensors, with the same random draws (stochastic depth) each call."""
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(x)
    return list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else [out]


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def caches(model):
    return [m.__dict__["_inference_cache"] for m in model.modules() if "_inference_cache" in m.__dict__]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trips_before_and_after_forwards(family, mode):
    make, size = FAMILIES[family]
    model = make().train(mode == "train")
    x = torch.randn(2, 3, *size)
    filled = []
    for forward in ("none", torch.no_grad, torch.inference_mode):  # the last two fill the caches
        if forward != "none":
            with forward():
                model(x)
            filled.append(any(caches(model)))
        want = outputs(model, x)
        for name, round_trip in ROUND_TRIPS.items():
            copied = round_trip(model)
            assert copied.training == model.training, name
            assert not any(caches(copied)), f"{name} kept a cache"
            assert_same(outputs(copied, x), want)
    # the blocks that cache did: the round trips above had something to leave out
    assert filled == [family in ("eva", "swin", "swinv2", "swin-features")] * 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_state_dict_replaces_cached_values(family):
    """A used model (caches filled) that loads another's state dict computes the other's output."""
    make, size = FAMILIES[family]
    model, other = make(), make()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        model(x)
    with torch.no_grad():
        model(x)
    assert set(model.state_dict()) == set(other.state_dict())
    model.load_state_dict(other.state_dict())
    assert_same(outputs(model, x), outputs(other, x))

