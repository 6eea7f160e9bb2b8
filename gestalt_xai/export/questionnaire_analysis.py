"""Analysis of un-blinded questionnaire responses (:class:`~gestalt_xai.export.questionnaire_responses.Responses`).

* **Ratings per method** (:func:`method_ratings`): per method and Likert statement the mean over raters of each
  rater's mean rating (every rater weighs the same), with a percentile bootstrap interval over raters
  (:func:`scipy.stats.bootstrap`, Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13).
* **A/B preference** (:func:`preference_rates`): how often the first method of the pair was preferred among the
  answers that chose one, with the Wilson score interval (Wilson 1927, *JASA* 22:209–212;
  :meth:`scipy.stats.binomtest` ``proportion_ci(method="wilson")``) and the exact binomial test against 0.5.
* **Inter-rater agreement** (:func:`agreement`): Krippendorff's alpha (Krippendorff 2011, "Computing Krippendorff's
  alpha-reliability", Annenberg School for Communication; the ``krippendorff`` package of Castro) — ordinal for the
  Likert items (units: case × method × statement), nominal for the preference (units: cases, values: the preferred
  method or none) and for the region checklist (units: case × region group, values: ticked or not).
* **Clinicians vs. model regions** (:func:`region_agreement`): the share of raters ticking each anatomical group
  against the model's enrichment of that group (the atlas's image-left/right regions merged by
  :data:`~gestalt_xai.faces.regions.REGION_GROUP`: the group's share of positive attribution over its share of the
  face, from ``aggregate/region_syndromes.parquet``), as a Spearman correlation per case and method and the Jaccard
  overlap of the groups most raters ticked with the model's as many top groups.

Tables from simulated responses carry ``simulated = True``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats

from gestalt_xai.aggregate.annotate import OWN_TARGET_GROUPS
from gestalt_xai.errors import InputError
from gestalt_xai.export.questionnaire_responses import AnalystKey, Responses
from gestalt_xai.export.redcap import REGION_GROUPS
from gestalt_xai.faces.regions import REGION_GROUP

__all__ = ["agreement", "method_ratings", "model_group_scores", "preference_rates", "region_agreement",
           "scs_scores"]


def method_ratings(r: Responses, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per method and statement: ``mean`` (of rater means), ``ci_low``, ``ci_high``, ``median`` (of all ratings),
    ``n_ratings``, ``n_raters``, ``simulated``. One rater gives no interval (NaN)."""
    rows = []
    for (method, item), part in r.likert.groupby(["method", "item"], sort=True):
        per_rater = part.groupby("record_id")["value"].mean().to_numpy(np.float64)
        lo = hi = np.nan
        if len(per_rater) > 1 and np.ptp(per_rater) > 0:
            res = stats.bootstrap((per_rater,), np.mean, n_resamples=n_resamples, confidence_level=level,
                                  method="percentile", rng=np.random.default_rng(seed))
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        elif len(per_rater) > 1:
            lo = hi = float(per_rater[0])
        rows.append({"method": method, "item": item, "mean": float(per_rater.mean()), "ci_low": lo, "ci_high": hi,
                     "median": float(part["value"].median()), "n_ratings": len(part),
                     "n_raters": len(per_rater), "simulated": r.simulated})
    return pd.DataFrame(rows, columns=["method", "item", "mean", "ci_low", "ci_high", "median", "n_ratings",
                                       "n_raters", "simulated"])


def preference_rates(r: Responses, level: float = 0.95) -> pd.DataFrame:
    """Per preference pair (methods sorted): ``n_first``, ``n_second``, ``n_none``, ``rate_first`` = n_first /
    (n_first + n_second), its Wilson interval, the two-sided exact binomial p against 0.5, ``simulated``.

    Answers are pooled over raters and cases (each answer one trial), as in a sign test of the preferences.
    """
    rows = []
    pref = r.preference.assign(pair=[tuple(sorted(p)) for p in zip(r.preference["method_a"],
                                                                    r.preference["method_b"], strict=True)])
    for (first, second), part in pref.groupby("pair", sort=True):
        k, m = int((part["preferred"] == first).sum()), int((part["preferred"] == second).sum())
        row = {"method_first": first, "method_second": second, "n_first": k, "n_second": m,
               "n_none": int((part["preferred"] == "none").sum()), "rate_first": np.nan, "ci_low": np.nan,
               "ci_high": np.nan, "p_value": np.nan, "simulated": r.simulated}
        if k + m:
            test = stats.binomtest(k, k + m, 0.5)
            ci = test.proportion_ci(confidence_level=level, method="wilson")
            row.update(rate_first=k / (k + m), ci_low=float(ci.low), ci_high=float(ci.high),
                       p_value=float(test.pvalue))
        rows.append(row)
    return pd.DataFrame(rows)


def _alpha(table: pd.DataFrame, unit: list[str], value: str, level: str) -> tuple[float, int, int]:
    """Krippendorff's alpha of ``value`` over units ``unit`` (raters × units reliability matrix, NaN = missing)."""
    import krippendorff

    matrix = table.pivot_table(index="record_id", columns=unit, values=value, aggfunc="first")
    data = matrix.to_numpy(np.float64)
    n_units = int((np.sum(~np.isnan(data), axis=0) >= 2).sum())
    if data.shape[0] < 2 or n_units == 0 or len(np.unique(data[~np.isnan(data)])) < 2:
        return np.nan, data.shape[0], n_units
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement=level)), data.shape[0], n_units


def agreement(r: Responses) -> pd.DataFrame:
    """Krippendorff's alpha per kind of answer: ``what`` (``likert:<statement>``, ``likert:all``, ``preference``,
    ``regions``), ``level``, ``alpha``, ``n_raters``, ``n_units`` (units rated by two or more), ``simulated``.
    NaN where fewer than two raters or a single value overall leaves alpha undefined."""
    rows = []

    def add(what: str, table: pd.DataFrame, unit: list[str], value: str, level: str) -> None:
        a, n_r, n_u = (np.nan, 0, 0) if table.empty else _alpha(table, unit, value, level)
        rows.append({"what": what, "level": level, "alpha": a, "n_raters": n_r, "n_units": n_u,
                     "simulated": r.simulated})

    for item, part in r.likert.groupby("item", sort=True):
        add(f"likert:{item}", part, ["case_no", "method"], "value", "ordinal")
    add("likert:all", r.likert, ["case_no", "method", "item"], "value", "ordinal")
    pref = r.preference.copy()
    codes = {m: i for i, m in enumerate(sorted(set(pref["preferred"])))}
    pref["code"] = pref["preferred"].map(codes)
    add("preference", pref, ["case_no"], "code", "nominal")
    add("regions", r.regions, ["case_no", "region_group"], "ticked", "nominal")
    return pd.DataFrame(rows)


def scs_scores(r: Responses) -> pd.DataFrame:
    """Per rater the System Causability Scale score, sum of the ten answers / 50 (Holzinger, Carrington & Müller
    2020, *KI* 34:193–198); raters who left an item out get NaN."""
    g = r.scs.groupby("record_id")["value"]
    out = pd.DataFrame({"n_items": g.size(), "scs": g.sum() / 50.0}).reset_index()
    out.loc[out["n_items"] < 10, "scs"] = np.nan
    return out.assign(simulated=r.simulated)


def model_group_scores(region_table: pd.DataFrame, atlas: str = "template",
                       target_groups: tuple[str, ...] = OWN_TARGET_GROUPS, model: str | None = None,
                       id_column: str = "syndrome_id") -> pd.DataFrame:
    """The model's score per case (``id_column``: ``syndrome_id`` for ``region_syndromes.parquet``, ``subject_id``
    for ``region_subjects.parquet``), method and anatomical region group: shares and area shares of the group's atlas
    regions summed, ``enrichment`` = share / area share.

    Rows are those of ``atlas`` and ``model`` (default: the first model id in sort order, as the questionnaire's
    cases choose it, :mod:`~gestalt_xai.export.cases`) explaining towards the own diagnosis (``target_groups``);
    where a case and method have several of them, the first in ``target_groups`` order is used (as the cases do).
    A case and method left with more than one layer is ambiguous and raises :class:`~gestalt_xai.errors.InputError`
    (filter the table first).
    """
    need = {id_column, "method", "region", "share", "area_share", "atlas", "target_group", "model_id", "layer"}
    missing = sorted(need - set(region_table.columns))
    if missing:
        raise InputError(f"region table: columns {missing} missing")
    t = region_table[(region_table["atlas"] == atlas) & region_table["target_group"].isin(target_groups)]
    if len(t):
        t = t[t["model_id"] == (model if model is not None else sorted(t["model_id"])[0])]
    rank = t["target_group"].map({g: i for i, g in enumerate(target_groups)})
    t = t[rank == rank.groupby([t[id_column], t["method"]]).transform("min")]
    variants = t.groupby([id_column, "method"])["layer"].nunique()
    if (variants > 1).any():
        raise InputError("region table: several layers per case and method; select one before comparing with the "
                         "clinicians' checklists")
    t = t.assign(region_group=t["region"].map(REGION_GROUP)).dropna(subset=["region_group"])
    g = t.groupby([id_column, "method", "region_group"], sort=True)[["share", "area_share"]].sum().reset_index()
    with np.errstate(divide="ignore", invalid="ignore"):
        g["enrichment"] = np.where(g["area_share"] > 0, g["share"] / g["area_share"], np.nan)
    return g.rename(columns={id_column: "unit_id"})


def region_agreement(r: Responses, key: AnalystKey, region_table: pd.DataFrame, atlas: str = "template",
                     model: str | None = None, id_column: str = "syndrome_id",
                     unit_of: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Per case and method: ``spearman`` (share of raters ticking each group vs. the model's group enrichment),
    ``jaccard`` (groups ticked by more than half the raters vs. the model's as many highest-enrichment groups; NaN
    when no group has a majority), ``n_raters``, ``simulated``.

    Syndrome cases are scored from ``region_syndromes.parquet`` (``id_column`` ``syndrome_id``); patient cases from
    ``region_subjects.parquet`` (``id_column`` ``subject_id``, ``unit_of``: the case's raw id, an image id → its
    subject id). See :func:`model_group_scores` for ``atlas`` and ``model``."""
    model_scores = model_group_scores(region_table, atlas, model=model, id_column=id_column)
    unit = {p: (unit_of or {}).get(str(i), str(i)) for p, i in zip(key.cases["pseudonym"], key.cases["raw_id"],
                                                                     strict=True)}
    rows = []
    for (case_no, pseudonym), part in r.regions.groupby(["case_no", "pseudonym"], sort=True):
        rate = part.groupby("region_group")["ticked"].mean().reindex(list(REGION_GROUPS))
        n_raters = part["record_id"].nunique()
        majority = set(rate.index[rate > 0.5])
        for method in sorted(set(key.blinding.loc[key.blinding["pseudonym"] == pseudonym, "method"])):
            m = model_scores[(model_scores["unit_id"] == unit[pseudonym]) & (model_scores["method"] == method)]
            if m.empty:
                continue
            enr = m.set_index("region_group")["enrichment"].reindex(list(REGION_GROUPS))
            ok = enr.notna()
            rho = stats.spearmanr(rate[ok], enr[ok]).statistic if rate[ok].nunique() > 1 else np.nan
            jac = np.nan
            if majority:
                top = set(enr[ok].sort_values(ascending=False, kind="stable").index[: len(majority)])
                jac = len(top & majority) / len(top | majority)
            rows.append({"case_no": int(case_no), "pseudonym": pseudonym, "method": method,
                         "spearman": float(rho), "jaccard": jac, "n_raters": n_raters, "simulated": r.simulated})
    return pd.DataFrame(rows, columns=["case_no", "pseudonym", "method", "spearman", "jaccard", "n_raters",
                                       "simulated"])
