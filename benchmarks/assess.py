"""Faithfulness-curve speed, measured in one run on the same model, images and maps; prints ratios.

(a) deletion curves (black baseline, 16 steps of 784 pixels) for 5 methods' maps (Grad-CAM, HiResCAM, FullGrad,
    saliency, input×gradient of this model) × ``--images`` images on iResNet-50 (random weights: speed and agreement
    do not depend on training): ours, ONE :func:`~gestalt_xai.assess.faithfulness.perturbation_curves` call for all
    methods, vs Quantus 0.6 ``PixelFlipping`` run once per method as its users do, at equal curve resolution and with
    the conventions matched (module docstring of :mod:`gestalt_xai.assess.faithfulness`; ties in the maps are broken
    by our seeded order, which Quantus receives as a tie-free map). Checks the same curves within 1e-5 and prints
    the time ratio (target ≥ 3×) and our images scored per curve step per image and method (target ≤ 1.05), counted
    by a forward hook.
(b) with ``--run PATH``: the assess stage's call on a run's first model — its stored maps of 5 gradient methods for
    ``--run-images`` images, deletion + insertion, one baseline, 16 steps, the random-map baseline — in seconds
    (centroid references drawn at random: the cost does not depend on them).

Usage::

    python benchmarks/assess.py                        # (a): iResNet-50, 16 images
    python benchmarks/assess.py --parts b --run runs/demo

Timings are wall-clock, one run each after a warm-up forward, in one process, with torch's default threads.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from gestalt_xai.assess.faithfulness import deletion_order, perturbation_curves
from gestalt_xai.attribution.gradients import gradient_pass
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.attribution.targets import CentroidTarget
from gestalt_xai.models import build_gestaltmatcher
from gestalt_xai.models.gestaltmatcher import preprocess

METHODS = ("gradcam", "hirescam", "fullgrad", "saliency", "input_x_gradient")
SIZE = 112


CPU_SECONDS: list[float] = []  # process CPU seconds of each timed call, beside its wall-clock seconds


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall-clock seconds and the result; the CPU seconds go to :data:`CPU_SECONDS` (steadier than wall-clock on a
    machine shared with other jobs)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    CPU_SECONDS.append(time.process_time() - c0)
    return time.perf_counter() - t0, out


class ClassScores(nn.Module):
    """The explained score as Quantus's "class" 0 of ``(B, 1)`` outputs. Quantus requires ``features_in_step`` to
    divide H·W, and a whole-pixel step is 3 features per pixel (112² has no factor 3), so each image reaches it as
    one channel of ``(3·112, 112)`` (the channel planes stacked: the same flat order); reshaped back here."""

    def __init__(self, score: ScoreModel) -> None:
        super().__init__()
        self.score = score

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x.reshape(len(x), 3, SIZE, SIZE))[:, None]


class ImageCounter:
    """Counts images through a module's forward. The BN-folded copies keep the hook (``deepcopy`` copies a module's
    hooks; a plain function, unlike a bound method, is not copied, so every copy counts here)."""

    def __init__(self, module: nn.Module) -> None:
        self.n = 0

        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: object) -> None:
            self.n += len(args[0])

        module.register_forward_hook(hook)


def gradient_maps(score: ScoreModel, x: torch.Tensor) -> dict[str, np.ndarray]:
    gp = gradient_pass(score, x, ["backbone.layer4"], fullgrad=True)
    return {m: getattr(gp, m)().detach().float().numpy() for m in METHODS}


def bench_quantus(args: argparse.Namespace) -> None:
    import quantus

    torch.manual_seed(0)
    model = build_gestaltmatcher(args.arch, width=args.width, num_classes=8).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    b, steps = args.images, args.steps
    crops = np.random.default_rng(1).integers(0, 256, (b, SIZE, SIZE, 3), dtype=np.uint8)
    refs = torch.randn(b, 512, generator=torch.Generator().manual_seed(2))
    score = ScoreModel([("m", model)], CentroidTarget(refs))
    x = preprocess(crops)
    maps = gradient_maps(score, x)
    counter = ImageCounter(model)
    with torch.no_grad():
        score(x)  # warm-up
    print(f"(a) iResNet {args.arch} width {args.width} (random weights), {b} images, {len(METHODS)} methods, "
          f"{steps} deletion steps, black baseline, {torch.get_num_threads()} threads")

    counter.n = 0
    t_ours, ours = timed(lambda: perturbation_curves(score, crops, maps, steps=steps, random_maps=0, seed=0))
    c_ours = CPU_SECONDS[-1]
    n_ours = counter.n
    assert n_ours == ours.n_scored, (n_ours, ours.n_scored)  # the hook saw every scored image
    t_ours_rand, _ = timed(lambda: perturbation_curves(score, crops, maps, steps=steps, random_maps=1, seed=0))

    per_step = 3 * SIZE * SIZE // steps
    x_q = x.numpy().reshape(b, 1, 3 * SIZE, SIZE)
    n_pixels = SIZE * SIZE
    t_q, c_q, diff = 0.0, 0.0, 0.0
    counter.n = 0
    for m, name in enumerate(METHODS):
        # the same tie-broken order: rank 0 (removed first) gets the largest value
        order = deletion_order(maps[name], seed=0)
        tie_free = np.empty((b, n_pixels), np.float32)
        np.put_along_axis(tie_free, order, np.arange(n_pixels, 0, -1, dtype=np.float32)[None], 1)
        a_q = np.tile(tie_free.reshape(b, 1, SIZE, SIZE), (1, 1, 3, 1))
        metric = quantus.PixelFlipping(features_in_step=per_step, normalise=False, abs=False, disable_warnings=True,
                                       perturb_baseline=np.full((b, per_step), -1.0, np.float32))
        t, curves = timed(lambda metric=metric, a_q=a_q: metric(
            model=ClassScores(score).eval(), x_batch=x_q, y_batch=np.zeros(b, int), a_batch=a_q, softmax=False,
            channel_first=True, device="cpu"))
        t_q += t
        c_q += CPU_SECONDS[-1]
        diff = max(diff, float(np.abs(np.asarray(curves) - ours.scores[m, :, 1:]).max()))
        print(f"    quantus PixelFlipping {name:18s} {t:7.2f} s")
    n_q = counter.n
    assert diff <= 1e-5, f"curves differ from Quantus by {diff:.2e}"
    per = n_ours / (b * len(METHODS) * steps)
    print(f"    {'quantus, 5 runs':40s} {t_q:7.2f} s  ({c_q:7.2f} CPU s, {n_q} images scored)")
    print(f"    {'ours, one call (5 methods)':40s} {t_ours:7.2f} s  ({c_ours:7.2f} CPU s, {n_ours} images scored)")
    print(f"    {'ours, one call (5 methods + random map)':40s} {t_ours_rand:7.2f} s")
    print(f"    max |ours - quantus| = {diff:.2e} (<= 1e-5)")
    print(f"    speed-up: {t_q / t_ours:.2f}x wall-clock, {c_q / c_ours:.2f}x CPU time (target >= 3x); images scored: "
          f"{n_q / n_ours:.3f}x fewer")
    print(f"    ours scores {per:.3f} images per curve step per image and method (target <= 1.05; Quantus 1.000; "
          "ours includes f(x))")


def bench_run(args: argparse.Namespace) -> None:
    from gestalt_xai.models import load_model
    from gestalt_xai.runs import Run

    run = Run(args.run)
    store = run.map_store()
    index = store.index(method=list(METHODS), target_kind="centroid")
    model_id = sorted(index["model_id"].unique())[0]
    index = index[index["model_id"] == model_id]
    complete = index.groupby(["image_id", "target"])["method"].nunique()
    keys = sorted(complete[complete == len(METHODS)].index)[: args.run_images]
    b = len(keys)
    rows = index.set_index(["image_id", "target", "method"])
    maps = {m: store.load_many(rows.loc[[(i, t, m) for i, t in keys]].reset_index()) for m in METHODS}
    crops = run.crops([i for i, _ in keys])
    model = load_model(next(p for p in sorted((run.path / "models").glob("*.safetensors"))
                            if p.stem == model_id))
    refs = torch.randn(b, 512, generator=torch.Generator().manual_seed(2))
    score = ScoreModel([(model_id, model)], CentroidTarget(refs))
    print(f"\n(b) {run.path.name}: model {model_id}, {b} images × {len(METHODS)} methods + random map, "
          f"{args.steps} steps, {args.baseline} baseline, {torch.get_num_threads()} threads")
    total = 0.0
    for mode in ("deletion", "insertion"):
        t, c = timed(lambda mode=mode: perturbation_curves(score, crops, maps, mode=mode, steps=args.steps,
                                                             baseline=args.baseline, random_maps=1, seed=0))
        total += t
        print(f"    {mode:10s} {t:7.2f} s  ({c.n_scored} images scored)")
    print(f"    deletion + insertion: {total:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="r50")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16, help="curve steps (must divide 112²)")
    ap.add_argument("--parts", default="a", help="which parts to run: a, b or ab (b needs --run)")
    ap.add_argument("--run", help="a run folder with a model and stored maps, for (b)")
    ap.add_argument("--run-images", type=int, default=30)
    ap.add_argument("--baseline", default="black", choices=["black", "blur"])
    args = ap.parse_args()
    if "a" in args.parts:
        bench_quantus(args)
    if "b" in args.parts:
        if not args.run:
            ap.error("part b needs --run")
        bench_run(args)


if __name__ == "__main__":
    main()
