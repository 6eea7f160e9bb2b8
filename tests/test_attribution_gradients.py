"""Gradient family (one shared pass) against Captum and an independent FullGrad; completeness; targets; TTA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import (
    InputXGradient,
    LayerAttribution,
    LayerGradCam,
    LayerGradientXActivation,
    Saliency,
)
from model_helpers import randomise_model
from torch import nn

from gestalt_xai.attribution.gradients import bias_of, gradient_pass
from gestalt_xai.attribution.score_model import ScoreModel, apply_view
from gestalt_xai.attribution.targets import CentroidTarget, LogitTarget, PairTarget, linearised_cosine
from gestalt_xai.errors import ConfigError
from gestalt_xai.models import build_gestaltmatcher


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return randomise_model(build_gestaltmatcher("r18", width=0.25, num_classes=4, syndrome_ids=list("abcd")))


@pytest.fixture(scope="module")
def batch():
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


@pytest.fixture(scope="module")
def centroid_model(small_model):
    ref = torch.randn(2, 512, generator=torch.Generator().manual_seed(2))
    return ScoreModel([("m", small_model)], CentroidTarget(ref))


def _close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    scale = ref.abs().max().item()
    assert scale > 0
    assert (ours - ref).abs().max().item() <= rel * scale, ((ours - ref).abs().max().item(), scale)


@pytest.mark.parametrize("layer", ["backbone.layer4", "backbone.layer3"])
def test_gradcam_and_hirescam_equal_captum(small_model, centroid_model, batch, layer):
    gp = gradient_pass(centroid_model, batch, ["backbone.layer4", "backbone.layer3"])  # several layers at once
    module = small_model.get_submodule(layer)
    ref_gc = LayerGradCam(centroid_model, module).attribute(batch, relu_attributions=False)
    _close(gp.gradcam_lowres(layer), ref_gc[:, 0])
    up = LayerAttribution.interpolate(ref_gc, (112, 112), interpolate_mode="bilinear")[:, 0]
    _close(gp.gradcam(layer), up)
    assert (gp.gradcam(layer) < 0).any(), "Grad-CAM must stay signed (ReLU is only a view)"
    ref_hr = LayerGradientXActivation(centroid_model, module).attribute(batch).sum(1)
    _close(gp.hirescam_lowres(layer), ref_hr)
    assert gp.hirescam(layer).dtype == torch.float32 and gp.hirescam(layer).shape == (2, 112, 112)


def test_saliency_and_input_x_gradient_equal_captum(centroid_model, batch):
    gp = gradient_pass(centroid_model, batch, [])
    _close(gp.saliency(), Saliency(centroid_model).attribute(batch, abs=True).amax(1))
    _close(gp.input_x_gradient(), InputXGradient(centroid_model).attribute(batch).sum(1))


def test_hirescam_completeness_at_last_stage(small_model, centroid_model, batch):
    """Σ_ij HiResCAM(layer4) = s − s(A=0): the head after layer4 is affine in eval mode."""
    gp = gradient_pass(centroid_model, batch, ["backbone.layer4"])
    with torch.no_grad():
        _, f = small_model(batch)
        a4 = small_model.backbone.forward_features(batch)
        f0 = small_model.backbone.forward_head(torch.zeros_like(a4))
        r_hat = F.normalize(centroid_model.views[0].target.reference, dim=1)
        const = (r_hat * f0).sum(1) / f.norm(dim=1)  # the norm is held constant (linearised target)
    total = gp.hirescam_lowres("backbone.layer4").sum((1, 2))
    torch.testing.assert_close(total, gp.scores - const, rtol=1e-4, atol=1e-5)


def _independent_fullgrad(model: nn.Module, score_fn, x: torch.Tensor):
    """Straightforward FullGrad: full backward hooks collect ∂s/∂z for every biased module, then the official
    post-processing (|·|, per-sample min-max over the layer tensor, bilinear align_corners=True, channel sum)."""
    grads: list[tuple[nn.Module, torch.Tensor]] = []
    handles = []
    for m in model.modules():
        if (
            isinstance(m, nn.Conv2d | nn.Linear)
            and m.bias is not None
            or isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)
        ):
            handles.append(m.register_full_backward_hook(lambda mod, gi, go: grads.append((mod, go[0]))))
    x = x.clone().requires_grad_(True)
    try:
        s = score_fn(x)
        (gx,) = torch.autograd.grad(s.sum(), x)
    finally:
        for h in handles:
            h.remove()

    def eff_bias(m):
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            return m.bias - m.weight * m.running_mean / torch.sqrt(m.running_var + m.eps)
        return m.bias

    def post(t):
        t = t.abs()
        t = t - t.flatten(1).min(1).values.view(-1, *[1] * (t.ndim - 1))
        return t / (t.flatten(1).max(1).values.view(-1, *[1] * (t.ndim - 1)) + 1e-6)

    terms = [(g * eff_bias(m).detach().view(1, -1, *[1] * (g.ndim - 2))) for m, g in grads]
    completeness = (gx * x).flatten(1).sum(1) + sum(t.flatten(1).sum(1) for t in terms)
    cam = post(gx * x).sum(1)
    for t in terms:
        if t.ndim == 4:
            cam = cam + F.interpolate(post(t), size=(112, 112), mode="bilinear", align_corners=True).sum(1)
    return cam.detach(), completeness.detach(), s.detach()


def test_fullgrad_equals_independent_implementation_and_is_complete(small_model, centroid_model, batch):
    gp = gradient_pass(centroid_model, batch, [], fullgrad=True)
    ref_cam, ref_total, s = _independent_fullgrad(small_model, centroid_model, batch)
    _close(gp.fullgrad(), ref_cam)
    inp, terms = gp.fullgrad_terms()
    # every BN (2-D and 1-D) and the embedding Linear contribute a bias term
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in small_model.modules())
    assert len(terms) == n_bn + 1
    torch.testing.assert_close(inp + sum(terms.values()), gp.scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref_total, s, rtol=1e-4, atol=1e-4)


def test_fullgrad_completeness_logit_target_ensemble_with_tta(small_model, batch):
    torch.manual_seed(3)
    other = randomise_model(build_gestaltmatcher("r18", width=0.25, num_classes=4), seed=5)
    slots = [(False, False), (False, True), (True, False), (True, True)]
    sm = ScoreModel([("a", small_model), ("b", other)], LogitTarget([1, 2]), slots)
    gp = gradient_pass(sm, batch, ["backbone.layer4"], fullgrad=True)
    inp, terms = gp.fullgrad_terms()
    torch.testing.assert_close(inp + sum(terms.values()), gp.scores, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        manual = torch.stack(
            [
                m(apply_view(batch, f, g))[0][torch.arange(2), torch.tensor([1, 2])]
                for m in (small_model, other)
                for f, g in slots
            ]
        ).mean(0)
    torch.testing.assert_close(gp.scores, manual)


def test_hflip_view_is_flipped_back(small_model, batch):
    """A map computed in the flipped view equals the flipped map of the flipped image (consistent orientation)."""
    ref = torch.randn(512, generator=torch.Generator().manual_seed(4))
    flipped = gradient_pass(
        ScoreModel([("m", small_model)], CentroidTarget(ref), [(True, False)]),
        batch,
        ["backbone.layer4"],
        fullgrad=True,
    )
    plain = gradient_pass(
        ScoreModel([("m", small_model)], CentroidTarget(ref)), batch.flip(-1), ["backbone.layer4"], fullgrad=True
    )
    torch.testing.assert_close(flipped.hirescam(), plain.hirescam().flip(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(flipped.gradcam(), plain.gradcam().flip(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(flipped.fullgrad(), plain.fullgrad().flip(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(flipped.saliency(), plain.saliency().flip(-1), rtol=1e-4, atol=1e-7)


def test_linearised_cosine_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 16, generator=g, dtype=torch.float64)
    s = linearised_cosine(f, r)
    torch.testing.assert_close(s, F.cosine_similarity(f, r, dim=1))
    (grad,) = torch.autograd.grad(s.sum(), f)
    torch.testing.assert_close(grad, F.normalize(r, dim=1) / f.norm(dim=1, keepdim=True))
    exact = linearised_cosine(f, r, exact=True)
    torch.testing.assert_close(exact, s)
    (grad_exact,) = torch.autograd.grad(exact.sum(), f)
    torch.testing.assert_close((grad_exact * f).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    t = PairTarget(r[0].detach(), exact=True)
    assert t.describe() == {"kind": "pair", "cosine": "exact"}
    _, rel = t.output_relevance(None, f.detach())
    torch.testing.assert_close(rel.sum(1), t(None, f.detach()))


def test_logit_target_needs_classifier_and_members_are_skipped(batch):
    clf = build_gestaltmatcher("r18", width=0.125, num_classes=3).eval()
    emb_only = build_gestaltmatcher("r18", width=0.125).eval()
    sm = ScoreModel([("clf", clf), ("emb", emb_only)], LogitTarget(0))
    assert sm.used_model_ids == ["clf"] and "emb" in sm.skipped
    with pytest.raises(Exception, match="no member"):
        ScoreModel([("emb", emb_only)], LogitTarget(0))


def test_hooks_are_removed_even_on_error(small_model, batch):
    def count():
        return sum(len(m._forward_hooks) for m in small_model.modules())

    before = count()
    with pytest.raises(ConfigError, match="not found"):
        gradient_pass(ScoreModel([("m", small_model)], LogitTarget(0)), batch, ["backbone.nope"])
    gradient_pass(ScoreModel([("m", small_model)], LogitTarget(0)), batch, ["backbone.layer4"], fullgrad=True)
    assert count() == before


def test_bias_of_batchnorm_is_effective_bias():
    bn = randomise_model(nn.Sequential(nn.BatchNorm2d(4)))[0]
    x = torch.randn(1, 4, 3, 3)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(bn(x), x * scale.view(1, -1, 1, 1) + bias_of(bn).view(1, -1, 1, 1))
