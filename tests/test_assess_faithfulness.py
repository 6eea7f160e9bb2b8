"""Deletion / insertion curves, region perturbation and AOPC (gestalt_xai.assess.faithfulness).

The toy model is a real ScoreModel over a member whose logit is a known affine function of the pixels,
``f(x) = Σ w ⊙ x + c``; its true attribution for a baseline ``b`` is ``R = Σ_channels w ⊙ (x − b)``: deleting a unit
lowers f by exactly its R, so deletion by R gives the lowest possible curve at every step.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from gestalt_xai.assess.faithfulness import (
    RANDOM,
    abpc,
    aopc_morf,
    baseline_images,
    deletion_order,
    perturbation_curves,
)
from gestalt_xai.assess.metric import METRICS
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.attribution.targets import CentroidTarget, LogitTarget
from gestalt_xai.errors import ConfigError
from gestalt_xai.models.gestaltmatcher import preprocess

H = W = 112


class AffineFace(nn.Module):
    """``(logits, embedding)`` with the one logit ``Σ w ⊙ x + c``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(3, H, W, generator=g) / (3 * H * W) ** 0.5, requires_grad=False)
        self.bias = nn.Parameter(torch.tensor(0.25), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = (x * self.weight).sum((1, 2, 3)) + self.bias
        return z[:, None], z[:, None]


def crops(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def toy():
    model = AffineFace().eval()
    score = ScoreModel([("affine", model)], LogitTarget(0))
    images = crops(4)
    x = preprocess(images)
    base = baseline_images(x, "blur")
    true = (model.weight * (x - base)).sum(1).double().numpy()
    rng = np.random.default_rng(5)
    maps = {"true": true, "noise": rng.standard_normal(true.shape), "negated": -true}
    with torch.no_grad():
        f_x, f_b = score(x).double().numpy(), score(base).double().numpy()
    return model, score, images, maps, f_x, f_b


def test_deletion_by_true_attribution_is_the_optimal_curve(toy):
    _, score, images, maps, f_x, f_b = toy
    c = perturbation_curves(score, images, maps, baseline="blur", steps=16)
    assert c.methods == ("true", "noise", "negated", RANDOM)
    np.testing.assert_allclose(c.fractions, np.arange(17) / 16)
    # the true curve is f(x) minus the largest relevances summed: computed here without the engine
    r = np.sort(maps["true"].reshape(4, -1), axis=1)[:, ::-1]
    removed = np.concatenate([np.zeros((4, 1)), np.cumsum(r, 1)[:, np.arange(1, 17) * 784 - 1]], 1)
    np.testing.assert_allclose(c.scores[0], f_x[:, None] - removed, atol=2e-4)
    np.testing.assert_allclose(c.scores[:, :, 0], np.broadcast_to(f_x, (4, 4)), atol=1e-5)
    np.testing.assert_allclose(c.scores[:, :, -1], np.broadcast_to(f_b, (4, 4)), atol=1e-5)
    assert (c.scores[0] <= c.scores[1:] + 1e-4).all()  # no order removes more score at any step
    aucs = c.aucs().pivot(index="item", columns="method", values="auc")
    assert (aucs["true"] < aucs[RANDOM]).all() and (aucs["true"] < aucs["negated"]).all()
    aopc = c.aucs().pivot(index="item", columns="method", values="aopc")
    assert (aopc[["noise", "negated", RANDOM]].lt(aopc["true"], axis=0)).all().all()  # MoRF AOPC ranks it first
    np.testing.assert_allclose(aopc.loc[:, "true"], aopc_morf(c.scores[0]))


def test_insertion_mirrors_deletion_for_a_linear_score(toy):
    _, score, images, maps, f_x, f_b = toy
    kw = dict(baseline="blur", steps=16, seed=3)
    d = perturbation_curves(score, images, maps, mode="deletion", **kw)
    i = perturbation_curves(score, images, maps, mode="insertion", **kw)
    # x_k(insertion) + x_k(deletion) = x + b for every pixel, so f adds up to f(x) + f(b) at every step
    np.testing.assert_allclose(i.scores + d.scores, np.broadcast_to((f_x + f_b)[:, None], d.scores.shape), atol=2e-4)
    assert (i.aucs()["aopc"].isna()).all()
    ins = i.aucs().pivot(index="item", columns="method", values="auc")
    assert (ins["true"] > ins[RANDOM]).all()


def test_region_perturbation_morf_lerf_and_abpc(toy):
    _, score, images, maps, _, _ = toy
    kw = dict(unit="regions", region_size=8, baseline="blur", steps=14)
    morf = perturbation_curves(score, images, maps, order="morf", **kw)
    lerf = perturbation_curves(score, images, maps, order="lerf", **kw)
    assert morf.unit == "regions" and set(morf.table()["order"]) == {"morf"}
    a_morf = morf.aucs().pivot(index="item", columns="method", values="aopc")
    a_lerf = lerf.aucs().pivot(index="item", columns="method", values="aopc")
    assert (a_morf.drop(columns="true").lt(a_morf["true"], axis=0)).all().all()
    assert (a_lerf.drop(columns="true").gt(a_lerf["true"], axis=0)).all().all()  # LeRF: lower is better
    gap = abpc(morf.scores, lerf.scores)
    assert (gap[0] > gap[1:]).all()
    # region order: summed relevance, so the true map's region curve is the region-optimal one
    assert (morf.scores[0] <= morf.scores[1:] + 1e-4).all()
    # LeRF deletion keeps the most relevant regions of x: the MoRF insertion images, read backwards
    ins = perturbation_curves(score, images, maps, mode="insertion", **kw)
    np.testing.assert_allclose(lerf.scores, ins.scores[..., ::-1], atol=1e-6)


def test_one_forward_per_distinct_image(toy):
    model, score, images, maps, _, _ = toy
    seen: list[str] = []
    hook = model.register_forward_hook(
        lambda mod, args, out: seen.extend(hashlib.sha1(t.numpy().tobytes()).hexdigest() for t in args[0]))
    try:
        c = perturbation_curves(score, images[:2], {k: v[:2] for k, v in maps.items()}, steps=8, batch_size=7,
                                baseline="blur", fast=False)  # (a black baseline is one image for every item)
    finally:
        hook.remove()
    n_curves, n_items, n_points = 4, 2, 9
    assert len(seen) == c.n_scored == n_items * (2 + n_curves * (n_points - 2))
    assert len(set(seen)) == len(seen)  # no image is scored twice: x and the baseline are shared by every method
    assert len(seen) / (n_items * n_curves * n_points) <= 1.0


def test_same_seed_same_bytes_and_ties_broken_by_the_seed(toy):
    _, score, images, maps, _, _ = toy
    kw = dict(steps=4, random_maps=2)
    a, b = (perturbation_curves(score, images[:2], {"true": maps["true"][:2]}, seed=7, **kw) for _ in range(2))
    assert a.table().to_csv().encode() == b.table().to_csv().encode() and a.scores.tobytes() == b.scores.tobytes()
    c = perturbation_curves(score, images[:2], {"true": maps["true"][:2]}, seed=8, **kw)
    assert not np.array_equal(a.scores[1], c.scores[1]) and np.array_equal(a.scores[0], c.scores[0])
    flat = np.zeros((1, 4, 4))
    orders = {tuple(deletion_order(flat, seed=s)[0]) for s in range(5)}
    assert len(orders) > 1 and orders == {tuple(deletion_order(flat, seed=s)[0]) for s in range(5)}
    np.testing.assert_array_equal(np.sort(deletion_order(flat, seed=0)[0]), np.arange(16))


def test_baselines_and_bad_options(toy):
    _, score, images, maps, _, _ = toy
    x = preprocess(images[:1])
    face = np.full((H, W, 3), 127.5, np.float32)
    assert float(baseline_images(x, "black").max()) == -1.0
    assert float(baseline_images(x, "mean", mean_face=face).abs().max()) == 0.0
    with pytest.raises(ConfigError, match="mean_face"):
        baseline_images(x, "mean")
    with pytest.raises(ConfigError, match="divide"):
        perturbation_curves(score, images, maps, unit="regions", region_size=10)
    with pytest.raises(ConfigError, match="random"):
        perturbation_curves(score, images, {RANDOM: maps["true"]})
    assert {"deletion_auc", "insertion_auc", "aopc_morf", "aopc_lerf", "abpc"} <= set(METRICS.names())


class ClassScores(nn.Module):
    """Quantus wants class scores ``(B, C)``: the explained score is "class" 0. It gets each image as one channel
    ``(3·H, W)`` (the channel planes stacked, the same flat order), because it requires ``features_in_step`` to
    divide H·W while a whole-pixel step is a multiple of 3 features; this module reshapes them back."""

    def __init__(self, score: ScoreModel) -> None:
        super().__init__()
        self.score = score

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x.reshape(len(x), 3, H, W))[:, None]


@pytest.mark.filterwarnings("ignore:`trapz` is deprecated:DeprecationWarning")  # inside Quantus
def test_pixel_flipping_matches_quantus():
    """Quantus 0.6 PixelFlipping with matched conventions (faithfulness module docstring) on a small iResNet."""
    quantus = pytest.importorskip("quantus")
    from gestalt_xai.models import build_gestaltmatcher

    torch.manual_seed(0)
    model = build_gestaltmatcher("r18", width=0.125, num_classes=3).eval()
    refs = torch.randn(3, 512, generator=torch.Generator().manual_seed(4))
    score = ScoreModel([("m", model)], CentroidTarget(refs))  # one reference per row: rows must stay aligned
    images, steps = crops(3, seed=2), 4
    rng = np.random.default_rng(3)
    maps = np.stack([rng.permutation(H * W).reshape(H, W) for _ in range(3)]).astype(np.float32) - H * W / 2
    assert all(len(np.unique(m)) == H * W for m in maps)  # no ties: Quantus orders ties arbitrarily
    ours = perturbation_curves(score, images, {"m": maps}, steps=steps, random_maps=0)  # fast copies
    x = preprocess(images).numpy()
    per_step = 3 * H * W // steps

    def pixel_flipping(**kw):  # noqa: ANN003, ANN202
        metric = quantus.PixelFlipping(features_in_step=per_step, normalise=False, abs=False, disable_warnings=True,
                                       perturb_baseline=np.full((3, per_step), -1.0, np.float32), **kw)
        return np.asarray(metric(model=ClassScores(score).eval(), x_batch=x.reshape(3, 1, 3 * H, W),
                                 y_batch=np.zeros(3, int), a_batch=np.tile(maps[:, None], (1, 1, 3, 1)),
                                 softmax=False, channel_first=True, batch_size=3, device="cpu"))

    np.testing.assert_allclose(ours.scores[0, :, 1:], pixel_flipping(), atol=1e-5, rtol=0)
    s = ours.scores[0]
    expected = (pixel_flipping(return_auc_per_sample=True) + (s[:, 0] + s[:, 1]) / 2) / steps
    np.testing.assert_allclose(ours.aucs()["auc"], expected, atol=1e-5, rtol=0)


def test_occlusion_agreement_per_item_and_method():
    from gestalt_xai.assess.compare import spearman, ssim
    from gestalt_xai.assess.faithfulness import occlusion_agreement

    rng = np.random.default_rng(0)
    occ = rng.normal(size=(3, 16, 16))
    other = rng.normal(size=(3, 16, 16))
    maps = {"monotone": np.exp(occ), "negated": -occ, "other": other, "occlusion": occ}
    table = occlusion_agreement(maps, occ)
    assert list(table.columns) == ["item", "method", "spearman", "ssim"]
    assert set(table["method"]) == {"monotone", "negated", "other"}  # occlusion is not compared with itself
    by = table.set_index(["method", "item"])
    np.testing.assert_allclose(by.loc["monotone", "spearman"], 1.0)
    np.testing.assert_allclose(by.loc["negated", "spearman"], -1.0)
    for i in range(3):  # per item, the one implementation of assess.compare
        assert by.loc[("other", i), "spearman"] == pytest.approx(spearman(other[i], occ[i]))
        assert by.loc[("other", i), "ssim"] == pytest.approx(ssim(other[i], occ[i]))
    assert occlusion_agreement({"occlusion": occ}, occ).empty
