"""The class-imbalance experiment's tables, contrasts, figure and summary, from its finished units.

Per probe map (one image, target, method and layer) of every (variant, seed) unit
(:mod:`gestalt_xai.experiments.imbalance_unit`):

* **similarity** (``similarity.parquet``): :func:`~gestalt_xai.assess.compare.compare_maps` of the map with the same
  map of every *other* seed of the same variant (``pair = "seed"``: the noise floor) and of every other seed of the
  reference variant (``pair = "reference"``); other seeds only, so the reference's similarity to itself *is* its
  noise floor and every variant is read against it on the same footing;
* **localisation ratio** (RMA / area share on the planted features' ``region`` masks, mark left out; the assess
  stage's :class:`~gestalt_xai.assess.localisation.Localiser`), **Δscore-rank agreement** (ρ between per-feature RMA
  and the variant's own Δscore, ``change`` masks) and **deletion gap** (deletion AUC of the seeded random map minus
  the map's; higher: removing what the map ranks first lowers the score faster than removing pixels at random — a
  difference of AUCs of one model, so models with other score scales stay comparable);
* **accuracy** of the focus syndrome's test images (classifier and matching top-1) per unit.

**Contrasts** (``effects.parquet``; pre-declared: the subsampled syndrome's probe patients, ``group = "focus"``, and as
a negative control the other syndromes' probe patients, ``group = "other"``, whose training data no subsample
variant changes). Per measure, target and method: every variant's per-subject mean over seeds (and images) minus the
reference's — for similarity the reference's value is the noise floor, so a difference is the loss of similarity
beyond seed noise — and, across the subsample levels (the reference at its full size), the per-subject
least-squares slope against log₂ training subjects of the focus syndrome. Means and 95 % intervals are subject
bootstraps (:func:`~gestalt_xai.assess.stats.subject_bootstrap`; photos of a subject are not independent). A trend is
*measurable* when the slope's interval excludes 0; a level differs *beyond seed noise* when its difference's interval
excludes 0; otherwise the summary says there is no effect beyond seed noise.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.assess.compare import compare_maps
from gestalt_xai.assess.stats import subject_bootstrap
from gestalt_xai.runs import Run, atomic_write_text, write_parquet
from gestalt_xai.store import KEY_COLUMNS, MapStore

log = logging.getLogger(__name__)

__all__ = ["make_tables", "similarity_table", "contrasts", "MEASURES"]

#: measure → (column, direction, label); direction +1: higher is better
MEASURES = {"similarity": ("value", 1, "similarity to the reference"),
            "localisation": ("ratio", 1, "localisation ratio (planted regions)"),
            "rank_agreement": ("rho", 1, "Δscore-rank agreement ρ"),
            "deletion_gap": ("gap", 1, "deletion gap to a random map")}
_MAP = ["image_id", "target", "method", "layer"]


def _unit_index(units: Mapping[str, Any]) -> dict[tuple[str, int], Path]:
    return {(u.payload.variant, u.payload.seed): u.out for u in units.values()}


def similarity_table(outs: Mapping[tuple[str, int], Path], reference: str, metrics: list[str]) -> pd.DataFrame:
    """Every pair of units (module docstring) compared on their common probe maps: one row per map, pair and
    metric (``variant, seed, variant_b, seed_b, pair, image_id, target, method, layer, metric, value``)."""
    stores = {k: MapStore(p / "maps") for k, p in outs.items()}
    index = {k: s.index().sort_values(KEY_COLUMNS, kind="stable").set_index(_MAP) for k, s in stores.items()}
    pairs = []
    variants = sorted({v for v, _ in outs})
    for v in variants:
        seeds = sorted(s for w, s in outs if w == v)
        pairs += [((v, a), (v, b), "seed") for a, b in itertools.combinations(seeds, 2)]
        if v != reference:
            pairs += [((v, a), (reference, b), "reference") for a in seeds for (w, b) in sorted(outs)
                      if w == reference and b != a]
    frames = []
    cache: dict[tuple[str, int], dict[Any, np.ndarray]] = {}

    def maps(k: tuple[str, int]) -> dict[Any, np.ndarray]:
        if k not in cache:
            rows = index[k]
            arrays = stores[k].load_many(rows.reset_index())
            cache[k] = dict(zip(rows.index, arrays, strict=True))
        return cache[k]

    for a, b, kind in pairs:
        ma, mb = maps(a), maps(b)
        keys = sorted(set(ma) & set(mb))
        if not keys:
            continue
        values = compare_maps(np.stack([ma[k] for k in keys]), np.stack([mb[k] for k in keys]), metrics)
        base = pd.DataFrame(keys, columns=_MAP).assign(variant=a[0], seed=a[1], variant_b=b[0], seed_b=b[1],
                                                       pair=kind)
        frames += [base.assign(metric=m, value=np.asarray(values[m], np.float64)) for m in metrics]
    cols = ["variant", "seed", "variant_b", "seed_b", "pair", *_MAP, "metric", "value"]
    if not frames:
        return pd.DataFrame(columns=cols)
    return pd.concat(frames, ignore_index=True)[cols].sort_values(cols[:-1], kind="stable").reset_index(drop=True)


def _concat(outs: Mapping[tuple[str, int], Path], name: str) -> pd.DataFrame:
    frames = []
    for (v, s), p in sorted(outs.items()):
        f = pd.read_parquet(p / f"{name}.parquet")
        if len(f):
            frames.append(f.assign(variant=v, seed=s))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _per_map(tables: dict[str, pd.DataFrame], reference: str, metric: str) -> pd.DataFrame:
    """One row per (variant, seed, map) and measure: ``variant, seed, image_id, target, method, measure, value``."""
    parts = []
    sim = tables["similarity"]
    if len(sim):
        s = sim[(sim["metric"] == metric) & ((sim["pair"] == "reference") | (sim["variant"] == reference))]
        # the reference's floor counts every seed pair from both ends; a variant's pairs from its own seed
        mirrored = s[s["variant"] == reference].assign(seed=lambda f: f["seed_b"])
        s = pd.concat([s, mirrored], ignore_index=True)
        parts.append(s.groupby(["variant", "seed", *_MAP[:3]], sort=True)["value"].mean().reset_index()
                     .assign(measure="similarity"))
    loc = tables["localisation"]
    if len(loc):
        region = loc[(loc["mask_kind"] == "region") & (loc["feature"] != "mark")]
        parts.append(region.groupby(["variant", "seed", *_MAP[:3]], sort=True)["ratio"].mean().rename("value")
                     .reset_index().assign(measure="localisation"))
    agree = tables["rank_agreement"]
    if len(agree):
        kind = "change" if (agree["mask_kind"] == "change").any() else "region"
        a = agree[agree["mask_kind"] == kind]
        parts.append(a.groupby(["variant", "seed", *_MAP[:3]], sort=True)["rho"].mean().rename("value")
                     .reset_index().assign(measure="rank_agreement"))
    faith = tables["faithfulness"]
    if len(faith):
        rnd = faith[faith["method"] == "random"].set_index(["variant", "seed", "image_id", "target"])["auc"]
        f = faith[faith["method"] != "random"].copy()
        f["value"] = rnd.reindex(pd.MultiIndex.from_frame(f[["variant", "seed", "image_id", "target"]])).to_numpy() \
            - f["auc"].to_numpy()
        parts.append(f[["variant", "seed", "image_id", "target", "method", "value"]].assign(measure="deletion_gap"))
    cols = ["variant", "seed", "image_id", "target", "method", "measure", "value"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def contrasts(per_map: pd.DataFrame, probe: pd.DataFrame, sizes: Mapping[str, int], focus: str | None,
              reference: str, seed: int = 0) -> pd.DataFrame:
    """The pre-declared contrasts (module docstring): per group, measure, target, method and variant, the per-subject
    difference from the reference (``level`` rows) and, over the subsample levels, the slope per doubling of the focus
    syndrome's training subjects (``variant = "slope"``); subject-bootstrap mean and 95 % interval."""
    frame = per_map.merge(probe[["image_id", "subject_id", "syndrome_id"]], on="image_id", how="inner")
    frame["group"] = np.where(frame["syndrome_id"] == focus, "focus", "other")
    keys = ["group", "measure", "target", "method"]
    subj = frame.groupby([*keys, "variant", "subject_id"], sort=True)["value"].mean().reset_index()
    band = _noise_band(frame, keys)
    rows = []
    for (group, measure, target, method), g in subj.groupby(keys, sort=True):
        table = g.pivot(index="subject_id", columns="variant", values="value")
        if reference not in table:
            continue
        key = {"group": group, "measure": measure, "target": target, "method": method,
               "noise_band": band.get((group, measure, target, method), np.nan)}
        ref = table[reference]
        for variant in table.columns:
            diff = (table[variant] - ref).dropna()
            mean, lo, hi = subject_bootstrap(diff.to_numpy(), diff.index.to_numpy(), seed=seed)
            rows.append({**key, "variant": variant, "train_subjects": sizes.get(variant, -1),
                         "value": float(table[variant].mean()), "reference_value": float(ref.mean()),
                         "effect": mean, "ci_lo": lo, "ci_hi": hi, "n_subjects": len(diff)})
        levels = [v for v in table.columns if v in sizes and (v == reference or v.startswith("sub"))]
        if focus is not None and len(levels) >= 2:
            x = np.log2([sizes[v] for v in levels])
            slopes = {s: np.polyfit(x[ok], y[ok], 1)[0] for s, y in zip(table.index, table[levels].to_numpy(),
                                                                          strict=True)
                      if (ok := np.isfinite(y)).sum() >= 2 and np.ptp(x[ok]) > 0}
            mean, lo, hi = subject_bootstrap(list(slopes.values()), list(slopes), seed=seed)
            # the slope's change over the range of sizes, to read beside the noise band
            rows.append({**key, "variant": "slope", "train_subjects": -1, "value": mean * float(np.ptp(x)),
                         "reference_value": float(ref.mean()), "effect": mean, "ci_lo": lo, "ci_hi": hi,
                         "n_subjects": len(slopes)})
    cols = ["group", "measure", "target", "method", "variant", "train_subjects", "value", "reference_value",
            "effect", "ci_lo", "ci_hi", "n_subjects", "noise_band"]
    return pd.DataFrame(rows, columns=cols)


def _noise_band(frame: pd.DataFrame, keys: list[str]) -> dict[tuple[str, ...], float]:
    """Per group of ``keys``: the seed noise of a difference of two variants' means — ``2·σ·√(2/k)``, with ``σ`` the
    standard deviation across seeds of a variant's mean over the group's probe maps (pooled over variants) and ``k``
    the seeds per variant: about the 95 % band of a difference that seeds alone would make."""
    per_seed = frame.groupby([*keys, "variant", "seed"], sort=True)["value"].mean().reset_index()
    out = {}
    for key, g in per_seed.groupby(keys, sort=True):
        var = g.groupby("variant")["value"].var(ddof=1).dropna()
        k = g.groupby("variant")["seed"].nunique().median()
        out[key] = float(2 * np.sqrt(var.mean()) * np.sqrt(2 / k)) if len(var) else np.nan
    return out


def _beyond(rows: pd.DataFrame | pd.Series, change: str = "effect") -> np.ndarray:
    """Whether each row's interval excludes 0 and its ``change`` (``effect``; a slope's ``value``: the change over
    the sizes) exceeds the noise band."""
    lo, hi, ch, band = (np.asarray(rows[c], np.float64) for c in ("ci_lo", "ci_hi", change, "noise_band"))
    return ((lo > 0) | (hi < 0)) & (np.abs(ch) > np.nan_to_num(band))


def _verdict(slope: pd.Series | None, levels: pd.DataFrame) -> str:
    beyond = levels[_beyond(levels)]
    if slope is not None and bool(_beyond(slope, "value")):
        return "a measurable trend"
    if levels["ci_lo"].isna().all():
        return "too few subjects for an interval"
    if len(beyond):
        return f"differences beyond seed noise at {', '.join(beyond['variant'])}, no monotone trend"
    return "no effect beyond seed noise"


def _summary(effects: pd.DataFrame, tables: dict[str, pd.DataFrame], design: Any, probe: pd.DataFrame,
             cfg: Any) -> list[str]:
    focus = design.focus
    lines = ["# Class-imbalance experiment", "",
             f"Variants: {', '.join(sorted(design.variants))}; seeds {cfg.seeds}; reference `{cfg.reference}`. "
             f"Probe: {len(probe)} test images of {probe['subject_id'].nunique()} subjects, declared before training "
             f"(`probe.parquet`)." + (f" Subsampled syndrome: {focus} ({design.train_subjects[focus]} training "
                                      f"subjects in the reference)." if focus else ""), "",
             "Effects are per-subject differences from the reference (similarity: from the reference's seed-to-seed "
             "similarity, the noise floor), subject-bootstrap 95 % intervals; slopes per doubling of training "
             "subjects.", "", "## Findings", ""]
    metric = cfg.comparisons[0]
    for (measure, target, method), g in effects[effects["group"] == "focus"].groupby(["measure", "target",
                                                                                      "method"], sort=True):
        label = MEASURES[measure][2] + (f" ({metric})" if measure == "similarity" else "")
        slope = g[g["variant"] == "slope"]
        levels = g[(g["variant"] != "slope") & (g["variant"] != cfg.reference)]
        sub = levels[levels["variant"].str.startswith("sub")].sort_values("train_subjects")
        smallest = sub.iloc[0] if len(sub) else None
        ref = g[g["variant"] == cfg.reference]
        head = f"- {label}, {method}, {target} targets, {focus} patients ({int(g['n_subjects'].max())} subjects): "
        text = f"reference {float(ref['value'].iloc[0]):.3f}" if len(ref) else ""
        if smallest is not None:
            text += (f"; at {int(smallest['train_subjects'])} training subjects {smallest['value']:.3f} "
                     f"(Δ {smallest['effect']:+.3f}, CI {smallest['ci_lo']:+.3f} … {smallest['ci_hi']:+.3f})")
        if len(slope):
            s = slope.iloc[0]
            text += (f"; slope {s['effect']:+.3f} per doubling (CI {s['ci_lo']:+.3f} … {s['ci_hi']:+.3f}), "
                     f"{s['value']:+.3f} over the sizes; seed noise band ±{s['noise_band']:.3f}")
        lines.append(head + text + f" → {_verdict(slope.iloc[0] if len(slope) else None, levels)}.")
    other = effects[(effects["group"] == "other") & effects["variant"].str.startswith("sub")]
    if len(other):
        flagged = other[_beyond(other)]
        lines += ["", f"Negative control (probe patients of the other syndromes, whose training data no subsample "
                      f"variant changes): {len(flagged)} of {len(other)} differences lie beyond seed noise (with 95 % "
                      f"intervals about {0.05 * len(other):.0f} would by chance alone)."]
    acc = tables["accuracy"]
    if focus and len(acc):
        a = acc[acc["syndrome_id"] == focus].groupby("variant")[["classifier_top1", "matching_top1"]]
        lines += ["", f"Accuracy on {focus}'s test images (mean over seeds, min–max):"]
        for v, row in sorted(a.mean().iterrows(), key=lambda vr: -design.sizes.get(vr[0], 0)):
            lo, hi = a.min().loc[v], a.max().loc[v]
            lines.append(f"- {v} ({design.sizes.get(v, '?')} training subjects): classifier top-1 "
                         f"{row['classifier_top1']:.2f} [{lo['classifier_top1']:.2f}–{hi['classifier_top1']:.2f}], "
                         f"matching top-1 {row['matching_top1']:.2f} [{lo['matching_top1']:.2f}–"
                         f"{hi['matching_top1']:.2f}]")
    floor = tables["similarity"]
    if len(floor):
        f = floor[(floor["pair"] == "seed") & (floor["variant"] == cfg.reference) & (floor["metric"] == metric)]
        by = f.groupby("method")["value"]
        lines += ["", f"Noise floor ({metric} between seeds of `{cfg.reference}`, per method): "
                  + "; ".join(f"{m} {v.mean():.3f} [{v.min():.3f}–{v.max():.3f}]" for m, v in by)]
    return lines


def _band(ax: Any, groups: Any, label: str) -> Any:
    """The mean of each x's values (line) and their range (band), finite values only; the line (None: nothing)."""
    mean, lo, hi = groups.mean(), groups.min(), groups.max()
    ok = np.isfinite(mean.to_numpy(np.float64))
    if not ok.any():
        return None
    x = mean.index.to_numpy(np.float64)[ok]
    (line,) = ax.plot(x, mean.to_numpy()[ok], marker="o", label=label)
    ax.fill_between(x, lo.to_numpy()[ok], hi.to_numpy()[ok], alpha=0.2, color=line.get_color())
    return line


def _figure(per_map: pd.DataFrame, probe: pd.DataFrame, acc: pd.DataFrame, design: Any, path: Path,
            reference: str = "full") -> None:
    """Each measure of the focus syndrome's probe patients against its training subjects: per method the mean over
    seeds (line) and the seeds' range (band); the reference's seed-to-seed similarity is the similarity panel's
    floor."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gestalt_xai.viz import save_figure

    focus = design.focus
    frame = per_map[per_map["image_id"].isin(probe.loc[probe["syndrome_id"] == focus, "image_id"])]
    frame = frame[frame["variant"].isin(list(design.sizes))].assign(n=lambda f: f["variant"].map(design.sizes))
    measures = [m for m in MEASURES if m in set(frame["measure"])]
    fig, axes = plt.subplots(1, len(measures) + 1, figsize=(3.2 * (len(measures) + 1), 3.0), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=False):
        sub = frame[frame["measure"] == measure]
        for method, g in sub.groupby("method", sort=True):
            line = _band(ax, g.groupby(["n", "seed"])["value"].mean().groupby(level=0), method)
            ref = g.loc[g["variant"] == reference, "value"].mean()
            if measure == "similarity" and line is not None and np.isfinite(ref):  # the noise floor
                ax.axhline(ref, color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.set_title(MEASURES[measure][2], fontsize=8)
    ax = axes[0][-1]
    a = acc[acc["syndrome_id"] == focus] if len(acc) else acc
    a = a.assign(n=a["variant"].map(design.sizes)).dropna(subset=["n"]) if len(a) else a
    for col in ("classifier_top1", "matching_top1") if len(a) else ():
        _band(ax, a.groupby("n")[col], col)
    ax.set_title(f"{focus} test accuracy", fontsize=8)
    for ax in axes[0]:
        if ax.has_data():
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes, fontsize=7)
        ax.set_xlabel(f"{focus} training subjects", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def make_tables(run: Run, cfg: Any, design: Any, probe: pd.DataFrame, units: Mapping[str, Any],
                root: Path) -> list[str]:
    """Write every table, the figure and ``summary.md`` of the finished ``units`` into ``root``; the summary's
    lines."""
    outs = _unit_index(units)
    tables = {"similarity": similarity_table(outs, cfg.reference, list(cfg.comparisons))}
    for name in ("training", "accuracy", "localisation", "rank_agreement", "faithfulness"):
        tables[name] = _concat(outs, name)
    for name, table in tables.items():
        write_parquet(table.reset_index(drop=True), root / f"{name}.parquet")
    per_map = _per_map(tables, cfg.reference, cfg.comparisons[0])
    effects = contrasts(per_map, probe, design.sizes or {v: -1 for v in design.variants}, design.focus,
                        cfg.reference, cfg.seed)
    write_parquet(effects, root / "effects.parquet")
    lines = _summary(effects, tables, design, probe, cfg)
    atomic_write_text(root / "summary.md", "\n".join(lines) + "\n")
    if design.focus is not None and len(per_map):
        _figure(per_map, probe, tables["accuracy"], design, root / "trend.png", cfg.reference)
    else:
        _placeholder_figure(root / "trend.png")
    return lines


def _placeholder_figure(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gestalt_xai.viz import save_figure

    fig, ax = plt.subplots(figsize=(3, 1))
    ax.axis("off")
    ax.text(0.5, 0.5, "no subsample variants: no trend to draw", ha="center", fontsize=7)
    save_figure(fig, path)
    plt.close(fig)
