"""The assess stage's tidy metrics, Markdown summary and figures.

Every family's per-item results are turned into one long table (:func:`item_metrics`: ``model_id, method, image_id,
subject_id, target, metric, value``), which the breakdowns (:func:`gestalt_xai.assess.stats.breakdown`), the paired
tests and the summary read. The summary prints each number beside its control — the seeded random map for the
faithfulness curves, the area share (chance) and the random-model control for localisation, the unperturbed map for
the sanity checks — ranks the methods on each column by the metric's direction, and flags a method that does no better
than its random-map baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["COLUMNS", "Column", "item_metrics", "summary_table", "summarise", "draw_figures"]

RANDOM = "random"


@dataclass(frozen=True)
class Column:
    """One summary column: the metric, its label, which way is better, and its control: ``"random"`` (the seeded
    random map's value), ``"chance"`` (the mean of metric ``chance`` per item), ``"value:x"`` (a fixed reference) or
    ``""``."""

    metric: str
    label: str
    direction: str
    control: str = ""
    chance: str = ""
    #: how the ``chance`` reference is labelled in the summary
    chance_label: str = "chance"


#: the summary's columns, in order (a column without data in the run is left out)
COLUMNS: tuple[Column, ...] = (
    Column("deletion_auc", "deletion AUC", "lower", "random"),
    Column("insertion_auc", "insertion AUC", "higher", "random"),
    Column("morf_aopc", "MoRF AOPC", "higher", "random"),
    Column("lerf_aopc", "LeRF AOPC", "lower", "random"),
    Column("occlusion_spearman", "ρ with occlusion", "higher"),
    Column("change_ratio", "change-mask ratio", "higher", "value:1"),
    Column("region_ratio", "region-mask ratio", "higher", "value:1"),
    Column("change_pointing", "pointing game (change)", "higher", "chance", "change_area_share"),
    Column("region_pointing", "pointing game (region)", "higher", "chance", "region_area_share"),
    Column("change_rra", "rank accuracy (change)", "higher", "chance", "change_area_share"),
    Column("delta_rank_rho", "ρ(mass, Δscore)", "higher"),
    Column("mark_ratio", "mark ratio", "higher", "value:1"),
    Column("cascading_spearman", "ρ after cascading randomisation", "lower", "value:1"),
    Column("data_spearman", "ρ with the permuted-label model", "lower", "value:1"),
    Column("jitter_spearman", "ρ under landmark jitter", "higher", "chance", "jitter_spearman_nojitter",
           "no jitter"),
)


_KEY = ["model_id", "method", "image_id", "target"]
#: the first curve value of each curve: its summary metric
_CURVE_METRIC = {"deletion": ("deletion_auc", "auc"), "insertion": ("insertion_auc", "auc"),
                 "morf": ("morf_aopc", "aopc"), "lerf": ("lerf_aopc", "aopc")}


def _long(frame: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """``frame``'s ``columns`` (source → metric name) as long rows of :data:`_KEY` + metric, value."""
    parts = [frame[_KEY].assign(metric=name, value=frame[col].astype(np.float64))
             for col, name in columns.items() if col in frame.columns]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _faithfulness(t: pd.DataFrame) -> pd.DataFrame:
    first = t["baseline"].iloc[0] if len(t) else ""
    frames = []
    for (curve, baseline), part in t.groupby(["curve", "baseline"], sort=False):
        name, col = _CURVE_METRIC[str(curve)]
        suffix = "" if baseline == first else f"@{baseline}"
        frames.append(_long(part, {col: name + suffix}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _localisation(t: pd.DataFrame) -> pd.DataFrame:
    own = t[t["target_group"].astype(str).str.endswith(":own")]
    frames = []
    for kind, part in own.groupby("mask_kind", sort=True):
        features = part[part["feature"] != "mark"]
        per = features.groupby(_KEY, sort=True)[["ratio", "pointing", "rra", "area_share"]].mean().reset_index()
        frames.append(_long(per, {"ratio": f"{kind}_ratio", "pointing": f"{kind}_pointing", "rra": f"{kind}_rra",
                                  "area_share": f"{kind}_area_share"}))
        if kind == "change":
            mark = part[part["feature"] == "mark"].groupby(_KEY, sort=True)["ratio"].mean().reset_index()
            frames.append(_long(mark, {"ratio": "mark_ratio"}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _patients(t: pd.DataFrame) -> pd.DataFrame:
    part = t[(t["mask_kind"] == "change") & t["target_group"].astype(str).str.endswith(":own")]
    return _long(part, {"rho": "delta_rank_rho"})


def _randomisation(t: pd.DataFrame) -> pd.DataFrame:
    frames = []
    part = t[t["mode"] == "cascading"]
    if len(part):
        last = part[part["step"] == part["step"].max()]
        frames.append(_long(last, {"spearman": "cascading_spearman", "spearman_abs": "cascading_spearman_abs",
                                   "ssim": "cascading_ssim"}))
    data = t[t["mode"] == "data"]
    if len(data):
        frames.append(_long(data, {"spearman": "data_spearman", "ssim": "data_ssim"}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _robustness(t: pd.DataFrame) -> pd.DataFrame:
    jittered = t[t["draw"] > 0].groupby(_KEY, sort=True)[["spearman", "ssim"]].mean().reset_index()
    control = t[t["draw"] == 0].groupby(_KEY, sort=True)[["spearman"]].mean().reset_index()
    return pd.concat([_long(jittered, {"spearman": "jitter_spearman", "ssim": "jitter_ssim"}),
                      _long(control, {"spearman": "jitter_spearman_nojitter"})], ignore_index=True)


#: family table → its per-item metrics
METRIC_ADAPTERS = {
    "faithfulness": _faithfulness,
    "occlusion_agreement": lambda t: _long(t, {"spearman": "occlusion_spearman", "ssim": "occlusion_ssim"}),
    "localisation": _localisation,
    "localisation_patients": _patients,
    "randomisation": _randomisation,
    "robustness": _robustness,
}


def item_metrics(tables: Mapping[str, pd.DataFrame], images: pd.DataFrame) -> pd.DataFrame:
    """One long table of per-item values from the families' tables (those present)."""
    frames = [adapter(tables[name]) for name, adapter in METRIC_ADAPTERS.items()
              if name in tables and len(tables[name])]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["model_id", "target_kind", "method", "image_id", "subject_id", "target", "metric",
                                     "value"])
    long = pd.concat(frames, ignore_index=True)
    subjects = dict(zip(images["image_id"].astype(str), images["subject_id"].astype(str), strict=True))
    long["subject_id"] = long["image_id"].astype(str).map(subjects)
    long["value"] = long["value"].astype(np.float64)
    long["target_kind"] = long["target"].astype(str).str.split(":").str[0]
    cols = ["model_id", "target_kind", "method", "image_id", "subject_id", "target", "metric", "value"]
    return long[cols].sort_values(cols[:7], kind="stable").reset_index(drop=True)


def _mean(frame: pd.DataFrame) -> float:
    """Mean over subjects of subject means (images of one subject are not independent)."""
    from gestalt_xai.assess.stats import subject_means

    means = subject_means(frame["value"], frame["subject_id"])
    return float(means.mean()) if len(means) else float("nan")


def summary_table(metrics: pd.DataFrame, model_id: str, control_model: str | None = None,
                  target_kind: str | None = None) -> pd.DataFrame:
    """Per method of ``model_id`` (maps of ``target_kind``, default all): each column's subject-level mean, its
    control and its rank (1 = best)."""
    if target_kind is not None:
        metrics = metrics[metrics["target_kind"] == target_kind]
    part = metrics[metrics["model_id"] == model_id]
    methods = sorted(set(part["method"]) - {RANDOM})
    out = pd.DataFrame({"method": methods})
    for col in COLUMNS:
        rows = part[part["metric"] == col.metric]
        if not len(rows):
            continue
        values = [_mean(rows[rows["method"] == m]) for m in methods]
        out[col.metric] = values
        if col.control == "random":
            ref = _mean(rows[rows["method"] == RANDOM])
            out[f"{col.metric}:random"] = ref
            worse = [not _better(col.direction, v, ref) for v in values]
            out[f"{col.metric}:not_better_than_random"] = worse
        elif col.control == "chance":
            chance = part[part["metric"] == col.chance]
            out[f"{col.metric}:{col.chance_label}"] = [_mean(chance[chance["method"] == m]) for m in methods]
        elif col.control.startswith("value:"):
            out[f"{col.metric}:reference"] = float(col.control.split(":", 1)[1])
        if control_model is not None:
            ctrl = metrics[(metrics["model_id"] == control_model) & (metrics["metric"] == col.metric)]
            if len(ctrl):
                out[f"{col.metric}:control_model"] = [_mean(ctrl[ctrl["method"] == m]) for m in methods]
        ranked = pd.Series(values if col.direction == "higher" else [-v for v in values])
        out[f"{col.metric}:rank"] = ranked.rank(ascending=False, method="min").astype("Int64")
    ranks = [c for c in out.columns if c.endswith(":rank")]
    out["mean_rank"] = out[ranks].astype(float).mean(axis=1) if ranks else np.nan
    return out.sort_values(["mean_rank", "method"], kind="stable").reset_index(drop=True)


def _better(direction: str, a: float, b: float) -> bool:
    from gestalt_xai.assess.metric import better

    return bool(np.isfinite(a) and np.isfinite(b) and better(direction, a, b))  # type: ignore[arg-type]


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def _cell(row: Mapping[str, Any], col: Column) -> str:
    text = _fmt(row[col.metric])
    extra = []
    for suffix, name in ((":random", "random"), (f":{col.chance_label}", col.chance_label),
                         (":control_model", "control")):
        if f"{col.metric}{suffix}" in row:
            extra.append(f"{name} {_fmt(row[f'{col.metric}{suffix}'])}")
    flag = " ⚠" if row.get(f"{col.metric}:not_better_than_random") else ""
    return f"{text}{flag}" + (f" ({'; '.join(extra)})" if extra else "")


def summarise(metrics: pd.DataFrame, strata: pd.DataFrame, tests: pd.DataFrame, controls: Mapping[str, Any],
              results: Mapping[str, Any], notes: Sequence[str] = ()) -> tuple[str, list[str]]:
    """The Markdown summary and the stage's summary lines."""
    lines: list[str] = []
    md = ["# Assessment of the explanations", "",
          f"{results.get('patients', 0)} patients; every number is a mean over subjects of per-subject means, beside "
          "its control: the seeded random map (faithfulness), chance = the mask's area share or a fixed reference "
          "(localisation), the random-model control where the run has one. ⚠ marks a method that does no better "
          "than its random-map baseline. Ranks: 1 = best on that column; methods are sorted by their mean rank.", ""]
    md += [f"- {n}" for n in notes]
    if notes:
        md.append("")
    trained = sorted(set(metrics["model_id"]) - set(controls)) if len(metrics) else []
    reverse = {v: k for k, v in controls.items() if v is not None}
    groups = [(m, k) for m in trained for k in sorted(set(metrics.loc[metrics["model_id"] == m, "target_kind"]))]
    for model_id, kind in groups:
        table = summary_table(metrics, model_id, reverse.get(model_id), kind)
        cols = [c for c in COLUMNS if c.metric in table.columns]
        heads = " | ".join(f"{c.label} ({'↑' if c.direction == 'higher' else '↓'})" for c in cols)
        md += [f"## {model_id}, {kind} targets", "", f"| rank | method | {heads} |", "|---|---|" + "---|" * len(cols)]
        for i, row in enumerate(table.to_dict("records"), 1):
            md.append(f"| {i} | {row['method']} | " + " | ".join(_cell(row, c) for c in cols) + " |")
            flagged = [c.label for c in cols if row.get(f"{c.metric}:not_better_than_random")]
            if flagged:
                lines.append(f"{model_id} ({kind}): {row['method']} does no better than a random map on "
                             f"{', '.join(flagged)}")
        md.append("")
        if len(table):
            lines.insert(0, f"{model_id} ({kind}): methods by mean rank: " + ", ".join(table["method"]))
    if len(tests):
        sig = tests[tests["p_holm"] < 0.05] if "p_holm" in tests.columns else tests.iloc[:0]
        md += ["## Paired tests between methods", "",
               f"Wilcoxon signed-rank on per-subject values, Holm-adjusted within each metric: {len(sig)} of "
               f"{len(tests)} method pairs differ at p < 0.05 (`paired_tests.parquet`).", ""]
    if len(strata):
        md += ["## Strata", "", "Every per-item number by sex, age band and skin tone with subject-level bootstrap "
               "95 % intervals: `strata.parquet`.", ""]
    return "\n".join(md) + "\n", lines


def draw_figures(tables: Mapping[str, pd.DataFrame], metrics: pd.DataFrame, controls: list[str], folder: Path,
                 formats: tuple[str, ...]) -> list[Path]:
    """Mean curves with 95 % bands, randomisation curves and localisation bars with chance lines."""
    from gestalt_xai.assess import figures

    return figures.draw(tables, metrics, controls, folder, formats)
