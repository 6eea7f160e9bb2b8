"""Per-patient reports: one self-contained HTML page per patient photo, for the clinician who sees the patient.

A page (:func:`patient_page` gathers it, :func:`render_report` writes it) holds

* the aligned face of the photo, under the run's pseudonym of the photo (kind ``case``) and of the patient
  (``subject``), never an image id, subject id, file name or path;
* the **suggested syndromes** with their distances, ranked as the match stage ranks an undiagnosed patient
  (:func:`gestalt_xai.matching.suggestion_table`: GM-Arc's ranking, nearest gallery image per syndrome, over the
  match stage's models and TTA slots) against the unified gallery (frequent + rare galleries,
  :func:`~gestalt_xai.matching.unified_gallery`) without the patient's own subject. For an undiagnosed patient that
  is ``matching/suggestions.parquet``; for a test patient the ranking the clinic would have seen, with every other
  diagnosed subject in the gallery (the protocols of ``matching/ranks.parquet`` hold subjects out for evaluation);
* **how unusual each distance is**: its percentile among the *correct-match distances*, the distances at which the
  run's test patients' true syndrome was found under the same ranking (:func:`correct_match_distances`,
  :func:`distance_percentile`). A suggestion farther than, say, 95 % of correct matches tells the clinician that
  nothing in the gallery is close, whatever its rank;
* **each method's map** towards the first suggestion(s) and, for a diagnosed patient, towards the own diagnosis
  (map store targets ``centroid:<id>`` / ``logit:<id>``), a **consensus map** (the mean of the methods' maps after
  the same normalisation, :func:`gestalt_xai.aggregate.composite.normalise`, ``max-abs`` by default) and, for the
  first section with maps, the **region table** of the consensus (positive-evidence share and enrichment per atlas
  region with its HPO anchor terms, :mod:`gestalt_xai.aggregate.regions`; the photo's own landmark atlas when its 68
  landmarks are known, the template atlas otherwise); an undiagnosed patient also gets the **contrastive maps**
  (``contrast:X-Y``: why the first suggestion rather than the second);
* the **nearest gallery photos**: their aligned face only where the cohort allows publication (the image table's
  boolean column ``consent_to_publish``; a missing column or value means *not showable*), their pseudonym otherwise;
* the patient's **assessment values** (``assess/metrics.parquet``, the summary columns of
  :data:`gestalt_xai.assess.report.COLUMNS`, with the seeded random map's row as the baseline), "not computed" when
  the assess stage did not score this patient;
* **provenance**: model id and SHA-256, each method's parameters (the map index's ``method_params``), the toolkit
  version and commit the run recorded.

Maps are drawn as arrays (no matplotlib figure per image): the gray face with the map over it in the toolkit's colour
maps (:data:`gestalt_xai.viz.SIGNED_CMAP`, red = evidence for the explained score, blue = against;
:data:`~gestalt_xai.viz.UNSIGNED_CMAP` for unsigned maps) with an opacity growing with |value|, as
:func:`gestalt_xai.viz.draw_map` draws them, and inlined as JPEG data URIs (no EXIF, no comment; a fifth of a PNG's
size). Every string reaches the page through Jinja2 with autoescaping on, so a syndrome name or label holding markup
shows as text.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.aggregate.composite import normalise
from gestalt_xai.aggregate.regions import FACE_REGIONS, enrichment, region_info, region_shares
from gestalt_xai.attribution.base import UNSIGNED_METHODS
from gestalt_xai.attribution.targets import TargetKey
from gestalt_xai.data.cohort import UNDIAGNOSED

log = logging.getLogger(__name__)

__all__ = ["CONSENT_COLUMN", "PatientInputs", "RunInputs", "correct_match_distances", "data_uri",
           "distance_percentile", "map_image", "patient_page", "patient_rankings", "render_index", "render_report",
           "showable"]

#: the image table's column saying whether a photo may be shown in reports (missing column or value: not showable)
CONSENT_COLUMN = "consent_to_publish"
#: target kinds whose reference is a syndrome: their maps fill the per-syndrome sections
SYNDROME_KINDS = ("centroid", "logit")
CONTRAST = "contrast"
_ALPHA = 0.75


# ---------------------------------------------------------------------------------------------- ranking
def showable(images: pd.DataFrame) -> dict[str, bool]:
    """image id → whether its photo may appear in a report: only an explicit true ``consent_to_publish``.

    >>> showable(pd.DataFrame({"image_id": ["a", "b", "c"], "consent_to_publish": [True, None, False]}))
    {'a': True, 'b': False, 'c': False}
    >>> showable(pd.DataFrame({"image_id": ["a"]}))
    {'a': False}
    """
    ids = images["image_id"].astype(str)
    if CONSENT_COLUMN not in images.columns:
        return dict.fromkeys(ids, False)
    return {i: v is True or (isinstance(v, np.bool_) and bool(v))
            for i, v in zip(ids, images[CONSENT_COLUMN].astype(object), strict=True)}


def patient_rankings(table: Any, images: pd.DataFrame, query_ids: Sequence[str], gallery_ids: Sequence[str],
                     slots: Sequence[Any], n_nearest: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every syndrome ranked for each query photo, and its ``n_nearest`` gallery photos, the photo's own subject
    left out of the gallery (module docstring).

    ``table``: an :class:`~gestalt_xai.matching.EmbeddingTable`; ``images``: ``image_id, subject_id, syndrome_id``.
    Returns ``(suggestions, nearest)``: ``image_id, rank, syndrome_id, distance`` (every syndrome of the gallery,
    :func:`~gestalt_xai.matching.suggestion_table`'s columns) and ``image_id, rank, gallery_id, syndrome_id,
    distance``.
    """
    from gestalt_xai.matching import slotwise_distances, suggestion_table

    meta = images.astype({"image_id": str, "subject_id": str}).set_index("image_id")
    gallery = [str(g) for g in gallery_ids]
    n_syndromes = meta.loc[gallery, "syndrome_id"].nunique() if gallery else 0
    frames, near = [], []
    gal_subject = meta.loc[gallery, "subject_id"].to_numpy(dtype=object)
    for image_id in query_ids:
        keep = [g for g, s in zip(gallery, gal_subject, strict=True) if s != meta.loc[image_id, "subject_id"]]
        frames.append(suggestion_table(table, images, [image_id], keep, slots, n=max(n_syndromes, 1)))
        if keep and n_nearest:
            d = slotwise_distances([table.matrix(s, [image_id]) for s in slots],
                                   [table.matrix(s, keep) for s in slots])[0]
            order = np.lexsort((np.array(keep, dtype=object), d))[:n_nearest]
            near += [(image_id, r, keep[j], str(meta.loc[keep[j], "syndrome_id"]), float(d[j]))
                     for r, j in enumerate(order, start=1)]
    suggestions = (pd.concat(frames, ignore_index=True) if frames else
                   suggestion_table(table, images, [], gallery, slots))
    nearest = pd.DataFrame(near, columns=["image_id", "rank", "gallery_id", "syndrome_id", "distance"])
    return suggestions, nearest


def correct_match_distances(suggestions: pd.DataFrame, labels: Mapping[str, str]) -> np.ndarray:
    """The distances at which each labelled photo's true syndrome was found: the reference of
    :func:`distance_percentile`, sorted. Photos whose syndrome is not in their ranking (absent from the gallery)
    or that are undiagnosed give none.

    >>> s = pd.DataFrame({"image_id": ["a", "a", "b", "b"], "rank": [1, 2, 1, 2], "syndrome_id": ["X", "Y", "X", "Y"],
    ...                   "distance": [0.1, 0.4, 0.2, 0.3]})
    >>> correct_match_distances(s, {"a": "X", "b": "Y", "c": "X"}).tolist()
    [0.1, 0.3]
    """
    true = suggestions["image_id"].astype(str).map(lambda i: labels.get(i))
    hit = suggestions["syndrome_id"].astype(str).to_numpy() == true.to_numpy(dtype=object)
    hit &= (true != UNDIAGNOSED).to_numpy()
    return np.sort(suggestions.loc[hit, "distance"].to_numpy(np.float64))


def distance_percentile(distance: float, reference: np.ndarray) -> float:
    """The percentage of ``reference`` distances (correct matches) at most ``distance``: 100 means the suggestion
    is at least as far as every correct match was; NaN without a reference.

    >>> ref = np.array([0.1, 0.2, 0.3, 0.4])
    >>> distance_percentile(0.05, ref), distance_percentile(0.3, ref), distance_percentile(0.9, ref)
    (0.0, 75.0, 100.0)
    """
    ref = np.sort(np.asarray(reference, np.float64))
    if not len(ref):
        return float("nan")
    return float(100.0 * np.searchsorted(ref, float(distance), side="right") / len(ref))


# ---------------------------------------------------------------------------------------------- images
def data_uri(data: bytes) -> str:
    """``data:`` URI of PNG or JPEG bytes (the page needs no file beside it)."""
    kind = "png" if data.startswith(b"\x89PNG") else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


@cache
def _colormap(signed: bool) -> Any:
    import matplotlib

    from gestalt_xai.viz import SIGNED_CMAP, UNSIGNED_CMAP

    return matplotlib.colormaps[SIGNED_CMAP if signed else UNSIGNED_CMAP]


def map_image(face: np.ndarray, map_: np.ndarray | None, *, signed: bool, vmax: float | None = None) -> np.ndarray:
    """The gray face with ``map_`` over it as an RGB uint8 array (:func:`gestalt_xai.viz.draw_map`'s look: colour
    from the toolkit's colour map, opacity 0.75·|value|/vmax); ``vmax`` defaults to the map's own
    :func:`~gestalt_xai.viz.shared_scale`."""
    from gestalt_xai.viz import _gray, shared_scale

    gray = np.repeat(_gray(face)[..., None], 3, axis=2).astype(np.float64)
    if map_ is None:
        return np.round(gray * 255).astype(np.uint8)
    m = np.nan_to_num(np.asarray(map_, np.float64))
    v = vmax if vmax is not None else shared_scale([m], signed)
    pos = np.clip((m / v + 1) / 2, 0, 1) if signed else np.clip(m / v, 0, 1)
    rgb = _colormap(signed)(pos)[..., :3]
    a = _ALPHA * (np.clip(np.abs(m) / v, 0, 1) if signed else pos)[..., None]
    return np.round((gray * (1 - a) + rgb * a) * 255).astype(np.uint8)


def colour_bar(signed: bool, width: int = 160, height: int = 10) -> np.ndarray:
    """A horizontal colour bar (RGB uint8) of the signed or unsigned colour map, low values on the left."""
    row = _colormap(signed)(np.linspace(0, 1, width))[:, :3]
    return np.round(np.repeat(row[None], height, axis=0) * 255).astype(np.uint8)


def _jpeg_uri(rgb: np.ndarray) -> str:
    from gestalt_xai.data.images import encode_jpeg

    return data_uri(encode_jpeg(rgb, quality=90))


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class RunInputs:
    """What every page of a run shares (read once by the stage)."""

    syndrome_names: dict[str, str]
    pseudonyms: Any  # PseudonymMap
    reference: np.ndarray  # correct-match distances
    consent: dict[str, bool]
    model_id: str
    model_sha256: str
    toolkit: str
    unusual: float = 95.0
    normalisation: str = "max-abs"
    top_k: int = 5
    map_suggestions: int = 3
    metrics: pd.DataFrame | None = None  # assess/metrics.parquet rows of the model, or None
    landmarks: Mapping[str, np.ndarray] = field(default_factory=dict)
    template: np.ndarray | None = None


@dataclass
class PatientInputs:
    """One photo's inputs: ids stay here and never reach the page."""

    image_id: str
    subject_id: str
    label: str  # syndrome id or UNDIAGNOSED
    face: np.ndarray
    suggestions: pd.DataFrame  # rank, syndrome_id, distance (this photo)
    nearest: pd.DataFrame  # rank, gallery_id, syndrome_id, distance
    maps: pd.DataFrame  # map index rows of this photo and model
    load_maps: Any  # rows → (n, 112, 112) array
    gallery_face: Any  # image id → RGB uint8


def _method_label(method: str, layer: str) -> str:
    return method if not layer else f"{method} · {str(layer).split('.')[-1]}"


def _syndrome(s: RunInputs, syndrome_id: str) -> dict[str, str]:
    return {"id": syndrome_id, "name": s.syndrome_names.get(syndrome_id, syndrome_id)}


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _section(s: RunInputs, p: PatientInputs, rows: pd.DataFrame, title: str, note: str = "") -> dict[str, Any]:
    rows = rows.sort_values(["method", "layer"], kind="stable")
    maps = p.load_maps(rows)
    cells, normalised = [], []
    for (method, layer), m in zip(rows[["method", "layer"]].itertuples(index=False, name=None), maps, strict=True):
        signed = method not in UNSIGNED_METHODS
        cells.append({"label": _method_label(str(method), str(layer)), "signed": signed,
                      "uri": _jpeg_uri(map_image(p.face, m, signed=signed))})
        normalised.append(normalise(m, s.normalisation))
    consensus = np.mean(normalised, axis=0) if normalised else None
    signed = consensus is not None and bool((consensus < 0).any())
    return {"title": title, "note": note, "maps": cells, "consensus_array": consensus,
            "consensus": None if consensus is None else _jpeg_uri(map_image(p.face, consensus, signed=signed)),
            "consensus_signed": signed, "n_methods": len(cells)}


def _map_sections(s: RunInputs, p: PatientInputs) -> list[dict[str, Any]]:
    """Per syndrome (first suggestions, then the own diagnosis) and kind: its maps; then the contrasts."""
    idx = p.maps
    kinds = idx["target"].map(lambda t: TargetKey.parse(str(t)).kind)
    refs = idx["target"].map(lambda t: TargetKey.parse(str(t)).ref)
    ranked = p.suggestions.sort_values("rank")["syndrome_id"].astype(str).tolist()
    wanted: list[tuple[str, str]] = []  # (syndrome, why)
    for r, syn in enumerate(ranked[: s.map_suggestions], start=1):
        if r == 1 or ((kinds.isin(SYNDROME_KINDS)) & (refs == syn)).any():
            wanted.append((syn, f"suggestion {r}"))
    if p.label != UNDIAGNOSED:
        hit = [i for i, (syn, _) in enumerate(wanted) if syn == p.label]
        if hit:
            wanted[hit[0]] = (p.label, wanted[hit[0]][1] + " = the patient's diagnosis")
        else:
            wanted.append((p.label, "the patient's diagnosis"))
    sections = []
    for syn, why in wanted:
        name = _syndrome(s, syn)["name"]
        found = False
        for kind in SYNDROME_KINDS:
            rows = idx[(kinds == kind) & (refs == syn)]
            if len(rows):
                found = True
                sections.append(_section(s, p, rows, f"Towards {name} ({why}; {kind} target)"))
        if not found:
            sections.append({"title": f"Towards {name} ({why})", "maps": [], "consensus": None,
                             "consensus_array": None, "n_methods": 0,
                             "note": "not computed: no maps towards this syndrome in the run (explain stage, "
                                     "syndromes: topk:K or label)"})
    for target in sorted(set(idx.loc[kinds == CONTRAST, "target"])):
        first, _, second = TargetKey.parse(str(target)).ref.partition("-")
        sections.append(_section(s, p, idx[idx["target"] == target],
                                 f"Why {_syndrome(s, first)['name']} rather than {_syndrome(s, second)['name']} "
                                 "(contrast target)",
                                 "red: evidence for the first syndrome over the second; blue: for the second"))
    return sections


def _regions(s: RunInputs, p: PatientInputs, sections: list[dict[str, Any]]) -> dict[str, Any] | None:
    first = next((x for x in sections if x.get("consensus_array") is not None), None)
    if first is None:
        return None
    lm = s.landmarks.get(p.image_id)
    if lm is not None:
        from gestalt_xai.faces.regions import landmark_atlas

        labels, atlas = landmark_atlas(lm), "the photo's own landmark atlas"
    else:
        from gestalt_xai.faces.regions import template_atlas

        labels, atlas = (s.template if s.template is not None else template_atlas()), "the template atlas"
    share, area = region_shares(first["consensus_array"], labels)
    enrich = enrichment(share, area)
    info = region_info().set_index("region")
    from gestalt_xai.faces.regions import REGIONS

    rows = []
    for r, region in enumerate(REGIONS):
        if region not in FACE_REGIONS:
            continue
        i = info.loc[region]
        hpo = [{"id": a, "name": b} for a, b in zip(str(i["hpo_ids"]).split(";"), str(i["hpo_names"]).split(";"),
                                                   strict=False) if a]
        rows.append({"region": region.replace("_", " "), "group": str(i["region_group"]).replace("_", " "),
                     "share": _fmt(100 * share[r], 1), "enrichment": _fmt(enrich[r], 2), "hpo": hpo,
                     "key": -np.inf if not np.isfinite(enrich[r]) else float(enrich[r])})
    rows.sort(key=lambda x: (-x["key"], x["region"]))
    return {"of": first["title"], "atlas": atlas, "rows": rows,
            "empty": not np.isfinite(share).any()}


def _assessment(s: RunInputs, p: PatientInputs) -> dict[str, Any] | None:
    from gestalt_xai.assess.report import COLUMNS

    if s.metrics is None:
        return None
    mine = s.metrics[s.metrics["image_id"] == p.image_id]
    if not len(mine):
        return {"rows": [], "columns": []}
    cols = [c for c in COLUMNS if c.metric in set(mine["metric"])]
    table = mine.pivot_table(index=["method", "target"], columns="metric", values="value", aggfunc="mean")
    rows = []
    for (method, target), vals in table.iterrows():
        ref = TargetKey.parse(str(target)).ref
        rows.append({"method": method, "target": _syndrome(s, ref)["name"],
                     "values": [_fmt(float(vals.get(c.metric, np.nan))) for c in cols]})
    return {"columns": [{"label": c.label, "better": "↑" if c.direction == "higher" else "↓"} for c in cols],
            "rows": rows}


def _provenance(s: RunInputs, p: PatientInputs) -> dict[str, Any]:
    params = {}
    for method, layer, raw in p.maps[["method", "layer", "method_params"]].drop_duplicates().itertuples(
            index=False, name=None):
        try:
            value = json.dumps(json.loads(str(raw)), sort_keys=True)
        except ValueError:
            value = str(raw)
        params[_method_label(str(method), str(layer))] = value
    hashes = sorted(set(p.maps["model_hash"].astype(str))) if len(p.maps) else []
    return {"model": s.model_id, "sha256": s.model_sha256 or ", ".join(hashes), "toolkit": s.toolkit,
            "params": sorted(params.items()), "normalisation": s.normalisation}


def patient_page(s: RunInputs, p: PatientInputs) -> dict[str, Any]:
    """Everything one page shows, as template values (pseudonyms, names and formatted numbers; no id of a photo
    or subject)."""
    pm = s.pseudonyms
    ranked = p.suggestions.sort_values("rank")
    suggestions = []
    for r, syn, d in ranked[["rank", "syndrome_id", "distance"]].head(s.top_k).itertuples(index=False, name=None):
        pct = distance_percentile(float(d), s.reference)
        suggestions.append({"rank": int(r), **_syndrome(s, str(syn)), "distance": _fmt(float(d)),
                            "percentile": _fmt(pct, 1), "unusual": bool(np.isfinite(pct) and pct > s.unusual),
                            "is_label": str(syn) == p.label})
    label_rank = ranked.loc[ranked["syndrome_id"].astype(str) == p.label, "rank"]
    sections = _map_sections(s, p)
    nearest = []
    for r, g, syn, d in p.nearest[["rank", "gallery_id", "syndrome_id", "distance"]].itertuples(index=False,
                                                                                                 name=None):
        shown = s.consent.get(str(g), False)
        nearest.append({"rank": int(r), "pseudonym": pm.pseudonym("case", str(g)), **_syndrome(s, str(syn)),
                        "distance": _fmt(float(d)),
                        "face": _jpeg_uri(np.asarray(p.gallery_face(str(g)), np.uint8)) if shown else None})
    return {
        "pseudonym": pm.pseudonym("case", p.image_id),
        "subject": pm.pseudonym("subject", p.subject_id),
        "undiagnosed": p.label == UNDIAGNOSED,
        "label": None if p.label == UNDIAGNOSED else _syndrome(s, p.label),
        "label_rank": int(label_rank.iloc[0]) if len(label_rank) else None,
        "face": _jpeg_uri(np.asarray(p.face, np.uint8)),
        "suggestions": suggestions,
        "n_reference": int(len(s.reference)),
        "unusual": s.unusual,
        "sections": [{k: v for k, v in x.items() if k != "consensus_array"} for x in sections],
        "regions": _regions(s, p, sections),
        "nearest": nearest,
        "assessment": _assessment(s, p),
        "provenance": _provenance(s, p),
        "bars": {"signed": _jpeg_uri(colour_bar(True)), "unsigned": _jpeg_uri(colour_bar(False))},
    }


# ---------------------------------------------------------------------------------------------- HTML
@cache
def _env() -> Any:
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(loader=PackageLoader("gestalt_xai.export", "templates"),
                       autoescape=select_autoescape(default=True, default_for_string=True),
                       trim_blocks=True, lstrip_blocks=True)


def render_report(page: Mapping[str, Any]) -> str:
    """The HTML of one report (``templates/report.html.j2``, autoescaped)."""
    return _env().get_template("report.html.j2").render(p=page)


def render_index(index: Mapping[str, Any]) -> str:
    """The HTML of ``reports/index.html`` (``templates/index.html.j2``, autoescaped)."""
    return _env().get_template("index.html.j2").render(ix=index)
