"""Checks of explanations against a synthetic cohort's ground truth (``cohort/truth/``).

The synthetic cohort (:mod:`gestalt_xai.data.synthetic`) plants HPO-coded features in known facial regions and,
optionally, a confounder cue (a dark mark on the cheek) in most photos of one syndrome; its truth tables
(:mod:`gestalt_xai.data.synthetic.truth`) say where. Two checks of the assess stage live here (the per-map
localisation metrics are :mod:`.localisation` and :mod:`.localisation_run`):

* **Planted regions** (:func:`planted_region_table`). Per syndrome × method, is the facial region with the highest
  enrichment of positive attribution (:func:`gestalt_xai.aggregate.regions.top_regions` of the aggregate stage's
  ``aggregate/region_syndromes.parquet``, template atlas, own target) one of the atlas regions of the syndrome's
  planted, in-crop features (:func:`planted_regions`, through the region groups of
  ``gestalt_xai/resources/hpo_face_regions.tsv``)? Chance: the top region drawn uniformly from the atlas' facial
  regions, i.e. ``#planted regions / #facial regions`` per syndrome, averaged (:func:`report_hits`).
* **Confounder (Clever Hans) check** (:func:`confounder_check`). The mark's effect on the confounded syndrome's score
  (:func:`~gestalt_xai.assess.localisation.mark_effects`), the maps' relevance mass on the mark (the ``mark`` rows of
  the localisation table) and whether SpRAy (Lapuschkin et al., Nat. Commun. 2019; run by the aggregate stage,
  ``aggregate/spray.parquet``) splits the syndrome on the cue. SpRAy's cue columns come from :func:`check_cue`, which
  the aggregate stage calls: per cluster, the share of its composite's positive mass inside the cue mask (relevance
  mass accuracy, Arras et al., Information Fusion 2022) and its enrichment (share / the mask's area share); the
  syndrome *splits on the cue* when there are ≥ 2 clusters and the best cluster's enrichment is ≥ 2 and ≥ 1.5 × every
  other cluster's.

A real cohort has no ``cohort/truth/``: :func:`read_truth` returns ``None`` and no check runs. A truth folder that
exists but cannot be read is reported (a warning naming the file and an error row), never taken for a real cohort.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow

from gestalt_xai.aggregate.annotate import GROUP_COLS, OWN_TARGET_GROUPS
from gestalt_xai.aggregate.faces import ALL
from gestalt_xai.aggregate.regions import FACE_REGIONS, top_regions
from gestalt_xai.assess.localisation import area_share, mark_effects, model_label, relevance_mass_accuracy
from gestalt_xai.data.synthetic.truth import TruthTables, load_masks, load_truth
from gestalt_xai.errors import GestaltXAIError
from gestalt_xai.faces.align import CROP_SIZE
from gestalt_xai.faces.regions import REGION_GROUP
from gestalt_xai.runs import ErrorRow, Run

__all__ = [
    "TRUTH_FILES",
    "read_truth",
    "truth_landmarks",
    "planted_regions",
    "control_syndrome",
    "confounded_syndrome",
    "cue_mask",
    "ConfounderCue",
    "confounder_cue",
    "check_cue",
    "planted_hits",
    "report_hits",
    "report_spray",
]

log = logging.getLogger(__name__)

#: the files of ``cohort/truth/`` that :func:`~gestalt_xai.data.synthetic.truth.load_truth` reads
TRUTH_FILES = ("images.parquet", "features.parquet", "catalogue.parquet", "syndromes.json")
#: what reading a broken file raises (pyarrow's errors for parquet, ``ValueError`` for JSON)
_READ_ERRORS = (GestaltXAIError, OSError, ValueError, pyarrow.ArrowException)


def _unreadable(root: Any) -> Any | None:
    """The first truth file that is missing or does not parse (``None`` if each reads on its own)."""
    for name in TRUTH_FILES:
        path = root / name
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            else:
                pd.read_parquet(path)
        except _READ_ERRORS:
            return path
    return None


def read_truth(run: Run) -> tuple[TruthTables | None, list[ErrorRow]]:
    """The synthetic cohort's truth of ``run``, and error rows when it cannot be read.

    ``(None, [])`` for a real cohort (no ``cohort/truth/`` folder). A truth folder that exists but has a missing or
    unreadable file gives ``(None, [row])``: ``row.item_id`` is that file (relative to the run) and a warning names
    it, so the caller goes on without truth checks but the run records why.
    """
    root = run.path / "cohort" / "truth"
    if not root.is_dir():
        return None, []
    try:
        return load_truth(root), []
    except _READ_ERRORS as exc:
        bad = _unreadable(root) or root
        item = bad.relative_to(run.path).as_posix()
        message = f"synthetic-cohort truth unreadable, checks against it skipped ({type(exc).__name__}: {exc})"
        log.warning("%s: %s", item, message)
        return None, [ErrorRow(item, "input", message)]


def truth_landmarks(truth: TruthTables | None) -> dict[str, Any]:
    """Image → true 68 landmarks in photo pixels (flattened), when the truth has them."""
    if truth is None or "landmarks68" not in truth.images.columns:
        return {}
    return dict(zip(truth.images["image_id"].astype(str), truth.images["landmarks68"], strict=True))


def planted_regions(truth: TruthTables | None) -> dict[str, set[str]]:
    """Syndrome → atlas regions of its planted, in-crop features (via the toolkit region groups)."""
    if truth is None:
        return {}
    feats = truth.features
    feats = feats[feats["visible_in_crop"].astype(bool)]
    by_group: dict[str, set[str]] = {}
    for region, group in REGION_GROUP.items():
        if group:
            by_group.setdefault(group, set()).add(region)
    out: dict[str, set[str]] = {}
    for syn, grp in feats.groupby("syndrome_id"):
        regions: set[str] = set()
        for g in grp["region"].astype(str).unique():
            regions |= by_group.get(g, set())
        out[str(syn)] = regions
    return out


def control_syndrome(truth: TruthTables | None, syndromes: set[str], given: str | None = None) -> str | None:
    """The syndrome id of unaffected controls: ``given``, else the synthetic cohort's when it is in ``syndromes``."""
    if given is not None:
        return given
    if truth is not None:
        cid = truth.syndromes.get("control_id")
        if cid in syndromes:
            return str(cid)
    return None


def confounded_syndrome(truth: TruthTables | None) -> str | None:
    """The syndrome whose photos carry the synthetic confounder cue (``None`` without one)."""
    if truth is None or not truth.syndromes.get("config", {}).get("confounder"):
        return None
    return str(truth.syndromes["config"]["confounder"]["syndrome"])


def cue_mask(run: Run, truth: TruthTables, syndrome: str) -> tuple[np.ndarray | None, set[str]]:
    """Template-space mask of the confounder cue (mean over the syndrome's marked photos, ≥ 0.25) and the
    subjects with at least one marked photo."""
    from gestalt_xai.faces.align import row_matrix, warp_photo_to_crop

    imgs = truth.images
    marked = imgs[(imgs["syndrome_id"].astype(str) == syndrome) & imgs["confounder"].astype(bool)]
    subjects = set(marked["subject_id"].astype(str))
    if not len(marked):
        return None, subjects
    al = run.alignments(aligned_only=True).set_index("image_id")
    total, n = np.zeros((CROP_SIZE, CROP_SIZE), np.float64), 0
    for image_id in marked["image_id"].astype(str):
        if image_id not in al.index:
            continue
        mask = load_masks(run.path / "cohort", image_id, truth.features)["confounder"]
        total += warp_photo_to_crop(mask.astype(np.float32), row_matrix(al.loc[image_id]))
        n += 1
    if not n:
        return None, subjects
    return (total / n) >= 0.25, subjects


def region_mask_source(run: Run, truth: TruthTables) -> Callable[[str], list[tuple[str, str, np.ndarray]]]:
    """The ``region`` masks of an image in crop space (a :data:`~gestalt_xai.assess.localisation.MaskSource`): each
    planted feature's truth mask (every pixel it may change; ``truth/masks/<image_id>.png``) and, on a marked photo,
    the confounder mark's (feature ``mark``), warped into the crop with the image's alignment matrix as the change
    masks are (bilinear, kept where ≥ 0.5: :func:`~gestalt_xai.faces.align.warp_photo_to_crop`). The variant is the
    counterfactual that removes the feature (``without_<feature>``, ``without_mark``): its Δscore's key. An image
    without an alignment or a readable mask image raises (the :class:`~gestalt_xai.assess.localisation.Localiser`
    reports it)."""
    from gestalt_xai.faces.align import row_matrix, warp_photo_to_crop

    features = truth.features.assign(image_id=truth.features["image_id"].astype(str))
    by_image = {i: g for i, g in features.groupby("image_id", sort=False)}
    marked = set(truth.images.loc[truth.images["confounder"].astype(bool), "image_id"].astype(str)) \
        if "confounder" in truth.images.columns else set()
    alignments: dict[str, Any] = {}

    def source(image_id: str) -> list[tuple[str, str, np.ndarray]]:
        if image_id not in by_image and image_id not in marked:
            return []
        if not alignments:
            alignments.update({str(r["image_id"]): r for r in run.alignments().to_dict("records")})
        M = row_matrix(alignments[image_id])
        masks = load_masks(run.path / "cohort", image_id, by_image.get(image_id, features.iloc[:0]))
        out = [(str(f), f"without_{f}", warp_photo_to_crop(masks[str(f)], M))
               for f in sorted(by_image[image_id]["feature"].astype(str))] if image_id in by_image else []
        if image_id in marked:
            out.append(("mark", "without_mark", warp_photo_to_crop(masks["confounder"], M)))
        return out

    return source


@dataclass(frozen=True)
class ConfounderCue:
    """The confounder cue of a synthetic cohort: its syndrome, its template-space mask (``None`` when unavailable)
    and the subjects with at least one marked photo. The default is a cohort without a cue."""

    syndrome: str | None = None
    mask: np.ndarray | None = None
    subjects: frozenset[str] = frozenset()

    @property
    def marked(self) -> dict[str, set[str]]:
        """``{syndrome: marked subjects}`` as :func:`gestalt_xai.aggregate.spray.spray_syndromes` takes it."""
        return {} if self.syndrome is None else {self.syndrome: set(self.subjects)}


def confounder_cue(run: Run, truth: TruthTables | None) -> tuple[ConfounderCue, list[ErrorRow]]:
    """The cohort's confounder cue (:func:`cue_mask` of :func:`confounded_syndrome`) and error rows.

    A mask that cannot be built (a missing alignment table, an unreadable mask image) is reported as an error row
    and a warning; the cue keeps its syndrome, so the SpRAy analyses still flag it, without a mask to check against.
    """
    syndrome = confounded_syndrome(truth)
    if truth is None or syndrome is None:
        return ConfounderCue(), []
    try:
        mask, subjects = cue_mask(run, truth, syndrome)
    except (*_READ_ERRORS, KeyError) as exc:
        message = f"confounder mask of {syndrome} unavailable, SpRAy cue check skipped ({type(exc).__name__}: {exc})"
        log.warning("%s", message)
        return ConfounderCue(syndrome), [ErrorRow("cohort/truth/masks", "input", message)]
    return ConfounderCue(syndrome, mask, frozenset(subjects)), []


def check_cue(analyses: list[dict[str, Any]], results: dict[tuple[Any, ...], Any], cue: ConfounderCue) -> None:
    """Add the cue check (module docstring) to the SpRAy analyses of the confounded syndrome, in place.

    ``analyses`` and ``results`` come from :func:`gestalt_xai.aggregate.spray.spray_syndromes`; each analysis with
    ``confounded_syndrome`` gains ``cue`` (per cluster: ``cue_share``, ``cue_enrichment``, ``marked_fraction``,
    ``n``), ``cue_area_share``, ``cue_mask``, ``cue_cluster`` and ``splits_on_cue``.
    """
    mask = cue.mask
    if mask is None or not mask.any():
        return
    area = float(area_share(mask))
    for a in analyses:
        if not a["confounded_syndrome"]:
            continue
        res, subjects = results[(a["syndrome_id"], a["model_id"], a["method"], a["layer"], a["target_group"])]
        rows_c = []
        for c, m in a["cluster_means"].items():
            share = float(relevance_mass_accuracy(m, mask))
            frac = float(np.mean([s in cue.subjects for s, lab in zip(subjects, res.labels, strict=True)
                                  if lab == c]))
            rows_c.append({"cluster": c, "cue_share": share, "cue_enrichment": share / area if area else np.nan,
                           "marked_fraction": frac, "n": int((res.labels == c).sum())})
        a["cue"] = rows_c
        a["cue_area_share"] = area
        a["cue_mask"] = mask
        best = max(rows_c, key=lambda r: -1 if np.isnan(r["cue_share"]) else r["cue_share"])
        others = [r["cue_enrichment"] for r in rows_c if r["cluster"] != best["cluster"]]
        a["cue_cluster"] = best["cluster"]
        a["splits_on_cue"] = bool(a["n_clusters"] >= 2 and best["cue_enrichment"] >= 2.0
                                  and (not others or best["cue_enrichment"] >= 1.5 * max(others)))


def planted_hits(per_syn: pd.DataFrame, planted: dict[str, set[str]], control: str | None) -> pd.DataFrame:
    """Per syndrome × method: is the top facial region (template atlas, own target) a planted feature's region?

    ``per_syn`` is ``aggregate/region_syndromes.parquet``; controls, ``ALL`` and syndromes without an in-crop
    planted feature are left out. Empty without truth.
    """
    if not planted:
        return pd.DataFrame()
    sel = per_syn[(per_syn["atlas"] == "template") & per_syn["target_group"].isin(OWN_TARGET_GROUPS)
                  & (per_syn["syndrome_id"] != ALL) & (per_syn["syndrome_id"] != (control or ""))]
    top = top_regions(sel, ["syndrome_id", *GROUP_COLS, "atlas"])
    rows = []
    for r in top.to_dict("records"):
        regions = planted.get(r["syndrome_id"], set())
        if not regions:
            continue  # no in-crop planted feature: nothing to hit
        rows.append({"syndrome_id": r["syndrome_id"], **{c: r[c] for c in GROUP_COLS}, "top_region": r["region"],
                     "top_group": r["region_group"], "top_enrichment": r["enrichment"],
                     "planted_regions": ";".join(sorted(regions)), "hit": r["region"] in regions})
    return pd.DataFrame(rows)


def report_hits(hits: pd.DataFrame, controls: Mapping[str, str | None] | None = None
                ) -> tuple[list[dict[str, Any]], list[str]]:
    """Per model × method × layer × target group: the share of syndromes hit and its chance level, and one summary
    line each (a random-model control labelled as such: its hits are a chance reference)."""
    if not len(hits):
        return [], []
    out, lines = [], []
    n_face_regions = len(FACE_REGIONS)  # chance: the top region drawn uniformly from the facial regions
    for key, grp in hits.groupby(GROUP_COLS, sort=True):
        d = dict(zip(GROUP_COLS, key, strict=True))
        share = float(grp["hit"].mean())
        chance = float(grp["planted_regions"].map(lambda r: len(r.split(";")) / n_face_regions).mean())
        d.update(share=share, n_syndromes=len(grp), n_hits=int(grp["hit"].sum()), chance=chance)
        out.append(d)
        layer = f" [{d['layer']}]" if d["layer"] else ""
        lines.append(f"assess: {d['method']}{layer} ({model_label(d['model_id'], controls or {})}, "
                     f"{d['target_group']}): top-enrichment region "
                     f"is a planted feature's region for {d['n_hits']}/{d['n_syndromes']} syndromes ({share:.0%}; "
                     f"chance {chance:.0%})")
    return out, lines


def report_spray(analyses: list[dict[str, Any]], confounded: str | None,
                 controls: Mapping[str, str | None] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The SpRAy analyses of the confounded syndrome (clusters, cue check) and one summary line each (a random-model
    control's labelled: it should not split on the cue)."""
    out, lines = [], []
    for a in analyses:
        if not a.get("confounded_syndrome"):
            continue
        d = {k: a.get(k) for k in ("syndrome_id", "model_id", "method", "layer", "target_group", "n_subjects",
                                   "n_clusters", "cluster_sizes", "cue_cluster", "splits_on_cue")}
        d["cue"] = a.get("cue")
        out.append(d)
        head = f"aggregate: SpRAy {a['method']} ({model_label(a['model_id'], controls or {})}) on confounded " \
               f"{confounded}: {a['n_clusters']} cluster(s) {a['cluster_sizes']}"
        if a.get("cue"):
            best = next(c for c in a["cue"] if c["cluster"] == a["cue_cluster"])
            lines.append(f"{head}; cluster {best['cluster']} puts {best['cue_share']:.0%} of its positive mass on the "
                         f"cue (enrichment {best['cue_enrichment']:.1f}, {best['marked_fraction']:.0%} of its subjects "
                         f"carry the mark) → splits on the cue: {'yes' if a['splits_on_cue'] else 'no'}")
        else:
            lines.append(f"{head} (no cue mask to check against)")
    return out, lines


# ------------------------------------------------------------------------------------------- for the assess stage
def _truth(run: Run, truth: TruthTables | None, errors: list[ErrorRow] | None) -> TruthTables | None:
    if truth is not None:
        return truth
    truth, truth_errors = read_truth(run)
    if errors is not None:
        errors += truth_errors
    return truth


def planted_region_table(run: Run, *, truth: TruthTables | None = None, control_id: str | None = None,
                         errors: list[ErrorRow] | None = None) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The planted-region check of ``run`` (module docstring) from the aggregate stage's
    ``aggregate/region_syndromes.parquet``.

    Returns ``({"planted_hits": per syndrome × model × method × layer × target group, "planted_hits_summary": per
    model × method × layer × target group: share hit and chance}, summary lines)``; empty for a real cohort or before
    the aggregate stage has run (logged). ``truth`` defaults to the run's (:func:`read_truth`; its error rows go to
    ``errors``); ``control_id`` as the aggregate stage's option of that name.
    """
    from gestalt_xai.models.declaration import random_controls
    from gestalt_xai.runs import LAYOUT

    truth = _truth(run, truth, errors)
    planted = planted_regions(truth)
    path = run.path / LAYOUT.aggregate / "region_syndromes.parquet"
    if not planted:
        return {}, []
    if not path.exists():
        log.warning("%s not found: the planted-region check needs the aggregate stage's region scores", path)
        return {}, []
    syndromes = set(run.image_table()["syndrome_id"].astype(str))
    hits = planted_hits(pd.read_parquet(path), planted, control_syndrome(truth, syndromes, control_id))
    records, lines = report_hits(hits, random_controls(run))
    return {"planted_hits": hits, "planted_hits_summary": pd.DataFrame(records)}, lines


def _spray_cue(path: Any) -> pd.DataFrame:
    """The SpRAy analyses of the confounded syndrome (``aggregate/spray.parquet``) with their best cue cluster."""
    key = [*GROUP_COLS]
    if not path.exists():
        return pd.DataFrame(columns=key)
    spray = pd.read_parquet(path)
    if not len(spray) or "splits_on_cue" not in spray.columns:
        return pd.DataFrame(columns=key)
    spray = spray[spray["confounded_syndrome"].astype(bool)]
    rows = []
    for r in spray.to_dict("records"):
        cue = json.loads(r["cue"]) if isinstance(r.get("cue"), str) else []
        best = next((c for c in cue if c["cluster"] == r.get("cue_cluster")), {})
        rows.append({**{k: r[k] for k in key}, "spray_n_clusters": int(r["n_clusters"]),
                     "spray_splits_on_cue": r.get("splits_on_cue"), "spray_cue_cluster": r.get("cue_cluster"),
                     "spray_cue_enrichment": best.get("cue_enrichment", np.nan),
                     "spray_marked_fraction": best.get("marked_fraction", np.nan)})
    return pd.DataFrame(rows, columns=[*key, "spray_n_clusters", "spray_splits_on_cue", "spray_cue_cluster",
                                       "spray_cue_enrichment", "spray_marked_fraction"])


def confounder_check(run: Run, localisation: pd.DataFrame | None = None, *, truth: TruthTables | None = None,
                     errors: list[ErrorRow] | None = None, report_sets: tuple[str, ...] = ("train", "test")
                     ) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The confounder (Clever Hans) check of ``run`` (module docstring); nothing without a confounder.

    ``localisation`` is the ``localisation`` table of :func:`~gestalt_xai.assess.localisation_run.localisation_tables`
    (its ``mark`` rows; without it the mass columns are absent). Returns ``({"mark_effects": per model × set × change
    (:func:`~gestalt_xai.assess.localisation.mark_effects`), "confounder": per model × method × layer × target group:
    ``n_mark``, ``mark_rma_<kind>``, ``mark_chance_<kind>``, ``mark_ratio_<kind>`` per mask kind and the SpRAy cue
    result ``spray_*`` read from ``aggregate/spray.parquet``}, summary lines)``.
    """
    from gestalt_xai.attribution.effects import load_effects
    from gestalt_xai.models.declaration import random_controls
    from gestalt_xai.runs import LAYOUT

    confounded = confounded_syndrome(_truth(run, truth, errors))
    if confounded is None:
        return {}, []
    controls = random_controls(run)
    marks, lines = mark_effects(load_effects(run), run.image_table(), confounded, controls, report_sets)
    table = _spray_cue(run.path / LAYOUT.aggregate / "spray.parquet").set_index(GROUP_COLS)
    on_mark = localisation[localisation["feature"] == "mark"] if localisation is not None and len(localisation) \
        else pd.DataFrame()
    if len(on_mark):
        mass = on_mark.groupby([*GROUP_COLS, "mask_kind"]).agg(
            n=("rma", "size"), rma=("rma", "mean"), chance=("area_share", "mean"), ratio=("ratio", "mean")).unstack()
        mass.columns = [f"mark_{stat}_{kind}" if stat != "n" else f"n_mark_{kind}" for stat, kind in mass.columns]
        table = mass.join(table, how="outer")
    table = table.reset_index()
    for r in table.to_dict("records"):
        layer = f" [{r['layer']}]" if r["layer"] else ""
        parts = [f"{kind} mask RMA {r[f'mark_rma_{kind}']:.2f} (chance {r[f'mark_chance_{kind}']:.3f}, "
                 f"{r[f'mark_ratio_{kind}']:.1f}×, n = {int(r[f'n_mark_{kind}'])} marked {confounded} photos)"
                 for kind in ("region", "change") if f"n_mark_{kind}" in r and r[f"n_mark_{kind}"] > 0]
        mass_text = "relevance on the mark: " + "; ".join(parts) if parts else "no mark rows"
        split = r.get("spray_splits_on_cue")
        spray_text = ("SpRAy (aggregate) splits it on the cue: " + ("yes" if split else "no")
                      + (f" (cluster {int(r['spray_cue_cluster'])}, enrichment {r['spray_cue_enrichment']:.1f})"
                         if split else "")) if split is not None and split == split else "no SpRAy cue check"
        lines.append(f"assess: confounder {r['method']}{layer} ({model_label(r['model_id'], controls)}, "
                     f"{r['target_group']}) on {confounded}: {mass_text}; {spray_text}")
    return {"mark_effects": marks, "confounder": table}, lines
