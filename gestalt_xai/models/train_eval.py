"""How a training run is measured and shown: validation metrics after every epoch and the history figure."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gestalt_xai.runs import atomic_write_bytes

__all__ = ["evaluate_classifier", "plot_history"]


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    crops: np.ndarray,
    targets: np.ndarray,
    weights: torch.Tensor | None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Validation metrics of the classifier on un-augmented crops (no TTA).

    Returns ``val_loss`` (weighted CE, as GM-Arc), ``val_top1``/``val_top5`` (per image) and
    ``val_mean_top1``/``val_mean_top5`` (mean over the classes present of the per-class accuracy, GM-Arc's
    scheduler metric). Top-5 is top-min(5, C).
    """
    if len(targets) == 0:
        return {k: float("nan") for k in ("val_loss", "val_top1", "val_top5", "val_mean_top1", "val_mean_top5")}
    was = model.training
    model.eval()
    logits = []
    for s in range(0, len(crops), batch_size):
        x = model.preprocess(crops[s : s + batch_size], device=device)
        lg, _ = model(x)
        logits.append(lg.float().cpu())
    model.train(was)
    lg = torch.cat(logits)
    y = torch.as_tensor(targets, dtype=torch.long)
    loss = F.cross_entropy(lg, y, weight=weights).item()
    k = min(5, lg.shape[1])
    top = lg.topk(k, dim=1).indices
    hit1 = (top[:, 0] == y).numpy().astype(float)
    hit5 = (top == y[:, None]).any(dim=1).numpy().astype(float)
    per = pd.DataFrame({"y": targets, "h1": hit1, "h5": hit5}).groupby("y").mean()
    return {
        "val_loss": float(loss),
        "val_top1": float(hit1.mean()),
        "val_top5": float(hit5.mean()),
        "val_mean_top1": float(per["h1"].mean()),
        "val_mean_top5": float(per["h5"].mean()),
    }


def plot_history(history: pd.DataFrame, path: Path, title: str) -> None:
    """Loss and accuracy curves per epoch of a training history (``<model_id>_curve.png``), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    ax1.plot(history["epoch"], history["train_loss"], label="train", marker="o", ms=3)
    ax1.plot(history["epoch"], history["val_loss"], label="validation", marker="o", ms=3)
    ax1.set(xlabel="epoch", ylabel="weighted cross-entropy", title="loss", yscale="log")
    ax1.legend()
    for col, label in (
        ("train_top1", "train top-1"),
        ("val_top1", "val top-1"),
        ("val_mean_top1", "val mean-per-class top-1"),
        ("val_mean_top5", "val mean-per-class top-5"),
    ):
        ax2.plot(history["epoch"], history[col], label=label, marker="o", ms=3)
    ax2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
