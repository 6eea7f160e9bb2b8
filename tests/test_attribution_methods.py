"""Occlusion, Captum-backed methods, guided backprop/deconvolution on PReLU, LRP, registry and views."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum.attr import Deconvolution, DeepLift, GuidedBackprop, IntegratedGradients, Occlusion, Saliency
from torch import nn

from gestalt_xai.attribution import available_methods, get_method
from gestalt_xai.attribution.captum_methods import _deeplift_prelu
from gestalt_xai.attribution.lrp import lrp
from gestalt_xai.attribution.occlusion import occlusion, occlusion_baseline, window_starts
from gestalt_xai.attribution.postprocess import apply_view
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.attribution.targets import CentroidTarget, LogitTarget
from gestalt_xai.errors import ConfigError
from gestalt_xai.models import build_gestaltmatcher


def _prelu_slopes(model: nn.Module, value: float | None = None, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.PReLU):
            m.weight.data.copy_(torch.full(m.weight.shape, value) if value is not None
                                else torch.rand(m.weight.shape, generator=g) * 0.3 + 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _prelu_slopes(build_gestaltmatcher("r18", width=0.125, num_classes=3))


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


def test_window_convention():
    starts = window_starts(112, 10, 5)
    assert len(starts) == 22 and starts[-1] == 105  # ceil((112-10)/5)+1; the last window is cropped
    assert window_starts(112, 14, 10)[-1] == 100  # 100 + 14 > 112: cropped at the border
    with pytest.raises(ConfigError, match="must not exceed the patch"):  # pixels between windows: 0/0
        window_starts(112, 10, 11)


@pytest.mark.parametrize("baseline", ["black", "blur"])
def test_occlusion_equals_captum(tiny, x, baseline):
    # a 14-pixel window at stride 10 keeps the test fast and still crops the last window (100 + 14 > 112);
    # the default 10/5 grid is the same code path (window_starts is checked above)
    sm = ScoreModel([("m", tiny)], CentroidTarget(torch.randn(2, 512, generator=torch.Generator().manual_seed(2))))
    ours = occlusion(sm, x, patch=14, stride=10, baseline=baseline, max_batch=24)
    base = occlusion_baseline(x, baseline)
    ref = Occlusion(sm).attribute(x, sliding_window_shapes=(3, 14, 14), strides=(3, 10, 10),
                                  baselines=-1.0 if baseline == "black" else base)
    assert torch.allclose(ref[:, 0], ref[:, 2])  # all channels occluded together
    assert (ours - ref[:, 0]).abs().max() <= 1e-5
    # the registered method (BN-folded, channels-last inference copy) gives the same maps
    fast = get_method("occlusion")(patch=14, stride=10, baseline=baseline, max_batch=24)
    assert (fast.attribute(sm, x, ["occlusion"], [])[0].maps - ref[:, 0]).abs().max() <= 1e-5


def test_integrated_gradients_equals_captum(tiny, x):
    sm = ScoreModel([("m", tiny)], LogitTarget([0, 2]))
    ours = get_method("integrated_gradients")(steps=8).attribute(sm, x, ["integrated_gradients"], [])[0]
    # Captum expands the batch (steps × images), so a per-image target is explained one image at a time
    ref = torch.cat([IntegratedGradients(ScoreModel([("m", tiny)], LogitTarget(c))).attribute(
        x[i: i + 1], baselines=-1.0, n_steps=8, method="gausslegendre") for i, c in enumerate([0, 2])]).sum(1)
    torch.testing.assert_close(ours.maps, ref.float(), rtol=1e-5, atol=1e-7)
    assert "convergence_delta_max" in ours.params


def test_smoothgrad_is_seeded_and_finite(tiny, x):
    sm = ScoreModel([("m", tiny)], LogitTarget(1))
    meth = get_method("smoothgrad")(samples=3)
    a = meth.attribute(sm, x, ["smoothgrad"], [])[0].maps
    b = meth.attribute(sm, x, ["smoothgrad"], [])[0].maps
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all() and (a >= 0).all()


def test_guided_backprop_treats_prelu(tiny, x):
    """Captum falls back to the plain gradient on PReLU; ours must not (and must equal Captum on a ReLU net)."""
    sm = ScoreModel([("m", tiny)], LogitTarget(0))
    plain = Saliency(sm).attribute(x, abs=False).sum(1)
    captum_gb = GuidedBackprop(sm).attribute(x).sum(1)
    torch.testing.assert_close(captum_gb, plain)  # the library fallback this test guards against
    ours = get_method("guided_backprop")().attribute(sm, x, ["guided_backprop", "deconvolution"], [])
    gb, dc = ours[0].maps, ours[1].maps
    assert (gb - plain).abs().max() > 1e-3 * plain.abs().max()
    assert (dc - plain).abs().max() > 1e-3 * plain.abs().max()

    # with slopes 0 a PReLU is a ReLU: ours on the PReLU net equals Captum's on the same net with nn.ReLU
    zero = _prelu_slopes(copy.deepcopy(tiny), 0.0)
    relu = copy.deepcopy(zero)
    for _name, m in list(relu.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.PReLU):
                setattr(m, child_name, nn.ReLU())
    sm0, smr = ScoreModel([("m", zero)], LogitTarget(0)), ScoreModel([("m", relu)], LogitTarget(0))
    ours0 = get_method("guided_backprop")().attribute(sm0, x, ["guided_backprop", "deconvolution"], [])
    torch.testing.assert_close(ours0[0].maps, GuidedBackprop(smr).attribute(x).sum(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours0[1].maps, Deconvolution(smr).attribute(x).sum(1), rtol=1e-5, atol=1e-7)


def test_deeplift_rescale_on_prelu_is_complete(tiny, x):
    """With the PReLU rule DeepLIFT's attributions sum to s(x) − s(baseline) (logit target: no norm involved)."""
    sm = ScoreModel([("m", tiny)], LogitTarget(1))
    with _deeplift_prelu():
        _, delta = DeepLift(sm).attribute(x, baselines=-1.0, return_convergence_delta=True)
    _, delta_without = DeepLift(sm).attribute(x, baselines=-1.0, return_convergence_delta=True)
    assert delta.abs().max() < 1e-3 * sm(x).abs().max()
    assert delta_without.abs().max() > 10 * delta.abs().max()
    maps = get_method("deeplift")().attribute(sm, x, ["deeplift"], [])[0].maps
    assert maps.shape == (2, 112, 112)


def test_lrp_conserves_relevance_and_restores_model(x):
    torch.manual_seed(0)
    model = _prelu_slopes(build_gestaltmatcher("r18", width=0.125, num_classes=3))
    nn.init.zeros_(model.backbone.fc.bias)  # all effective biases zero (fresh BN stats): LRP is conservative
    before = {k: v.clone() for k, v in model.state_dict().items()}
    residuals = [b.residual for _, b in model.backbone.blocks()]
    sm = ScoreModel([("m", model)], CentroidTarget(torch.randn(512, generator=torch.Generator().manual_seed(3))))
    rel = lrp(sm, x)
    with torch.no_grad():
        s = sm(x)
    torch.testing.assert_close(rel.sum((1, 2, 3)), s, rtol=1e-3, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [b.residual for _, b in model.backbone.blocks()] == residuals
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    maps = get_method("lrp")(bn_rule="pass").attribute(sm, x, ["lrp"], [])[0].maps
    assert maps.shape == (2, 112, 112) and torch.isfinite(maps).all()


def test_lrp_on_fused_layout_with_logit_target(tiny, x):
    from gestalt_xai.models import fuse_iresnet

    fused = copy.deepcopy(tiny)
    fused.backbone = fuse_iresnet(tiny.backbone).eval()
    sm = ScoreModel([("m", fused)], LogitTarget(1))
    rel = lrp(sm, x, composite="epsilon_plus_flat")
    assert torch.isfinite(rel).all() and rel.abs().sum() > 0


def test_registry():
    names = set(available_methods())
    assert {"gradcam", "hirescam", "fullgrad", "saliency", "input_x_gradient", "occlusion", "integrated_gradients",
            "smoothgrad", "deeplift", "guided_backprop", "deconvolution", "lrp"} <= names
    assert get_method("gradcam") is get_method("fullgrad")  # one shared pass
    with pytest.raises(ConfigError, match="unknown attribution method"):
        get_method("nope")


def test_views_are_pure_and_named():
    m = np.array([[[-2.0, 1.0], [0.5, 0.0]]])
    assert apply_view(m, "relu").min() == 0 and apply_view(m, "abs").max() == 2
    np.testing.assert_allclose(apply_view(m, "max-abs"), m / 2)
    assert apply_view(m, "min-max").min() == 0
    t = torch.tensor(m)
    torch.testing.assert_close(apply_view(t, "clip:50"), torch.tensor(apply_view(m, "clip:50")))
    assert m[0, 0, 0] == -2.0  # input untouched
    with pytest.raises(ValueError, match="unknown map view"):
        apply_view(m, "sqrt")


def test_occlusion_skips_windows_that_change_nothing(tiny):
    """On an aligned crop's black border a black patch changes no pixel: difference exactly 0, no forward needed."""
    x = torch.full((1, 3, 112, 112), -1.0)
    x[:, :, 30:80, 30:80] = torch.rand(1, 3, 50, 50, generator=torch.Generator().manual_seed(0))
    sm = ScoreModel([("m", tiny)], LogitTarget(0))
    calls = []

    def counting(t):
        calls.append(t.shape[0])
        return sm(t)

    maps = occlusion(counting, x, patch=14, stride=10, baseline="black", max_batch=1)
    assert sum(calls) - 1 < 11 * 11  # the unoccluded score plus only windows touching the face
    assert maps[0, 0, 0] == 0 and maps[0, 50, 50] != 0
