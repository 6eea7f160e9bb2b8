"""Patch-local occlusion scores for iResNet models: recompute only what an occluding window can change.

A window changes few early activations. With the default 10×10 patch an iResNet's stem output changes in at most
12×12 of 112×112 positions, layer1's first block in 8×8 of 56×56; every 3×3 convolution widens the changed region
by one position on each side (and a stride-2 one halves it), until in layer3 it covers the whole map. A full forward
per occluded copy recomputes all of it. :func:`local_window_scores` instead

1. runs the unoccluded batch once and keeps the input of every *unit* (the stem, then each residual block);
2. for every window and early unit, gathers the unit's input over the rows/columns the changed region needs
   (the clean activation with the previous unit's recomputed region pasted in), and recomputes the unit's output
   only over the region the window can change, with the same weights and the same zero padding at the map borders;
3. from the *cut* on, pastes the recomputed region into the clean activation and runs the remaining units and the
   head in full, many windows per batch.

Each recomputed value is the same sum of the same products as in the full forward, so the scores equal the scores
of occluded full forwards up to float rounding (the convolution kernels may pick another summation order for a
smaller input). The cut is where recomputing regions stops paying: the unit count that minimises the multiply-adds
(region work weighted by :data:`LOCAL_OVERHEAD`, for gathers and small convolutions), computed from the windows.

Along each axis the regions depend only on the window's start on that axis, so the plan is two short lists of
:class:`Span` per unit; windows whose spans have equal shapes are computed together as one batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gestalt_xai.models.iresnet import IBasicBlock, IResNet

__all__ = ["LOCAL_OVERHEAD", "Span", "axis_spans", "choose_cut", "local_window_scores", "supports_local"]

#: weight of a multiply-add done region by region (index gathers, pastes, small convolutions) relative to one done
#: in a full batched forward, used to choose the cut. With it the chosen cut was within timing noise of the fastest
#: one on a 2-core CPU for iResNet-50 (width 1) and iResNet-18 (width 0.25) with 10×10 windows at stride 5.
LOCAL_OVERHEAD = 1.5

Window = tuple[int, int, int, int]  # y0, y1, x0, x1 (end exclusive, inside the image)


@dataclass(frozen=True)
class Span:
    """One unit along one axis for one window.

    ``[i0, i1)`` input positions gathered (inside the map), with ``p0``/``p1`` zero positions padded before/after
    for the first convolution; the previous unit's changed region sits at ``r_off`` (length ``r_len``) in the
    gathered positions; ``q0``/``q1`` zero positions are padded around the first convolution's output for the
    second (blocks); ``[o0, o1)`` output positions are recomputed; the shortcut starts at gathered position
    ``sc_off``.
    """

    i0: int
    i1: int
    p0: int
    p1: int
    r_off: int
    r_len: int
    q0: int
    q1: int
    o0: int
    o1: int
    sc_off: int
    mid: int  # positions of the first convolution's output (blocks) or of the output (stem)

    def shape_key(self) -> tuple[int, ...]:
        """Everything that shapes the computation; windows with equal keys on both axes share a batch."""
        return (self.i1 - self.i0, self.p0, self.p1, self.r_off, self.r_len, self.q0, self.q1, self.o1 - self.o0,
                self.sc_off)


def _clip(lo: int, hi: int, size: int) -> tuple[int, int, int, int]:
    """``[lo, hi)`` clipped to ``[0, size)`` and the zero padding that replaces the part outside."""
    return max(lo, 0), min(hi, size), max(0, -lo), max(0, hi - size)


def _affected(u0: int, u1: int, size: int, stride: int) -> tuple[int, int]:
    """Outputs of a 3×3, padding-1 convolution whose field ``[o·s − 1, o·s + 1]`` meets inputs ``[u0, u1)``."""
    out = (size - 1) // stride + 1
    return max(0, -((1 - u0) // stride)), min(out, u1 // stride + 1)


def axis_spans(starts: Sequence[tuple[int, int]], size: int, strides: Sequence[int | None]) -> list[list[Span]]:
    """Spans per unit (``strides[u]`` is ``None`` for the stem, else the block's stride) for window extents
    ``starts`` (``[a, b)`` per window) along an axis of ``size`` input positions.

    >>> stem, block = axis_spans([(0, 10)], 112, [None, 2])
    >>> (stem[0].o0, stem[0].o1), (block[0].o0, block[0].o1)
    ((0, 11), (0, 7))
    """
    spans: list[list[Span]] = []
    regions = list(starts)
    for stride in strides:
        row: list[Span] = []
        for a, b in regions:
            if stride is None:  # stem: conv3x3 (stride 1) → BN → PReLU
                o0, o1 = _affected(a, b, size, 1)
                i0, i1, p0, p1 = _clip(o0 - 1, o1 + 1, size)
                row.append(Span(i0, i1, p0, p1, a - i0, b - a, 0, 0, o0, o1, 0, o1 - o0))
            else:  # block: bn1 → conv3x3 → bn2 → PReLU → conv3x3(stride) → bn3, + shortcut
                c0, c1 = _affected(a, b, size, 1)
                o0, o1 = _affected(c0, c1, size, stride)
                m0, m1, q0, q1 = _clip(o0 * stride - 1, (o1 - 1) * stride + 2, size)
                i0, i1, p0, p1 = _clip(m0 - 1, m1 + 1, size)
                row.append(Span(i0, i1, p0, p1, a - i0, b - a, q0, q1, o0, o1, o0 * stride - i0, m1 - m0))
        spans.append(row)
        regions = [(s.o0, s.o1) for s in row]
        if stride is not None:
            size = (size - 1) // stride + 1
    return spans


def supports_local(model: nn.Module) -> bool:
    """Whether ``model`` is a GestaltMatcher-like module over an :class:`IResNet` with standard 3×3 convolutions,
    in eval mode (training-mode BatchNorm mixes the batch, so no position is local).

    >>> from gestalt_xai.models import build_gestaltmatcher
    >>> m = build_gestaltmatcher("r18", width=0.125, num_classes=2)
    >>> supports_local(m.eval()), supports_local(m.train()), supports_local(m.backbone.eval())
    (True, False, False)
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, IResNet) or not hasattr(model, "classifier"):
        return False
    if any(m.training for m in model.modules()):
        return False
    convs = [backbone.conv1] + [c for _, b in backbone.blocks() for c in (b.conv1, b.conv2)]
    return all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.dilation == (1, 1) and c.groups == 1
               for c in convs)


def _units(backbone: IResNet) -> list[IBasicBlock | None]:
    return [None] + [block for _, block in backbone.blocks()]


def _unit_forward(backbone: IResNet, unit: IBasicBlock | None, x: torch.Tensor) -> torch.Tensor:
    return backbone.forward_stem(x) if unit is None else unit(x)


def _macs(conv: nn.Conv2d) -> int:
    return conv.in_channels * conv.out_channels * 9


def choose_cut(backbone: IResNet, ys: list[list[Span]], xs: list[list[Span]], size: int) -> int:
    """The number of leading units to recompute region by region (0 … all blocks), minimising multiply-adds."""
    units = _units(backbone)
    n_win = len(ys[0]) * len(xs[0])
    local_cost, full_cost = [], []
    for u, unit in enumerate(units):
        sy = [s.mid for s in ys[u]]
        sx = [s.mid for s in xs[u]]
        if unit is None:
            local_cost.append(_macs(backbone.conv1) * sum(sy) * sum(sx))
            full_cost.append(_macs(backbone.conv1) * size * size * n_win)
            continue
        stride = unit.conv2.stride[0]
        out = (size - 1) // stride + 1
        oy = [s.o1 - s.o0 for s in ys[u]]
        ox = [s.o1 - s.o0 for s in xs[u]]
        local_cost.append(_macs(unit.conv1) * sum(sy) * sum(sx) + _macs(unit.conv2) * sum(oy) * sum(ox))
        full_cost.append((_macs(unit.conv1) * size * size + _macs(unit.conv2) * out * out) * n_win)
        size = out
    totals = [LOCAL_OVERHEAD * sum(local_cost[:c]) + sum(full_cost[c:]) for c in range(len(units) + 1)]
    return min(range(len(totals)), key=totals.__getitem__)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).contiguous()


def _conv(conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
    """``conv`` without its padding (the caller padded with zeros where the map ends)."""
    return F.conv2d(t, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _gather(src: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``src[b, rows[g], cols[g]]`` for every window ``g`` and image ``b``: ``(G, B, h, w, C)`` from NHWC ``src``."""
    b = torch.arange(src.shape[0], device=src.device)
    return src[b[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]


def _unit_region(backbone: IResNet, unit: IBasicBlock | None, t: torch.Tensor, sy: Span, sx: Span) -> torch.Tensor:
    """Recompute a unit over the output region from gathered inputs ``t`` (``(N, C, h, w)``)."""
    if unit is None:
        t = F.pad(t, (sx.p0, sx.p1, sy.p0, sy.p1))
        return backbone.prelu(backbone.bn1(_conv(backbone.conv1, t)))
    stride = unit.conv2.stride[0]
    oh, ow = sy.o1 - sy.o0, sx.o1 - sx.o0
    shortcut = t[..., sy.sc_off : sy.sc_off + (oh - 1) * stride + 1, sx.sc_off : sx.sc_off + (ow - 1) * stride + 1]
    if unit.downsample is not None:
        shortcut = unit.downsample(shortcut)
    out = F.pad(unit.bn1(t), (sx.p0, sx.p1, sy.p0, sy.p1))  # padding follows bn1, as in the full forward
    out = unit.prelu(unit.bn2(_conv(unit.conv1, out)))
    out = unit.bn3(_conv(unit.conv2, F.pad(out, (sx.q0, sx.q1, sy.q0, sy.q1))))
    return unit.residual(out, shortcut)


@torch.no_grad()
def local_window_scores(
    model: nn.Module,
    x: torch.Tensor,
    base: torch.Tensor,
    windows: Sequence[Window],
    score_rows: Callable[[torch.Tensor | None, torch.Tensor, int], torch.Tensor],
    max_batch: int = 16,
    cut: int | None = None,
    local_batch: int = 256,
) -> torch.Tensor:
    """Scores ``(K, B)`` of ``x`` with each of ``K`` windows replaced by ``base``, for a GestaltMatcher-like model.

    Parameters
    ----------
    model : module with ``backbone`` (:class:`IResNet`) and ``classifier`` (``None`` or a module on the embedding);
        check with :func:`supports_local`.
    x, base : images ``(B, 3, H, W)`` as the model sees them (view and channel order applied) and their baseline.
    windows : ``(y0, y1, x0, x1)`` per window, in the same coordinates as ``x``.
    score_rows : ``(logits, embedding, k) -> (k·B,)`` scores for ``k`` window-major copies of the batch.
    max_batch : occluded images per batch in the full-forward part (8–16 is fastest per image on a 2-core CPU).
    local_batch : occluded images per step of the region-by-region part (its convolutions are small: larger
        batches keep them efficient).
    cut : recompute the first ``cut`` units region by region (default: :func:`choose_cut`); ``0`` recomputes
        nothing locally (plain batched forwards of occluded copies).
    """
    backbone: IResNet = model.backbone  # type: ignore[assignment]
    units = _units(backbone)
    b, _, h, w = x.shape
    strides = [None] + [u.conv2.stride[0] for u in units[1:]]
    row_ext = sorted({(y0, y1) for y0, y1, _, _ in windows})
    col_ext = sorted({(x0, x1) for _, _, x0, x1 in windows})
    ys, xs = axis_spans(row_ext, h, strides), axis_spans(col_ext, w, strides)
    if cut is None:
        cut = choose_cut(backbone, ys, xs, h)
    if not 0 <= cut <= len(units):
        raise ValueError(f"cut must be in 0…{len(units)}, got {cut}")
    yi = {e: i for i, e in enumerate(row_ext)}
    xi = {e: i for i, e in enumerate(col_ext)}
    win_y = torch.tensor([yi[(y0, y1)] for y0, y1, _, _ in windows])
    win_x = torch.tensor([xi[(x0, x1)] for _, _, x0, x1 in windows])

    # the input of every unit up to the cut, unoccluded, NHWC so that window crops are one index gather
    clean: list[torch.Tensor] = []
    act = x
    for unit in units[:cut]:
        clean.append(_nhwc(act))
        act = _unit_forward(backbone, unit, act)
    clean.append(_nhwc(act))
    base_nhwc = _nhwc(base)
    device = x.device

    def arange_from(starts: torch.Tensor, n: int) -> torch.Tensor:
        return starts[:, None] + torch.arange(n, device=device)[None]

    out = torch.empty(len(windows), b, dtype=x.dtype, device=device)
    per = max(1, max_batch // b)
    per_local = max(per, local_batch // b)
    for start in range(0, len(windows), per_local):
        ks = torch.arange(start, min(len(windows), start + per_local))
        k = len(ks)
        # "previous region" of unit 0: the baseline pixels inside each window
        ry = [(windows[i][0], windows[i][1] - windows[i][0]) for i in ks.tolist()]
        rx = [(windows[i][2], windows[i][3] - windows[i][2]) for i in ks.tolist()]
        ly, lx = max(n for _, n in ry), max(n for _, n in rx)
        region = base_nhwc.new_zeros(k, b, ly, lx, base_nhwc.shape[-1])
        for j in range(k):
            (y0, hy), (x0, wx) = ry[j], rx[j]
            region[j, :, :hy, :wx] = base_nhwc[:, y0 : y0 + hy, x0 : x0 + wx]
        for u in range(cut):
            spans_y = [ys[u][i] for i in win_y[ks].tolist()]
            spans_x = [xs[u][i] for i in win_x[ks].tolist()]
            groups: dict[tuple, list[int]] = defaultdict(list)
            for j in range(k):
                groups[(spans_y[j].shape_key(), spans_x[j].shape_key())].append(j)
            oh_max = max(s.o1 - s.o0 for s in spans_y)
            ow_max = max(s.o1 - s.o0 for s in spans_x)
            nxt: torch.Tensor | None = None
            for members in groups.values():
                sy, sx = spans_y[members[0]], spans_x[members[0]]
                idx = torch.tensor(members, device=device)
                i0y = torch.tensor([spans_y[j].i0 for j in members], device=device)
                i0x = torch.tensor([spans_x[j].i0 for j in members], device=device)
                crop = _gather(clean[u], arange_from(i0y, sy.i1 - sy.i0), arange_from(i0x, sx.i1 - sx.i0))
                crop[:, :, sy.r_off : sy.r_off + sy.r_len, sx.r_off : sx.r_off + sx.r_len] = \
                    region[idx, :, : sy.r_len, : sx.r_len]
                g = len(members)
                t = crop.reshape(g * b, *crop.shape[2:]).permute(0, 3, 1, 2)
                res = _unit_region(backbone, units[u], t, sy, sx)
                if nxt is None:
                    nxt = res.new_zeros(k, b, oh_max, ow_max, res.shape[1])
                oh, ow = sy.o1 - sy.o0, sx.o1 - sx.o0
                nxt[idx, :, :oh, :ow] = res.permute(0, 2, 3, 1).reshape(g, b, oh, ow, -1)
            assert nxt is not None
            region = nxt
            ry = [(s.o0, s.o1 - s.o0) for s in spans_y]
            rx = [(s.o0, s.o1 - s.o0) for s in spans_x]
        # paste each window's region into the clean activation at the cut, run the rest in full
        classifier = model.classifier
        for sub in range(0, k, per):
            n = min(per, k - sub)
            full = clean[cut].unsqueeze(0).repeat(n, 1, 1, 1, 1)
            for j in range(n):
                (y0, hy), (x0, wx) = ry[sub + j], rx[sub + j]
                full[j, :, y0 : y0 + hy, x0 : x0 + wx] = region[sub + j, :, :hy, :wx]
            act = full.reshape(n * b, *full.shape[2:]).permute(0, 3, 1, 2)
            for unit in units[cut:]:
                act = _unit_forward(backbone, unit, act)
            emb = backbone.forward_head(act)
            logits = classifier(emb) if classifier is not None else None
            out[start + sub : start + sub + n] = score_rows(logits, emb, n).reshape(n, b)
    return out
