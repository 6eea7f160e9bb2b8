"""The ``questionnaire`` and ``questionnaire-analysis`` stages: a clinician questionnaire out of an aggregated run, and
the analysis of the answers that come back.

``questionnaire`` (export) writes::

    questionnaire/images/, redcap/, limesurvey/, booklet/   the rater-facing files (gestalt_xai.export.questionnaire;
                                                            booklet/<name>.pdf printed by headless Chromium)
    private/questionnaire/blinding_key.csv, cases_key.csv, regions_key.csv, definition.json   the analyst's key

The definition (``definition``: a YAML file, default ``questionnaires/default.yaml``; ``overrides`` merged into it,
e.g. ``{"cases": {"n": 4}}``) is validated before any work, a bad one failing with its file and field named. The
export is scanned for the cohort's image, subject and syndrome ids and file names before the stage reports success.

``questionnaire-analysis`` reads REDCap raw-data exports or LimeSurvey response exports
(:mod:`~gestalt_xai.export.limesurvey_responses`; ``responses``: paths, pooled over files) or, with
``simulate: {raters: N}``, writes ``questionnaire/analysis/simulated_responses.csv`` and analyses that (every table
has ``simulated = True`` and the summary says SIMULATED). It un-blinds with the run's key and writes under
``questionnaire/analysis/``: ``ratings.parquet``, ``preference.parquet``, ``agreement.parquet``, ``scs.parquet``,
``region_agreement.parquet`` (when ``aggregate/region_syndromes.parquet`` exists), ``summary.md`` (every number
beside its interval or chance level) and ``ratings.png``, ``preference.png``. A response file that cannot be used is
one error row naming it, and the others are analysed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gestalt_xai.config import StageConfig, load_yaml, validate_config
from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.export.browser import find_chromium, require_chromium
from gestalt_xai.export.questionnaire import FORMATS, export_run_questionnaire
from gestalt_xai.export.questionnaire_def import QuestionnaireDef
from gestalt_xai.runs import ErrorRow, Run, atomic_write_bytes, write_parquet
from gestalt_xai.stages import StageResult, stage

log = logging.getLogger(__name__)

__all__ = ["AnalysisConfig", "QuestionnaireConfig", "questionnaire_analysis_stage", "questionnaire_stage"]

#: the questionnaire shipped with the toolkit
DEFAULT_DEFINITION = Path(__file__).resolve().parents[2] / "questionnaires" / "default.yaml"
OUT = "questionnaire"
KEY_DIR = "private/questionnaire"
ANALYSIS = "questionnaire/analysis"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class QuestionnaireConfig(StageConfig):
    """Options of the ``questionnaire`` stage."""

    definition: Path = Field(DEFAULT_DEFINITION, description="questionnaire definition (YAML)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="merged into the definition, e.g. "
                                                                         "{cases: {n: 4}}")
    formats: list[Literal["redcap", "limesurvey", "booklet"]] = Field(default_factory=lambda: list(FORMATS),
                                                                      min_length=1)
    pdf: Literal["auto", "always", "never"] = Field(
        "auto", description="print the booklet to PDF in headless Chromium: auto (when Chromium is installed), "
                            "always (fails before work without it), never")
    seed: int | None = Field(None, description="order and blinding seed (default: the definition's)")

    @model_validator(mode="after")
    def _valid_definition(self) -> QuestionnaireConfig:
        self.resolved()
        if self.pdf == "always":
            if "booklet" not in self.formats:
                raise ValueError("pdf: always prints the booklet: add 'booklet' to formats")
            require_chromium("pdf")
        return self

    def chromium(self) -> str | None:
        """The Chromium that prints the PDF, or ``None`` for no PDF."""
        if self.pdf == "never" or "booklet" not in self.formats:
            return None
        return find_chromium() if self.pdf == "auto" else require_chromium("pdf")

    def resolved(self) -> QuestionnaireDef:
        """The validated definition with ``overrides`` and ``seed`` applied (:class:`ConfigError` naming the file
        and field)."""
        if not Path(self.definition).is_file():
            raise ConfigError(f"definition: {self.definition} not found")
        data = _merge(load_yaml(self.definition) or {}, self.overrides)
        if self.seed is not None:
            data["seed"] = self.seed
        return validate_config(QuestionnaireDef, data, where=str(self.definition))


def _forbidden(run: Run) -> set[str]:
    from gestalt_xai.export.privacy import forbidden_values

    try:
        images = run.cohort().images
    except (InputError, FileNotFoundError):
        return set()
    return forbidden_values(pd.concat([images["image_id"], images["subject_id"]]), images["path"])


@stage("questionnaire", options=QuestionnaireConfig, order=95,
       summary="clinician questionnaire: REDCap dictionary and instrument ZIPs, LimeSurvey, HTML booklet (blinded)",
       reads=("aggregate",), writes=(OUT, KEY_DIR),
       example="gestalt-xai questionnaire --run runs/demo --set seed=3",
       tiny_options={"overrides": {"cases": {"n": 2, "min_subjects": 3},
                                   "maps": {"methods": ["gradcam", "hirescam", "saliency"], "per_case": 2,
                                            "preference": ["gradcam", "hirescam"]}},
                     "formats": ["redcap", "booklet"]})
def questionnaire_stage(run: Run, cfg: QuestionnaireConfig) -> StageResult:
    """Run the questionnaire export on ``run``; see the module docstring."""
    q = cfg.resolved()
    chromium = cfg.chromium()
    written = export_run_questionnaire(run, q, run.dir(OUT), forbidden=_forbidden(run), key_dir=KEY_DIR,
                                       formats=cfg.formats, pdf=chromium)
    definition = run.path / KEY_DIR / "definition.json"
    atomic_write_bytes(definition, (json.dumps(q.model_dump(mode="json"), indent=1, sort_keys=True) + "\n").encode())
    n_cases = pd.read_csv(written["key:cases_key"]).shape[0]
    outputs = {k: v for k, v in written.items() if not k.startswith("image:")}
    return StageResult(items=n_cases, outputs=outputs | {"definition": definition},
                       summary=[f"{n_cases} cases exported as {', '.join(cfg.formats)} into "
                                f"{run.relative(run.path / OUT)}; the analyst key is in {KEY_DIR}/ "
                                "(never send it to raters)"]
                       + (["no PDF: Chromium is not installed (pdf: auto)"]
                          if chromium is None and cfg.pdf == "auto" and "booklet" in cfg.formats else []))


class SimulateOptions(BaseModel):
    """Simulated raters (to exercise the analysis; everything built from them is labelled SIMULATED)."""

    model_config = ConfigDict(extra="forbid")
    raters: int = Field(ge=2, le=500)
    method_quality: dict[str, float] = Field(default_factory=dict)


class AnalysisConfig(StageConfig):
    """Options of the ``questionnaire-analysis`` stage."""

    responses: list[Path] = Field(default_factory=list, description="REDCap raw-data or LimeSurvey (question "
                                                                    "codes, answer codes) CSV exports, pooled")
    simulate: SimulateOptions | None = None
    seed: int = Field(0, description="seeds the simulation and the bootstrap intervals")
    n_resamples: int = Field(2000, ge=100)
    atlas: str = "template"

    @model_validator(mode="after")
    def _one_source(self) -> AnalysisConfig:
        if bool(self.responses) == (self.simulate is not None):
            raise ValueError("give either `responses` (files) or `simulate: {raters: N}`, not both or neither")
        return self


def _is_limesurvey(path: Path) -> bool:
    """A LimeSurvey export starts with the response ``id``; a REDCap export with ``record_id``."""
    try:
        with path.open(encoding="utf-8-sig") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return first.strip().strip('"').split('"')[0].split(",")[0].split(";")[0] == "id"


def _pool(parts: list[Any]) -> Any:
    from dataclasses import fields, replace

    first = parts[0]
    tables = {f.name: pd.concat([getattr(p, f.name) for p in parts], ignore_index=True)
              for f in fields(first) if isinstance(getattr(first, f.name), pd.DataFrame)}
    return replace(first, **tables, simulated=all(p.simulated for p in parts),
                   source="; ".join(p.source for p in parts))


def _fmt(x: float, d: int = 2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{d}f}"


def _summary(q: QuestionnaireDef, r: Any, ratings: pd.DataFrame, pref: pd.DataFrame, agree: pd.DataFrame,
             scs: pd.DataFrame, regions: pd.DataFrame | None, n_files: int) -> str:
    likert = q.item("likert")
    mid = (len(likert.scale) + 1) / 2 if likert is not None else 3.0
    n_raters = r.background.shape[0]
    lines = [f"# Questionnaire {q.name}: analysis", ""]
    if r.simulated:
        lines += ["**SIMULATED responses** — these numbers exercise the analysis; they say nothing about clinicians.",
                  ""]
    lines += [f"{n_raters} raters from {n_files} file(s); intervals are 95 %.", "", "## Ratings per method", "",
              f"Mean of rater means (1–{len(likert.scale) if likert else 5}), bootstrap interval over raters; "
              f"the scale's neutral midpoint is {mid:g}.", "",
              "| method | statement | mean [95 % CI] | vs. neutral | raters |", "|---|---|---|---|---|"]
    for _, t in ratings.iterrows():
        side = "above" if t["ci_low"] > mid else "below" if t["ci_high"] < mid else "includes"
        lines.append(f"| {t['method']} | {t['item']} | {_fmt(t['mean'])} [{_fmt(t['ci_low'])}, {_fmt(t['ci_high'])}]"
                     f" | {side} {mid:g} | {t['n_raters']} |")
    lines += ["", "## A/B preference", "", "Share preferring the first method among answers that chose one; Wilson "
              "interval; exact binomial test against chance 0.5.", "",
              "| pair | preferred first [95 % CI] | chance | p | n (first/second/none) |", "|---|---|---|---|---|"]
    for _, t in pref.iterrows():
        lines.append(f"| {t['method_first']} vs {t['method_second']} | {_fmt(t['rate_first'])} "
                     f"[{_fmt(t['ci_low'])}, {_fmt(t['ci_high'])}] | 0.50 | {_fmt(t['p_value'], 3)} | "
                     f"{t['n_first']}/{t['n_second']}/{t['n_none']} |")
    lines += ["", "## Inter-rater agreement (Krippendorff's alpha)", "",
              "0 is chance-level agreement, 1 perfect; Krippendorff (2004) accepts tentative conclusions from 0.667.",
              "", "| answers | level | alpha | chance | raters | units |", "|---|---|---|---|---|---|"]
    for _, t in agree.iterrows():
        lines.append(f"| {t['what']} | {t['level']} | {_fmt(t['alpha'], 3)} | 0 | {t['n_raters']} | {t['n_units']} |")
    if not scs.empty:
        vals = scs["scs"].dropna().to_numpy()
        lines += ["", "## System Causability Scale", "",
                  f"Mean SCS {_fmt(vals.mean() if len(vals) else np.nan)} over {len(vals)} complete raters "
                  f"(range {_fmt(vals.min() if len(vals) else np.nan)}–{_fmt(vals.max() if len(vals) else np.nan)}; "
                  "0.2 = all 'strongly disagree', 1 = all 'strongly agree', 0.6 = neutral)."]
    if regions is not None and not regions.empty:
        lines += ["", "## Clinicians' regions vs. the model's", "",
                  "Spearman correlation per case of the share of raters ticking a region group with the model's "
                  "enrichment of that group (chance 0); mean over cases with its range.", "",
                  "| method | mean rho | range | cases |", "|---|---|---|---|"]
        for m, t in regions.groupby("method", sort=True):
            rho = t["spearman"].dropna()
            lines.append(f"| {m} | {_fmt(rho.mean() if len(rho) else np.nan)} | "
                         f"{_fmt(rho.min() if len(rho) else np.nan)}–{_fmt(rho.max() if len(rho) else np.nan)} | "
                         f"{len(rho)} |")
    return "\n".join(lines) + "\n"


def _figures(ratings: pd.DataFrame, pref: pd.DataFrame, out: Path, simulated: bool, mid: float) -> dict[str, Path]:
    from gestalt_xai.viz import _plt, save_figure

    plt = _plt()
    tag = " (SIMULATED)" if simulated else ""
    written = {}
    if not ratings.empty:
        items = sorted(set(ratings["item"]))
        fig, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items), 2.6), sharey=True, squeeze=False)
        for ax, item in zip(axes[0], items, strict=True):
            t = ratings[ratings["item"] == item].reset_index(drop=True)
            err = np.vstack([t["mean"] - t["ci_low"], t["ci_high"] - t["mean"]]).clip(min=0)
            ax.errorbar(t["mean"], np.arange(len(t)), xerr=np.nan_to_num(err), fmt="o", capsize=3)
            ax.axvline(mid, ls="--", c="grey", lw=1)
            ax.set_yticks(np.arange(len(t)), t["method"])
            ax.set_title(item)
        fig.suptitle(f"Mean rating, 95 % CI; dashed: neutral{tag}", fontsize=9)
        fig.tight_layout()
        written["ratings_figure"] = save_figure(fig, out / "ratings.png")[0]
    if not pref.dropna(subset=["rate_first"]).empty:
        t = pref.dropna(subset=["rate_first"]).reset_index(drop=True)
        fig, ax = plt.subplots(figsize=(4.5, 0.6 + 0.5 * len(t)))
        err = np.vstack([t["rate_first"] - t["ci_low"], t["ci_high"] - t["rate_first"]])
        ax.errorbar(t["rate_first"], np.arange(len(t)), xerr=err, fmt="o", capsize=3)
        ax.axvline(0.5, ls="--", c="grey", lw=1)
        ax.set_xlim(0, 1)
        ax.set_yticks(np.arange(len(t)), [f"{a} over {b}" for a, b in zip(t["method_first"], t["method_second"],
                                                                          strict=True)])
        ax.set_title(f"Preference, Wilson 95 % CI; dashed: chance{tag}", fontsize=9)
        fig.tight_layout()
        written["preference_figure"] = save_figure(fig, out / "preference.png")[0]
    return written


@stage("questionnaire-analysis", options=AnalysisConfig, order=96,
       summary="clinician questionnaire answers: ratings, preferences, agreement, regions vs. the model",
       reads=(OUT, KEY_DIR), writes=(ANALYSIS,),
       example="gestalt-xai questionnaire-analysis --run runs/demo --set responses=[export.csv]",
       tiny_options={"simulate": {"raters": 4}, "n_resamples": 200})
def questionnaire_analysis_stage(run: Run, cfg: AnalysisConfig) -> StageResult:
    """Run the questionnaire analysis on ``run``; see the module docstring."""
    from gestalt_xai.export.limesurvey_responses import read_limesurvey_export
    from gestalt_xai.export.questionnaire_analysis import (
        agreement,
        method_ratings,
        preference_rates,
        region_agreement,
        scs_scores,
    )
    from gestalt_xai.export.questionnaire_responses import load_analyst_key, read_redcap_export
    from gestalt_xai.export.simulate_responses import simulate_redcap_export

    definition = run.path / KEY_DIR / "definition.json"
    if not definition.is_file():
        raise InputError(f"{definition} not found: run `gestalt-xai questionnaire --run {run.path}` first")
    q = validate_config(QuestionnaireDef, json.loads(definition.read_text()), where=run.relative(definition))
    key = load_analyst_key(run.path / KEY_DIR)
    dictionary = run.path / OUT / "redcap" / "data_dictionary.csv"
    out = run.dir(ANALYSIS)
    files = list(cfg.responses)
    if cfg.simulate is not None:
        files = [out / "simulated_responses.csv"]
        simulate_redcap_export(q, key.blinding, cfg.simulate.raters, cfg.seed, path=files[0],
                               method_quality=cfg.simulate.method_quality)
    parts, errors, seen = [], [], set()
    for f in files:
        name = run.relative(f) if Path(f).is_absolute() and Path(f).is_relative_to(run.path) else Path(f).name
        try:
            if _is_limesurvey(Path(f)):
                r = read_limesurvey_export(f, q, key)
            else:
                r = read_redcap_export(f, q, key, dictionary if dictionary.is_file() else None)
            dup = sorted(seen & set(r.background["record_id"]))
            if dup:
                raise InputError(f"{f}: record ids {dup[:3]} already come from another response file")
        except InputError as e:
            errors.append(ErrorRow(name, "InputError", str(e).replace(str(f), name)))
            continue
        seen |= set(r.background["record_id"])
        parts.append(r)
    run.write_errors(errors)
    if not parts:
        raise InputError(f"no usable response file among {len(files)}: see errors.parquet")
    r = _pool(parts)
    ratings = method_ratings(r, n_resamples=cfg.n_resamples, seed=cfg.seed)
    pref, agree, scs = preference_rates(r), agreement(r), scs_scores(r)
    outputs = {}
    for label, table in (("ratings", ratings), ("preference", pref), ("agreement", agree), ("scs", scs)):
        outputs[label] = out / f"{label}.parquet"
        write_parquet(table, outputs[label])
    regions = None
    patients = q.cases.unit == "patient"
    rs = run.path / "aggregate" / ("region_subjects.parquet" if patients else "region_syndromes.parquet")
    if rs.is_file() and not r.regions.empty:
        unit_of = None
        if patients:
            images = run.image_table().astype({"image_id": str, "subject_id": str})
            unit_of = dict(zip(images["image_id"], images["subject_id"], strict=True))
        regions = region_agreement(r, key, pd.read_parquet(rs), atlas=cfg.atlas, model=q.maps.model,
                                   id_column="subject_id" if patients else "syndrome_id", unit_of=unit_of)
        outputs["region_agreement"] = out / "region_agreement.parquet"
        write_parquet(regions, outputs["region_agreement"])
    likert = q.item("likert")
    mid = (len(likert.scale) + 1) / 2 if likert is not None else 3.0
    outputs["summary"] = out / "summary.md"
    atomic_write_bytes(outputs["summary"], _summary(q, r, ratings, pref, agree, scs, regions,
                                                    len(parts)).encode("utf-8"))
    outputs |= _figures(ratings, pref, out, r.simulated, mid)
    tag = "SIMULATED " if r.simulated else ""
    return StageResult(items=len(files), outputs=outputs, extra={"simulated": r.simulated,
                                                                 "raters": int(r.background.shape[0])},
                       summary=[f"{tag}answers of {r.background.shape[0]} raters from {len(parts)} of {len(files)} "
                                f"file(s) analysed into {run.relative(out)}"])
