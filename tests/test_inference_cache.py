"""A pruned Swin block keeps its relative-position bias (V2: also its qkv bias and head scale)
and a pruned EVA block its concatenated q/k/v projection between inference calls
(nn._common.inference_cached): it must follow every change of the parameters it is made from,
never be used where autograd records them, and never leak an inference-mode tensor into a call
that records a gradient."""
import pytest
import torch
from torch import nn

from sparse_ops import patch
from test_eva import EVAS, LAYERS, images as eva_images, make as make_eva
from test_patch import images, make_swin
from test_swinv2 import make_swinv2


def make(family: str):
    return make_swin(img_size=72) if family == "v1" else make_swinv2(img_size=32)


def sources(family: str, attn) -> list:
    """(module, name) of the parameters a pruned block's cached values are made from."""
    if family == "v1":
        return [(attn, "relative_position_bias_table")]
    return [(attn.cpb_mlp[0], "weight"), (attn.cpb_mlp[2], "weight"), (attn, "logit_scale"), (attn, "q_bias")]


def uncached(model, x):
    for module in model.modules():
        module.__dict__.pop("_inference_cache", None)
    return model(x)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_cached_values_follow_their_parameters(family):
    model = patch.swin(make(family), ratios=0.5)
    x = images(model)
    attn = model.layers[0].blocks[1].attn  # a shifted, pruned block
    with torch.no_grad():
        before = model(x)
        assert model.layers[0].blocks[1].__dict__["_inference_cache"]  # the values are kept
        for holder, name in sources(family, attn):
            param = getattr(holder, name)
            param.add_(torch.randn_like(param))  # in place: the version counter moves
            changed = model(x)
            assert not torch.allclose(changed, before)
            torch.testing.assert_close(changed, uncached(model, x), rtol=0, atol=0)
            for change in ("object", "memory"):  # another tensor; the same one on other memory
                if change == "object":
                    setattr(holder, name, nn.Parameter(torch.randn_like(param)))
                else:
                    getattr(holder, name).data = torch.randn_like(param)
                before, changed = changed, model(x)
                assert not torch.allclose(changed, before)
                torch.testing.assert_close(changed, uncached(model, x), rtol=0, atol=0)
            before = changed


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_gradients_reach_the_parameters_after_inference(family):
    model = patch.swin(make(family), ratios=0.5)
    x = images(model)
    with torch.no_grad():
        model(x)  # fills the cache
    model(x).sum().backward()
    for holder, name in sources(family, model.layers[0].blocks[1].attn):
        grad = getattr(holder, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_inference_mode_values_stay_in_inference_mode(family):
    """Frozen parameters (nothing to record for them) but an input that needs its gradient:
    a value cached in inference mode is an inference tensor, which autograd cannot save."""
    model = patch.swin(make(family), ratios=0.5).requires_grad_(False)
    x = images(model)
    with torch.inference_mode():
        expected = model(x)
    x.requires_grad_(True)
    out = model(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), expected)


@pytest.mark.parametrize("name", ["eva02-avg", "qknorm-token-unfused-scalenorms"])
def test_eva_qkv_projection_follows_its_parameters(name):
    """A pruned EvaBlock keeps its concatenated q/k/v bias (separate q, k, v Linears: also the
    stacked weight) between inference calls."""
    model = patch.vit(make_eva(name), keep_rate=0.5)
    x = eva_images(EVAS[name][1][0])
    block = model.blocks[LAYERS[0]]
    attn = block.attn
    changes = [(attn, "q_bias"), (attn, "v_bias")] if attn.qkv is not None else [
        (attn.q_proj, "weight"), (attn.k_proj, "weight"), (attn.v_proj, "bias")]
    with torch.no_grad():
        before = model.forward_features(x)  # the grid: this model's logits hardly depend on it
        assert block.__dict__["_inference_cache"]  # the values are kept
        for holder, pname in changes:
            getattr(holder, pname).add_(torch.randn_like(getattr(holder, pname)))
            changed = model.forward_features(x)
            assert not torch.allclose(changed, before)
            block.__dict__.pop("_inference_cache")
            torch.testing.assert_close(changed, model.forward_features(x), rtol=0, atol=0)
            before = changed
