"""The ``report`` stage: one self-contained HTML page per patient photo (:mod:`gestalt_xai.export.report`) and an
index of the run.

Writes::

    reports/<case pseudonym>.html   one page per diagnosed test photo and per undiagnosed photo (images inline)
    reports/<case pseudonym>.pdf    with ``pdf: always`` (or ``auto`` when Chromium is installed)
    reports/index.html              every report, the composite figures and the stages' summaries of the run

Each page is scanned (:func:`gestalt_xai.export.privacy.scan_bytes`) for the cohort's image and subject ids, file
names and paths before it is written; a page with a finding is not written and is an error row, as is a photo whose
page cannot be built (a broken map, a missing crop): the other pages are written. The index links the composite
figures and summaries of the other stages where they lie in the run (``../aggregate/figures/…``), so it is the
researcher's entry point; the per-patient pages are the files to hand on.

Resumable: each written page is recorded in the stage's ledger with a digest of its inputs (the photo's ranking,
nearest gallery photos, map index rows and assessment rows, the correct-match reference and the options), and a
rerun rebuilds only pages whose inputs changed or whose file is missing. The HTML is deterministic (sorted inputs,
no timestamps, deterministic JPEG encoding): the same run gives the same bytes. A PDF embeds its creation date.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from gestalt_xai.config import StageConfig
from gestalt_xai.data.cohort import UNDIAGNOSED
from gestalt_xai.errors import InputError
from gestalt_xai.export.browser import find_chromium, require_chromium
from gestalt_xai.export.report import (
    PatientInputs,
    RunInputs,
    correct_match_distances,
    patient_page,
    patient_rankings,
    render_index,
    render_report,
    showable,
)
from gestalt_xai.runs import LAYOUT, ErrorRow, Run, atomic_write_bytes
from gestalt_xai.stages import StageResult, stage

log = logging.getLogger(__name__)

__all__ = ["OUT", "ReportConfig", "report_stage"]

OUT = "reports"
#: the other stages' summaries and figure folders the index links, where present (paths inside the run)
SUMMARY_FILES = ("assess/summary.md", "experiments/eyetracking/summary.md", "experiments/imbalance/summary.md",
                 "questionnaire/analysis/summary.md")
FIGURE_DIRS = ("aggregate/figures", "assess/figures", "experiments/eyetracking/figures", "experiments/imbalance",
               "questionnaire/analysis")
#: stage kinds whose manifest summary lines the index shows
SUMMARY_STAGES = ("match", "aggregate", "assess", "eyetrack", "imbalance", "questionnaire", "questionnaire-analysis")


class ReportConfig(StageConfig):
    """Options of the ``report`` stage."""

    patients: Literal["all", "test", "undiagnosed"] = Field(
        "all", description="whose pages: diagnosed test photos and undiagnosed photos (all), or one of them")
    top_k: int = Field(5, ge=1, le=30, description="suggested syndromes listed")
    map_suggestions: int = Field(3, ge=1, le=30, description="suggestions (from the first) whose maps are shown "
                                                             "when the run has them; the first always")
    nearest: int = Field(3, ge=0, le=20, description="nearest gallery photos shown")
    unusual_percentile: float = Field(95.0, gt=0, le=100, description="a suggestion farther than this percentile "
                                                                      "of correct-match distances is flagged")
    normalisation: str = Field("max-abs", description="per-map normalisation before the consensus mean "
                                                      "(aggregate.composite.normalise)")
    model: str | None = Field(None, description="whose maps (default: the first model of the map store that is "
                                                "not a random-model control)")
    pdf: Literal["auto", "always", "never"] = Field(
        "never", description="also print each page to PDF in headless Chromium: auto (when installed), always "
                             "(fails before work without it), never")

    @field_validator("normalisation")
    @classmethod
    def _known_normalisation(cls, v: str) -> str:
        from gestalt_xai.aggregate.composite import normalise

        normalise(np.zeros((2, 2)), v)  # an unknown name raises here, naming it
        return v

    @model_validator(mode="after")
    def _chromium(self) -> ReportConfig:
        if self.pdf == "always":
            require_chromium("pdf")
        return self

    def chromium(self) -> str | None:
        """The Chromium that prints the PDFs, or ``None`` for none."""
        return None if self.pdf == "never" else find_chromium() if self.pdf == "auto" else require_chromium("pdf")


def _forbidden(run: Run) -> set[str]:
    from gestalt_xai.export.privacy import forbidden_values

    images = run.cohort().images
    return forbidden_values(pd.concat([images["image_id"], images["subject_id"]]), images["path"])


def _match_slots(run: Run, table: Any) -> list[tuple[str, bool, bool]]:
    """The match stage's models and TTA slots as it recorded them, else its defaults (trained models, TTA)."""
    from gestalt_xai.models.declaration import random_controls

    for entry in run.manifest.get("stages", {}).values():
        if entry.get("stage") == "match" and entry.get("slots"):
            return [(str(m), bool(f), bool(g)) for m, f, g in entry["slots"]]
    controls = set(random_controls(run))
    return table.select([m for m in sorted({s[0] for s in table.slots}) if m not in controls] or None, tta=True)


def _choose_model(run: Run, index: pd.DataFrame, wanted: str | None) -> str:
    from gestalt_xai.models.declaration import random_controls

    have = sorted(set(index["model_id"].astype(str)))
    if wanted is not None:
        if have and wanted not in have:
            raise InputError(f"model: no maps of {wanted!r} in the map store (it has {have})")
        return wanted
    trained = [m for m in have if m not in random_controls(run)]
    return (trained or have or [""])[0]


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, pd.DataFrame):
            h.update(pd.util.hash_pandas_object(p.reset_index(drop=True).astype(str), index=False).values.tobytes())
        elif isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:24]


def _links(run: Run) -> dict[str, list[dict[str, str]]]:
    """Relative links (from ``reports/``) to the run's figures and summaries that exist."""
    figures = [{"href": f"../{d}/{p.name}", "name": f"{d}/{p.name}"}
               for d in FIGURE_DIRS for p in sorted((run.path / d).glob("*.png"))]
    summaries = [{"href": f"../{f}", "name": f} for f in SUMMARY_FILES if (run.path / f).is_file()]
    booklets = sorted((run.path / "questionnaire" / "booklet").glob("*.html"))
    summaries += [{"href": f"../questionnaire/booklet/{p.name}", "name": f"questionnaire/booklet/{p.name}"}
                  for p in booklets]
    return {"figures": figures, "summaries": summaries}


def _stage_summaries(run: Run, forbidden: set[str]) -> list[dict[str, Any]]:
    """The manifest summary lines of :data:`SUMMARY_STAGES`; a line naming cohort data is left out."""
    from gestalt_xai.export.privacy import scan_bytes

    out = []
    for name, entry in sorted(run.manifest.get("stages", {}).items()):
        if entry.get("stage") not in SUMMARY_STAGES or not entry.get("summary"):
            continue
        lines = [str(x) for x in entry["summary"] if not scan_bytes(str(x).encode(), forbidden, name)]
        out.append({"name": name, "status": entry.get("status", ""), "lines": lines})
    return out


@stage("report", options=ReportConfig, order=97,
       summary="one self-contained HTML report per patient photo (pseudonymised) and an index of the run",
       reads=(LAYOUT.embeddings, LAYOUT.matching, LAYOUT.maps, LAYOUT.aligned), writes=(OUT,),
       example="gestalt-xai report --run runs/demo",
       tiny_options={"nearest": 2})
def report_stage(run: Run, cfg: ReportConfig) -> StageResult:
    """Write the per-patient reports and the index of ``run``; see the module docstring."""
    from gestalt_xai import __version__
    from gestalt_xai.aggregate.regions import template_landmarks
    from gestalt_xai.export.privacy import scan_bytes
    from gestalt_xai.faces.regions import template_atlas
    from gestalt_xai.matching import EmbeddingTable, unified_gallery

    chromium = cfg.chromium()
    out = run.dir(OUT)
    table = EmbeddingTable.from_frame(run.embeddings())
    slots = _match_slots(run, table)
    images = run.image_table()
    images = images[images["aligned"] & table.has(list(images["image_id"]), slots)].reset_index(drop=True)
    embedded = set(images["image_id"])
    gallery = [g for g in unified_gallery(run.cohort()) if g in embedded]
    test = sorted(images.loc[images["test"], "image_id"])
    undiagnosed = sorted(images.loc[images["undiagnosed"], "image_id"])
    chosen = {"all": test + undiagnosed, "test": test, "undiagnosed": undiagnosed}[cfg.patients]
    ranked_ids = sorted(set(test) | set(chosen))
    suggestions, nearest = patient_rankings(table, images, ranked_ids, gallery, slots, cfg.nearest)
    labels = dict(zip(images["image_id"], images["syndrome_id"].astype(str), strict=True))
    reference = correct_match_distances(suggestions[suggestions["image_id"].isin(set(test))], labels)

    store = run.map_store() if (run.path / LAYOUT.maps).exists() else None
    index = store.index() if store is not None else pd.DataFrame(columns=["image_id", "model_id"])
    model_id = _choose_model(run, index, cfg.model)
    index = index[index["model_id"].astype(str) == model_id]
    metrics_path = run.path / LAYOUT.assess / "metrics.parquet"
    metrics = None
    if metrics_path.exists():
        metrics = pd.read_parquet(metrics_path)
        metrics = metrics[metrics["model_id"].astype(str) == model_id]
    cohort = run.cohort()
    names = dict(zip(cohort.syndromes["syndrome_id"].astype(str),
                     cohort.syndromes.get("syndrome_name", cohort.syndromes["syndrome_id"]).astype(str), strict=True))
    manifest = run.manifest
    shared = RunInputs(
        syndrome_names=names, pseudonyms=run.pseudonyms(), reference=reference, consent=showable(images),
        model_id=model_id, model_sha256=str(manifest.get("models", {}).get(model_id, {}).get("sha256", "")),
        toolkit=f"gestalt-xai {manifest.get('gestalt_xai_version') or __version__}"
                + (f" (commit {manifest['git_commit'][:12]})" if manifest.get("git_commit") else ""),
        unusual=cfg.unusual_percentile, normalisation=cfg.normalisation, top_k=cfg.top_k,
        map_suggestions=cfg.map_suggestions, metrics=metrics, landmarks=template_landmarks(run),
        template=template_atlas())
    forbidden = _forbidden(run)
    meta = images.set_index("image_id")
    by_image = {str(i): g for i, g in index.groupby("image_id", sort=True)}
    sugg_by = {str(i): g for i, g in suggestions.groupby("image_id", sort=True)}
    near_by = {str(i): g for i, g in nearest.groupby("image_id", sort=True)}
    ledger = run.ledger(cfg, ignore=("pdf",))
    done = ledger.done()
    errors: list[ErrorRow] = []
    entries, written, reused, keep = [], 0, 0, {"index.html"}
    empty_maps = index.iloc[:0]
    for image_id in chosen:
        pseudonym = shared.pseudonyms.pseudonym("case", image_id)
        path = out / f"{pseudonym}.html"
        maps = by_image.get(image_id, empty_maps)
        mine_near = near_by.get(image_id, nearest.iloc[:0])
        mine_metrics = metrics[metrics["image_id"] == image_id] if metrics is not None else None
        digest = _digest(sugg_by.get(image_id, suggestions.iloc[:0]), mine_near, maps, mine_metrics, reference,
                         {g: shared.consent.get(str(g), False) for g in mine_near["gallery_id"]}, names,
                         shared.toolkit, model_id)
        p = PatientInputs(image_id=image_id, subject_id=str(meta.loc[image_id, "subject_id"]),
                          label=labels[image_id], face=np.zeros(0), suggestions=sugg_by.get(image_id,
                                                                                            suggestions.iloc[:0]),
                          nearest=mine_near, maps=maps, load_maps=store.load_many if store is not None else None,
                          gallery_face=lambda g: run.crops([g])[0])
        top = p.suggestions.sort_values("rank").head(1)
        entry = {"pseudonym": pseudonym, "href": path.name, "undiagnosed": p.label == UNDIAGNOSED,
                 "top": names.get(str(top["syndrome_id"].iloc[0]), "") if len(top) else "",
                 "top_is_label": bool(len(top) and str(top["syndrome_id"].iloc[0]) == p.label)}
        record = done.get(image_id)
        if record and record.get("digest") == digest and path.is_file():
            reused += 1
            keep.add(path.name)
            entries.append(entry)
            if record.get("pdf"):
                keep.add(path.with_suffix(".pdf").name)
            continue
        try:
            p.face = run.crops([image_id])[0]
            html = render_report(patient_page(shared, p)).encode("utf-8")
        except Exception as exc:  # noqa: BLE001 - one photo's failure is its error row; the others are written
            log.warning("report: the page of one photo failed (%s: %s)", type(exc).__name__, exc)
            errors.append(ErrorRow(image_id, "report", f"{type(exc).__name__}: {exc}"))
            ledger.add(image_id, {"digest": digest}, ok=False)
            continue
        findings = scan_bytes(html, forbidden, path.name)
        if findings:
            errors.append(ErrorRow(image_id, "privacy", f"page not written: it names cohort data ({findings[0]})"))
            ledger.add(image_id, {"digest": digest}, ok=False)
            continue
        atomic_write_bytes(path, html)
        keep.add(path.name)
        pdf = False
        if chromium is not None:
            pdf = _print_pdf(path, chromium, image_id, errors)
            if pdf:
                keep.add(path.with_suffix(".pdf").name)
        ledger.add(image_id, {"digest": digest, "pdf": pdf})
        written += 1
        entries.append(entry)
    for stale in sorted(out.glob("*")):
        if stale.is_file() and stale.name not in keep and stale.suffix in (".html", ".pdf"):
            stale.unlink()
    run.write_errors(errors)
    index_html = render_index({
        "name": manifest.get("study", {}).get("name", "run"), "entries": entries,
        "n_errors": len(errors), "model": model_id, "toolkit": shared.toolkit, **_links(run),
        "stages": _stage_summaries(run, forbidden)}).encode("utf-8")
    findings = scan_bytes(index_html, forbidden, "index.html")
    if findings:
        raise RuntimeError(f"{out / 'index.html'} would name cohort data: {findings[:5]}")
    atomic_write_bytes(out / "index.html", index_html)
    n_flagged = sum(1 for e in entries if not e["top_is_label"] and not e["undiagnosed"])
    return StageResult(
        items=len(chosen), outputs={"index": out / "index.html"},
        extra={"n_written": written, "n_reused": reused, "n_reference": int(len(reference)), "model_id": model_id},
        summary=[f"{len(entries)} of {len(chosen)} patient photo(s) reported ({written} written, {reused} unchanged) "
                 f"→ {run.relative(out / 'index.html')}; {n_flagged} test photo(s) whose first suggestion is not "
                 f"their diagnosis; percentiles against {len(reference)} correct-match distances"]
        + ([f"{len(errors)} page(s) not written: see errors.parquet (stage report)"] if errors else [])
        + (["no PDF: Chromium is not installed (pdf: auto)"] if chromium is None and cfg.pdf == "auto" else []))


def _print_pdf(path: Path, chromium: str, image_id: str, errors: list[ErrorRow]) -> bool:
    """Print one page to PDF beside it; a page that does not render cleanly is an error row."""
    from gestalt_xai.export.browser import open_page

    check = open_page(path, pdf=True, chromium=chromium)
    if not check.ok or check.pdf is None:
        errors.append(ErrorRow(image_id, "pdf", "the page does not render cleanly in Chromium: "
                               + "; ".join(check.problems()[:3])))
        return False
    atomic_write_bytes(path.with_suffix(".pdf"), check.pdf)
    return True
