"""Embedding throughput (images/s) with and without TTA, measured in one run on this machine.

Models: iResNet-50 at full width (GM-Arc's backbone) and the demo's small iResNet-18 at width 0.25, random weights
(speed does not depend on the values). Input: random 112×112 RGB uint8 crops, embedded through the same
``gestalt_xai.models.encode`` path the embed stage uses (preprocessing, eval mode, ``torch.inference_mode``).
TTA = 4 forward passes per image ({original, hflip} × {colour, gray}), so images/s with TTA should be ≈ 1/4.

    python benchmarks/embedding.py                    # CPU, torch's default thread count
    python benchmarks/embedding.py --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from gestalt_xai.models import build_gestaltmatcher, encode

MODELS = {"iresnet50 (width 1.0)": ("r50", 1.0), "iresnet18 (width 0.25, demo)": ("r18", 0.25)}


def images_per_second(model, images: np.ndarray, *, tta: bool, batch_size: int, device: str, repeats: int) -> float:
    encode(model, images[:batch_size], tta=tta, batch_size=batch_size, device=device)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        encode(model, images, tta=tta, batch_size=batch_size, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-large", type=int, default=16, help="images for iResNet-50")
    ap.add_argument("--n-small", type=int, default=64, help="images for the small demo model")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (best is reported)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(
        f"torch {torch.__version__} | {platform.processor() or platform.machine()} | device {args.device} | "
        f"threads {torch.get_num_threads()} | batch {args.batch_size}"
    )
    print(f"{'model':32s} {'images':>6s} {'no TTA img/s':>13s} {'TTA (4 slots) img/s':>20s} {'ratio':>6s}")
    for label, (arch, width) in MODELS.items():
        torch.manual_seed(0)
        model = build_gestaltmatcher(arch, width=width, num_classes=10).to(args.device).eval()
        n = args.n_large if arch == "r50" else args.n_small
        images = rng.integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)
        plain = images_per_second(
            model, images, tta=False, batch_size=args.batch_size, device=args.device, repeats=args.repeats
        )
        tta = images_per_second(
            model, images, tta=True, batch_size=args.batch_size, device=args.device, repeats=args.repeats
        )
        print(f"{label:32s} {n:6d} {plain:13.1f} {tta:20.1f} {plain / tta:6.2f}")


if __name__ == "__main__":
    main()
