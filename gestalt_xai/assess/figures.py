"""Figures of the assess stage, in the package's one visual language (:mod:`gestalt_xai.viz`): mean faithfulness
curves with 95 % bands (the random map dashed), randomisation curves per method, localisation bars with the chance
line and the random-model control beside."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from gestalt_xai.assess.stats import subject_means
from gestalt_xai.viz import _plt, file_stem, save_figure

__all__ = ["draw", "curve_figure", "randomisation_figure", "localisation_figure"]

_Z95 = 1.959963984540054


def _band(values: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Mean and a normal 95 % band over items at each ``x``."""
    g = values.groupby(x)[y]
    out = pd.DataFrame({"mean": g.mean(), "se": g.std(ddof=1) / np.sqrt(g.count())}).reset_index()
    out["se"] = out["se"].fillna(0.0)
    return out


def _lines(ax, frame: pd.DataFrame, x: str, y: str, by: str, colours: Mapping[str, object]) -> None:  # type: ignore[no-untyped-def]
    for name, part in frame.groupby(by, sort=True):
        b = _band(part, x, y)
        style = {"color": "0.4", "linestyle": "--"} if name == "random" else {"color": colours[str(name)]}
        ax.plot(b[x], b["mean"], label=str(name), lw=1.4, **style)
        ax.fill_between(b[x], b["mean"] - _Z95 * b["se"], b["mean"] + _Z95 * b["se"], alpha=0.15,
                        color=style["color"], lw=0)


def _colours(methods: list[str]) -> dict[str, object]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(set(methods) - {"random"}))}


def curve_figure(curves: pd.DataFrame, model_id: str, path: Path, formats: tuple[str, ...]) -> list[Path]:
    """One panel per (curve, baseline): mean explained score against the fraction removed / inserted."""
    plt = _plt()
    panels = sorted(curves.groupby(["curve", "baseline"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
    colours = _colours(list(curves["method"].unique()))
    for ax, (curve, baseline) in zip(axes[0], panels, strict=True):
        part = curves[(curves["curve"] == curve) & (curves["baseline"] == baseline)]
        _lines(ax, part, "fraction", "score", "method", colours)
        ax.set_title(f"{curve} ({baseline})", fontsize=9)
        ax.set_xlabel("fraction " + ("inserted" if curve == "insertion" else "removed"), fontsize=8)
        ax.set_ylabel("explained score", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][-1].legend(fontsize=7, frameon=False, loc="best")
    fig.suptitle(f"{model_id}: faithfulness curves (mean, 95 % band; random map dashed)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, formats)


def randomisation_figure(table: pd.DataFrame, model_id: str, path: Path, formats: tuple[str, ...]) -> list[Path]:
    """Spearman ρ (raw, and of |·| dashed) between each method's original and randomised maps, per step."""
    plt = _plt()
    modes = sorted(table["mode"].unique())
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 3.2), squeeze=False)
    colours = _colours(list(table["method"].unique()))
    for ax, mode in zip(axes[0], modes, strict=True):
        part = table[table["mode"] == mode]
        ticks = part.drop_duplicates("step").sort_values("step")
        for method, rows in part.groupby("method", sort=True):
            for col, style in (("spearman", "-"), ("spearman_abs", ":")):
                b = _band(rows, "step", col)
                ax.plot(b["step"], b["mean"], style, color=colours[str(method)], lw=1.3,
                        label=str(method) if col == "spearman" else None)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xticks(ticks["step"].tolist(), ticks["group"].astype(str).tolist(), rotation=40, ha="right",
                      fontsize=7)
        ax.set_ylim(-0.3, 1.05)
        ax.set_ylabel("Spearman ρ with the trained model's map", fontsize=8)
        ax.set_title(f"{mode} randomisation (solid ρ, dotted ρ of |·|)", fontsize=9)
    axes[0][-1].legend(fontsize=7, frameon=False)
    fig.suptitle(f"{model_id}: model-parameter randomisation", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, formats)


def localisation_figure(metrics: pd.DataFrame, model_id: str, controls: list[str], path: Path,
                        formats: tuple[str, ...]) -> list[Path]:
    """Mass-share ratio (mass share ÷ area share) per method on change and region masks: chance is 1; the random
    control's bars beside (hatched)."""
    plt = _plt()
    kinds = [k for k in ("change_ratio", "region_ratio", "mark_ratio") if (metrics["metric"] == k).any()]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.8 * len(kinds), 3.0), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        part = metrics[metrics["metric"] == kind]
        methods = sorted(set(part.loc[part["model_id"] == model_id, "method"]))
        xs = np.arange(len(methods))
        for offset, mid, hatch in ((-0.2, model_id, ""), *((0.2, c, "//") for c in controls[:1])):
            rows = [part[(part["model_id"] == mid) & (part["method"] == m)] for m in methods]
            means = [subject_means(r["value"], r["subject_id"]) for r in rows]
            ax.bar(xs + offset, [s.mean() if len(s) else np.nan for s in means], width=0.4, hatch=hatch,
                   color="C0" if not hatch else "0.8", edgecolor="0.3", label=mid)
        ax.axhline(1.0, color="C3", lw=1, ls="--", label="chance (uniform map)")
        ax.set_xticks(xs, methods, rotation=40, ha="right", fontsize=7)
        ax.set_title(kind.replace("_", " "), fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][-1].legend(fontsize=7, frameon=False)
    fig.suptitle(f"{model_id}: relevance in the planted features' masks over their area share", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, formats)


def draw(tables: Mapping[str, pd.DataFrame], metrics: pd.DataFrame, controls: list[str], folder: Path,
         formats: tuple[str, ...]) -> list[Path]:
    """Every figure the tables allow, per trained model."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    curves = tables.get("faithfulness_curves", pd.DataFrame())
    randomisation = tables.get("randomisation", pd.DataFrame())
    models = sorted(set(metrics["model_id"]) - set(controls)) if len(metrics) else []
    for model_id in models:
        stem = file_stem(model_id)
        if len(curves) and (part := curves[curves["model_id"] == model_id]).shape[0]:
            out += curve_figure(part, model_id, folder / f"curves__{stem}.png", formats)
        if len(randomisation) and (part := randomisation[randomisation["model_id"] == model_id]).shape[0]:
            out += randomisation_figure(part, model_id, folder / f"randomisation__{stem}.png", formats)
        if metrics["metric"].isin(["change_ratio", "region_ratio"]).any():
            out += localisation_figure(metrics, model_id, controls, folder / f"localisation__{stem}.png", formats)
    return out
