"""Attribution speed, measured in one run on the same model and batch; prints ratios.

(a) our five gradient maps (Grad-CAM, HiResCAM, FullGrad, saliency, input×gradient) from ONE shared pass vs the same
    five from the libraries, each run separately: pytorch-grad-cam ``GradCAM`` + ``HiResCAM``, Captum ``Saliency`` +
    ``InputXGradient``, and a straightforward separate FullGrad pass (pytorch-grad-cam's ``FullGrad`` pairs biases
    with gradients by list position and crashes on iResNet). Targets: ≥ 5× faster, ≤ 4 forward-pass equivalents.
(b) our occlusion vs ``captum.attr.Occlusion`` with the same window, stride and baseline (identical output checked):
    target ≥ 1.5×. Our variants: plain batched forwards; + BN folded / channels-last; + patch-local recomputation
    of the early stages (the default of the registered method).
(c) the cost of every registered method as a multiple of one forward pass.

Usage::

    python benchmarks/attribution.py                      # iResNet-50, batch 8, 10×10 windows at stride 5
    python benchmarks/attribution.py --occlusion-patch 20 --occlusion-stride 10 --skip-slow   # quicker
    python benchmarks/attribution.py --parts b --arch r18 --width 0.25      # occlusion only, the demo model

Timings are wall-clock medians of ``--repeats`` runs after one warm-up, in one process, with torch's default threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gestalt_xai.attribution.base import get_method
from gestalt_xai.attribution.gradients import GRADIENT_METHODS, gradient_pass
from gestalt_xai.attribution.occlusion import occlusion, window_starts
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.attribution.targets import CentroidTarget
from gestalt_xai.models import build_gestaltmatcher


def timed(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def separate_fullgrad(model: nn.Module, score: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A straightforward FullGrad pass of its own (full backward hooks on every biased module)."""
    grads: list[tuple[nn.Module, torch.Tensor]] = []
    biased = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None
              or isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    handles = [m.register_full_backward_hook(lambda mod, gi, go: grads.append((mod, go[0]))) for m in biased]
    xi = x.clone().requires_grad_(True)
    try:
        (gx,) = torch.autograd.grad(score(xi).sum(), xi)
    finally:
        for h in handles:
            h.remove()

    def post(t: torch.Tensor) -> torch.Tensor:
        t = t.abs()
        t = t - t.flatten(1).min(1).values.view(-1, *[1] * (t.ndim - 1))
        return t / (t.flatten(1).max(1).values.view(-1, *[1] * (t.ndim - 1)) + 1e-6)

    cam = post(gx * xi.detach()).sum(1)
    for m, g in grads:
        if g.ndim == 4:
            b = m.bias if not isinstance(m, nn.BatchNorm2d) else m.bias - m.weight * m.running_mean / torch.sqrt(
                m.running_var + m.eps)
            cam = cam + F.interpolate(post(g * b.detach().view(1, -1, 1, 1)), size=x.shape[-2:], mode="bilinear",
                                      align_corners=True).sum(1)
    return cam


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="r50")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--occlusion-patch", type=int, default=10)
    ap.add_argument("--occlusion-stride", type=int, default=5)
    ap.add_argument("--skip-slow", action="store_true", help="skip (c) for SmoothGrad/IG-based methods")
    ap.add_argument("--parts", default="abc", help="which parts to run, e.g. 'b' (default: abc)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_gestaltmatcher(args.arch, width=args.width, num_classes=8).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(args.batch, 3, 112, 112, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    refs = torch.randn(args.batch, 512, generator=torch.Generator().manual_seed(2))
    score = ScoreModel([("m", model)], CentroidTarget(refs))
    print(f"iResNet {args.arch} width {args.width}, batch {args.batch}, {torch.get_num_threads()} threads")

    def forward() -> None:
        with torch.no_grad():
            score(x)

    t_fwd = timed(forward, args.repeats)
    print(f"one forward pass: {t_fwd:.3f} s")

    if "a" in args.parts:
        bench_gradients(args, model, score, x, t_fwd)
    if "b" in args.parts or "c" in args.parts:
        ours_occ = bench_occlusion(args, score, x, t_fwd, run_libraries="b" in args.parts)
    if "c" in args.parts:
        bench_costs(args, score, x, t_fwd, ours_occ)


def bench_gradients(args: argparse.Namespace, model: nn.Module, score: ScoreModel, x: torch.Tensor,
                    t_fwd: float) -> None:
    from captum.attr import InputXGradient, Saliency
    from pytorch_grad_cam import GradCAM, HiResCAM

    layer = model.backbone.layer4

    def ours() -> None:
        gp = gradient_pass(score, x, ["backbone.layer4"], fullgrad=True)
        gp.gradcam(), gp.hirescam(), gp.fullgrad(), gp.saliency(), gp.input_x_gradient()

    class _Row:  # pytorch-grad-cam calls target(model_output[i]) per image: the score is already a scalar
        def __call__(self, out: torch.Tensor) -> torch.Tensor:
            return out

    targets = [_Row() for _ in range(args.batch)]
    libs = {
        # frozen weights: the input must require grad for the library's backward to reach the layer
        "pytorch-grad-cam GradCAM": lambda: GradCAM(model=score, target_layers=[layer])(
            x.clone().requires_grad_(True), targets),
        "pytorch-grad-cam HiResCAM": lambda: HiResCAM(model=score, target_layers=[layer])(
            x.clone().requires_grad_(True), targets),
        "captum Saliency": lambda: Saliency(score).attribute(x, abs=True),
        "captum InputXGradient": lambda: InputXGradient(score).attribute(x),
        "separate FullGrad": lambda: separate_fullgrad(model, score, x),
    }
    t_ours = timed(ours, args.repeats)
    t_libs = {k: timed(f, args.repeats) for k, f in libs.items()}
    t_lib_total = sum(t_libs.values())
    print("\n(a) five gradient maps")
    for k, v in t_libs.items():
        print(f"    {k:28s} {v:7.3f} s  ({v / t_fwd:4.1f} forwards)")
    print(f"    {'libraries, total':28s} {t_lib_total:7.3f} s  ({t_lib_total / t_fwd:4.1f} forwards)")
    print(f"    {'ours, one shared pass':28s} {t_ours:7.3f} s  ({t_ours / t_fwd:4.1f} forwards)")
    print(f"    speed-up: {t_lib_total / t_ours:.1f}x (target >= 5x); ours = {t_ours / t_fwd:.1f} forward-pass "
          f"equivalents (target <= 4)")


def bench_occlusion(args: argparse.Namespace, score: ScoreModel, x: torch.Tensor, t_fwd: float,
                    run_libraries: bool) -> Callable[[], None]:
    """(b); returns the default occlusion call for (c)."""
    from captum.attr import Occlusion as CaptumOcclusion

    P, S = args.occlusion_patch, args.occlusion_stride
    occ = get_method("occlusion")(patch=P, stride=S, baseline="black")
    occ_folded = get_method("occlusion")(patch=P, stride=S, baseline="black", local=False)
    out: dict[str, torch.Tensor] = {}

    def ours_occ() -> None:
        out["ours"] = occ.attribute(score, x, ["occlusion"], [])[0].maps

    if not run_libraries:
        return ours_occ

    def ours_occ_folded() -> None:
        out["folded"] = occ_folded.attribute(score, x, ["occlusion"], [])[0].maps

    def ours_occ_plain() -> None:
        out["plain"] = occlusion(score, x, P, S, "black", local=False)

    def captum_occ() -> None:
        out["captum"] = CaptumOcclusion(score).attribute(x, sliding_window_shapes=(3, P, P), strides=(3, S, S),
                                                         baselines=-1.0)[:, 0]

    # hundreds of forwards each: one timed run, no warm-up (the model is warm from the forward timing)
    t_cap = timed(captum_occ, 1, warmup=False)
    t_occ_plain = timed(ours_occ_plain, 1, warmup=False)
    t_occ_folded = timed(ours_occ_folded, 1, warmup=False)
    t_occ = timed(ours_occ, 1, warmup=False)
    diff = max(float((out[k] - out["captum"]).abs().max()) for k in ("ours", "folded", "plain"))
    n_win = len(window_starts(112, P, S))
    print(f"\n(b) occlusion {P}x{P}, stride {S} ({n_win}x{n_win} windows), black baseline")
    for name, t in [("captum Occlusion", t_cap), ("ours (batched)", t_occ_plain), ("ours (+BN folded)", t_occ_folded),
                    ("ours (+patch-local, default)", t_occ)]:
        print(f"    {name:28s} {t:8.2f} s  ({t / t_fwd / n_win ** 2:.2f} forwards per window, "
              f"{t_cap / t:.2f}x captum)")
    print(f"    speed-up: {t_cap / t_occ:.2f}x (target >= 1.5x); max |ours - captum| = {diff:.2e} (<= 1e-5)")
    return ours_occ


def bench_costs(args: argparse.Namespace, score: ScoreModel, x: torch.Tensor, t_fwd: float,
                ours_occ: Callable[[], None]) -> None:
    print("\n(c) cost per method, in forward passes (same batch)")
    rows = [("gradient family (5 maps)", lambda: get_method("gradcam")().attribute(
        score, x, list(GRADIENT_METHODS), ["backbone.layer4"]))]
    rows.append(("occlusion", ours_occ))
    rows += [(m, (lambda m=m: get_method(m)().attribute(score, x, [m], [])))
             for m in ("guided_backprop", "deconvolution", "deeplift", "lrp")]
    if not args.skip_slow:
        rows += [("integrated_gradients (32 steps)", lambda: get_method("integrated_gradients")().attribute(
            score, x, ["integrated_gradients"], [])),
                 ("smoothgrad (16 samples)",
                  lambda: get_method("smoothgrad")().attribute(score, x, ["smoothgrad"], []))]
    for name, fn in rows:
        t = timed(fn, 1, warmup=name != "occlusion")
        print(f"    {name:32s} {t:8.2f} s  {t / t_fwd:7.1f} forwards")


if __name__ == "__main__":
    main()
