"""Patch-local occlusion: recomputing only what a window changes gives the scores of full occluded forwards."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Occlusion as CaptumOcclusion
from model_helpers import randomise_model
from torch import nn

from gestalt_xai.attribution import get_method
from gestalt_xai.attribution.occlusion import inference_copy, occluded_scores, occlusion, window_boxes
from gestalt_xai.attribution.occlusion_local import (
    _units,
    axis_spans,
    choose_cut,
    local_window_scores,
    supports_local,
)
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.attribution.targets import CentroidTarget, LogitTarget
from gestalt_xai.models import build_gestaltmatcher


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(3)
    return randomise_model(build_gestaltmatcher("r18", width=0.125, num_classes=4), seed=3)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(4)).clamp(-1, 1)


def _every_extent(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """A subset in which every row extent and every column extent occurs (spans depend on one axis each)."""
    rows = sorted({(y0, y1) for y0, y1, _, _ in boxes})
    cols = sorted({(x0, x1) for _, _, x0, x1 in boxes})
    n = max(len(rows), len(cols))
    picked = {(*rows[i % len(rows)], *cols[i % len(cols)]) for i in range(n)}
    picked |= {(*rows[i % len(rows)], *cols[-1 - i % len(cols)]) for i in range(n)}
    return sorted(picked)


def _full_forward_scores(model: nn.Module, x: torch.Tensor, base: torch.Tensor, boxes, refs: torch.Tensor):
    """Cosines of the embeddings of occluded copies to unit ``refs``, one full forward per window."""
    out = []
    with torch.no_grad():
        for y0, y1, x0, x1 in boxes:
            occluded = x.clone()
            occluded[:, :, y0:y1, x0:x1] = base[:, :, y0:y1, x0:x1]
            emb = model(occluded)[1]
            out.append((refs * emb).sum(1) / emb.norm(dim=1))
    return torch.stack(out)


@pytest.mark.parametrize(("patch", "stride"), [(10, 5), (7, 3), (3, 2)])
def test_local_scores_equal_full_forwards_at_every_cut(tiny, images, patch, stride):
    """Every cut (0 = plain, up to all blocks local), border windows and both stride parities included."""
    base = torch.full_like(images, -1.0)
    base[:, 1] = 0.3  # a baseline that differs per channel
    boxes = _every_extent(window_boxes(112, 112, patch, stride))
    refs = torch.nn.functional.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(5)), dim=1)
    expected = _full_forward_scores(tiny, images, base, boxes, refs)

    def rows(logits, emb, k):
        return (refs.repeat(k, 1) * emb).sum(1) / emb.norm(dim=1)

    n_units = len(_units(tiny.backbone))
    for cut in [*range(n_units + 1), None]:
        got = local_window_scores(tiny, images, base, boxes, rows, max_batch=6, cut=cut, local_batch=10)
        assert (got - expected).abs().max() <= 1e-6, f"cut={cut}"


def test_local_scores_on_the_fused_channels_last_copy(tiny, images):
    """The path explain uses: BN folded into convolutions, channels-last tensors."""
    fast = inference_copy(tiny)
    base = torch.full_like(images, -1.0)
    boxes = _every_extent(window_boxes(112, 112, 10, 5))
    refs = torch.nn.functional.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(6)), dim=1)
    expected = _full_forward_scores(tiny, images, base, boxes, refs)
    got = local_window_scores(fast, images, base, boxes,
                              lambda logits, emb, k: (refs.repeat(k, 1) * emb).sum(1) / emb.norm(dim=1))
    assert (got - expected).abs().max() <= 1e-6


def test_local_occlusion_equals_captum_with_tta_and_an_ensemble(tiny, images):
    """Two members (one BGR), all four TTA slots, per-image references: each (member, view) term is recomputed
    locally on its own (flipped, gray, channel-swapped) view and the windows follow the flip."""
    torch.manual_seed(7)
    other = randomise_model(build_gestaltmatcher("r18", width=0.125, num_classes=4), seed=8)
    other.channel_order = "BGR"
    refs = torch.randn(2, 512, generator=torch.Generator().manual_seed(9))
    slots = [(False, False), (True, False), (False, True), (True, True)]
    sm = ScoreModel([("a", tiny), ("b", other)], CentroidTarget(refs), slots=slots)
    ref = CaptumOcclusion(sm).attribute(images, sliding_window_shapes=(3, 20, 20), strides=(3, 17, 17),
                                        baselines=-1.0)[:, 0]
    local = occlusion(sm, images, patch=20, stride=17, baseline="black", local=True)
    plain = occlusion(sm, images, patch=20, stride=17, baseline="black", local=False)
    assert (local - ref).abs().max() <= 1e-5
    assert (plain - ref).abs().max() <= 1e-5
    assert ref.abs().max() > 1e-3  # the maps are not trivially zero


class _PlainNet(nn.Module):
    """A member that is no iResNet: occlusion falls back to full forwards for its terms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.fc = nn.Linear(4 * 27 * 27, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.tanh(self.conv(x)).flatten(1)
        return self.fc(emb), emb


def test_members_without_local_support_fall_back(tiny, images):
    torch.manual_seed(10)
    plain_net = _PlainNet().eval()
    assert not supports_local(plain_net) and supports_local(tiny)
    refs = torch.nn.functional.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(12)), dim=1)
    targets = {("a", (False, False)): CentroidTarget(refs), ("p", (False, False)): LogitTarget([1, 2])}
    sm = ScoreModel([("a", tiny), ("p", plain_net)], targets)
    ref = CaptumOcclusion(sm).attribute(images, sliding_window_shapes=(3, 12, 12), strides=(3, 12, 12),
                                        baselines=-1.0)[:, 0]
    assert (occlusion(sm, images, patch=12, stride=12) - ref).abs().max() <= 1e-5


def test_registered_method_records_local_and_matches_plain(tiny, images):
    sm = ScoreModel([("a", tiny)], LogitTarget([0, 3]))
    local = get_method("occlusion")(patch=10, stride=10).attribute(sm, images, ["occlusion"], [])[0]
    plain = get_method("occlusion")(patch=10, stride=10, local=False).attribute(sm, images, ["occlusion"], [])[0]
    assert local.params["local"] is True and plain.params["local"] is False
    torch.testing.assert_close(local.maps, plain.maps, rtol=1e-5, atol=1e-6)


def test_occluded_scores_of_a_plain_callable_follow_rows():
    """A callable with ``select`` (per-image targets) is scored on window-major copies of the batch."""

    class PerImage:
        def __init__(self, w: torch.Tensor) -> None:
            self.w = w

        def __call__(self, t: torch.Tensor) -> torch.Tensor:
            return t.sum((1, 2, 3)) * self.w

        def select(self, rows):
            return PerImage(self.w[list(rows)])

    x = torch.zeros(2, 3, 8, 8)
    base = torch.ones_like(x)
    scores = occluded_scores(PerImage(torch.tensor([1.0, 10.0])), x, base, [(0, 2, 0, 2), (0, 8, 0, 8)], max_batch=2)
    assert scores.tolist() == [[12.0, 120.0], [192.0, 1920.0]]


def test_cut_choice_recomputes_early_stages_only():
    r50 = build_gestaltmatcher("r50", width=0.25, num_classes=2).eval().backbone
    units = _units(r50)
    strides = [None] + [u.conv2.stride[0] for u in units[1:]]
    spans = axis_spans([(a, min(a + 10, 112)) for a in range(0, 108, 5)], 112, strides)
    cut = choose_cut(r50, spans, spans, 112)
    # layer1 (first 3 blocks after the stem) is always worth it; layer4 (7×7, every position changed) never
    assert 4 <= cut < len(units) - 3
    # a window covering the whole image changes everything: nothing to gain locally
    whole = axis_spans([(0, 112)], 112, strides)
    assert choose_cut(r50, whole, whole, 112) == 0


def test_spans_cover_the_changed_region():
    """Brute force on a 1-d chain of 3×3 convolutions: the spans name exactly the outputs a window changes."""
    size, strides = 40, [None, 2, 1, 2]
    torch.manual_seed(11)
    convs = [nn.Conv1d(1, 1, 3, padding=1, stride=1, bias=False)]
    for s in strides[1:]:
        convs += [nn.Conv1d(1, 1, 3, padding=1, bias=False), nn.Conv1d(1, 1, 3, padding=1, stride=s, bias=False)]
    for c in convs:
        c.weight.data.fill_(1.0)  # positive weights: a positive change can never cancel
    for a, b in [(0, 3), (5, 6), (17, 29), (37, 40)]:
        x = torch.zeros(1, 1, size)
        x[..., a:b] = 1.0
        spans = axis_spans([(a, b)], size, strides)
        act, u = x, 0
        with torch.no_grad():
            act = convs[0](act)
            changed = act[0, 0].nonzero().flatten()
            assert (spans[0][0].o0, spans[0][0].o1) == (int(changed.min()), int(changed.max()) + 1)
            for i in range(1, len(strides)):
                act = convs[2 * i](convs[2 * i - 1](act))
                changed = act[0, 0].nonzero().flatten()
                u = i
                assert (spans[u][0].o0, spans[u][0].o1) == (int(changed.min()), int(changed.max()) + 1), (a, b, u)
