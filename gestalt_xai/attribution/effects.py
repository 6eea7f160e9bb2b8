"""What the model uses, measured: the score change when a planted feature or the confounder mark is edited.

A synthetic photo's counterfactual renderings (``cohort/counterfactuals/``, read through
:meth:`~gestalt_xai.runs.Run.counterfactuals` and :meth:`~gestalt_xai.runs.Run.counterfactual_crops`) are the same
photo with one planted feature removed (``without_<feature>``), all removed (``without_all_features``), the mark
removed (``without_mark``) or added (``with_mark``), warped into the crop with the factual photo's own alignment. For
an explained ``(image, model, target)`` the effect of a variant is

.. math:: \\Delta = s(x) - s(x_{\\text{variant}})

through the *same* :class:`~gestalt_xai.attribution.score_model.ScoreModel` the maps explain: the work items are
planned by the explain stage's target kind (:class:`~gestalt_xai.attribution.planning.ExplainSetup`), batched and
targeted as the maps are (:func:`~gestalt_xai.attribution.planning.batches`,
:func:`~gestalt_xai.attribution.planning.build_targets`), so members, TTA slots and references (e.g. the centroid
without the patient's own subject) are the maps'. ``Δ > 0`` for a removal: the feature raised the score (the model
uses it); ``Δ < 0`` for an addition: the edit raised it. A variant whose crop equals the factual crop has
``Δ = 0`` exactly (it is not run again). Forward passes only, batched, without gradients. This is the deletion
logic of occlusion analysis (Zeiler & Fergus, ECCV 2014) with edits that remove exactly one planted cause.

Besides the explained targets, :func:`measure_mark_effects` measures the Clever-Hans effect of the mark on the
confounded syndrome's centroid score (``centroid:<S>``, own subject left out) for every photo with a mark variant:
removing it from marked photos of ``S``, adding it to photos of other syndromes.

The explain stage runs both after its maps (:func:`explain_effects`) and upserts the rows into one table per run,
``maps/effects.parquet`` (:data:`EFFECT_COLUMNS`, keyed by :data:`EFFECT_KEY`, sorted; :func:`load_effects` reads
it). Rows already there for the same model hash are not measured again, so a rerun is cheap and a killed run
resumes. Images without counterfactuals have no rows; a real cohort has none at all, and the pass then loads
nothing and writes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from gestalt_xai.attribution.planning import ExplainSetup, GroupPlan, batches, build_targets
from gestalt_xai.attribution.score_model import ScoreModel
from gestalt_xai.errors import ConfigError, InputError, error_kind
from gestalt_xai.runs import LAYOUT, ErrorRow, write_parquet
from gestalt_xai.stages import StageResult

if TYPE_CHECKING:
    from gestalt_xai.runs import Run

__all__ = ["EFFECTS_FILE", "EFFECT_KEY", "EFFECT_COLUMNS", "MARK_VARIANTS", "effect_scores", "measure_effects",
           "measure_mark_effects", "load_effects", "upsert_effects", "explain_effects"]

log = logging.getLogger(__name__)

#: the run's effects table (relative to the run folder)
EFFECTS_FILE = f"{LAYOUT.maps}/effects.parquet"
#: one row per explained (image, model, target) and counterfactual variant
EFFECT_KEY = ["image_id", "model_id", "target", "variant"]
EFFECT_COLUMNS = [*EFFECT_KEY, "feature", "change", "score", "counterfactual_score", "delta", "model_hash"]
#: the variants that remove or add the confounder mark
MARK_VARIANTS = ("without_mark", "with_mark")
_FLOATS = ("score", "counterfactual_score", "delta")


def effect_scores(score_model: ScoreModel, factual: np.ndarray, counterfactual: np.ndarray,
                  rows: Sequence[int], *, batch_size: int = 64,
                  device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Scores of factual crops and of counterfactual crops under the factual row's target.

    Parameters
    ----------
    score_model : the batch's ScoreModel; its targets have one row per factual crop.
    factual : ``(B, 112, 112, 3)`` uint8 RGB crops, in the score model's row order.
    counterfactual : ``(M, 112, 112, 3)`` uint8 RGB crops.
    rows : ``(M,)`` the factual row each counterfactual belongs to (its target is that row's).
    batch_size : crops per forward pass.

    Returns
    -------
    ``(scores (B,), counterfactual_scores (M,))`` as float64; a counterfactual equal to its factual crop gets the
    factual's score (``Δ = 0`` exactly).

    >>> from gestalt_xai.models import build_gestaltmatcher
    >>> from gestalt_xai.attribution.targets import LogitTarget
    >>> m = build_gestaltmatcher("r18", width=0.125, num_classes=2).eval()
    >>> x = np.zeros((1, 112, 112, 3), np.uint8)
    >>> s, c = effect_scores(ScoreModel([("m", m)], LogitTarget([1])), x, x, [0])
    >>> float(s[0] - c[0])
    0.0
    """
    from gestalt_xai.models.gestaltmatcher import preprocess

    factual = np.asarray(factual, np.uint8)
    counterfactual = np.asarray(counterfactual, np.uint8).reshape(-1, *factual.shape[1:])
    rows = np.asarray(rows, np.int64).reshape(-1)
    if len(rows) != len(counterfactual):
        raise ValueError(f"{len(rows)} rows for {len(counterfactual)} counterfactual crops")
    same = np.array([np.array_equal(c, factual[r]) for c, r in zip(counterfactual, rows, strict=True)], bool)
    images = np.concatenate([factual, counterfactual[~same]])
    owner = np.concatenate([np.arange(len(factual)), rows[~same]])
    out = np.empty(len(images), np.float64)
    with torch.no_grad():
        for a in range(0, len(images), batch_size):
            x = preprocess(images[a: a + batch_size], channel_order="RGB", device=device)
            out[a: a + batch_size] = score_model.select(owner[a: a + batch_size].tolist())(x).double().cpu().numpy()
    scores = out[: len(factual)]
    cf_scores = np.empty(len(counterfactual), np.float64)
    cf_scores[same] = scores[rows[same]]
    cf_scores[~same] = out[len(factual):]
    return scores, cf_scores


def _empty() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype=object) for c in EFFECT_COLUMNS})
    return frame.astype({c: np.float64 for c in _FLOATS})


def _finish(rows: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=EFFECT_COLUMNS) if len(rows) else _empty()
    frame = frame.astype({c: np.float64 for c in _FLOATS})
    return frame.sort_values(EFFECT_KEY, kind="stable").reset_index(drop=True)


def _counterfactuals(run: Run, image_ids: Sequence[str] | None) -> pd.DataFrame:
    """The counterfactual variants whose crops exist, of ``image_ids`` (every image when ``None``); empty when the
    run has no counterfactual crops."""
    if not (run.path / LAYOUT.counterfactual_crop_table).exists():
        return pd.DataFrame(columns=["image_id", "variant", "feature", "change"])
    table = run.counterfactuals()
    if image_ids is not None:
        table = table[table["image_id"].astype(str).isin({str(i) for i in image_ids})]
    return table


def _measure(run: Run, setup: ExplainSetup, plan: GroupPlan, variants: pd.DataFrame, skip: set[tuple[str, ...]],
             errors: list[ErrorRow]) -> list[dict[str, Any]]:
    """Effect rows of one model group's items for their ``variants`` (rows of :meth:`Run.counterfactuals`)."""
    from gestalt_xai.data.aligned import load_crops

    by_image = {str(i): grp for i, grp in variants.groupby(variants["image_id"].astype(str), sort=True)}
    wanted: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for it in plan.items:
        todo = [v for v in by_image.get(it.image_id, variants.iloc[:0]).to_dict("records")
                if (it.image_id, plan.group_id, str(it.target), str(v["variant"]), plan.model_hash) not in skip]
        if todo:
            wanted[(it.image_id, str(it.target))] = todo
    items = [it for it in plan.items if (it.image_id, str(it.target)) in wanted]
    out: list[dict[str, Any]] = []
    for batch in batches(items, max(setup.cfg.batch_size, 16)):
        def error(kind: str, message: str, batch: list[Any] = batch) -> None:
            errors.extend(ErrorRow(it.image_id, kind, message, {"model_id": plan.group_id, "target": str(it.target),
                                                               "pass": "effects"}) for it in batch)

        try:
            score_model = ScoreModel(list(plan.group), build_targets(batch, plan.group, setup.slots, setup.kind),
                                     setup.slots)
            factual = load_crops(run, [it.image_id for it in batch])
            crops, owners, meta = [], [], []
            for i, it in enumerate(batch):
                available = run.counterfactual_crops(it.image_id)
                for v in wanted[(it.image_id, str(it.target))]:
                    crops.append(available[str(v["variant"])])
                    owners.append(i)
                    meta.append((it, v))
        except (ConfigError, InputError, KeyError) as exc:
            error(error_kind(exc) if not isinstance(exc, KeyError) else "input", str(exc))
            continue
        scores, cf_scores = effect_scores(score_model, factual, np.stack(crops), owners, device=setup.cfg.device)
        for (it, v), i, c in zip(meta, owners, cf_scores, strict=True):
            out.append({"image_id": it.image_id, "model_id": plan.group_id, "target": str(it.target),
                        "variant": str(v["variant"]), "feature": str(v["feature"]), "change": str(v["change"]),
                        "score": float(scores[i]), "counterfactual_score": float(c),
                        "delta": float(scores[i]) - float(c), "model_hash": plan.model_hash})
    return out


def measure_effects(run: Run, cfg: Any, image_ids: Sequence[str] | None = None, *, setup: ExplainSetup | None = None,
                    skip: set[tuple[str, ...]] | None = None) -> pd.DataFrame:
    """Effect rows (:data:`EFFECT_COLUMNS`) of every explained ``(image, model, target)`` of the explain options
    ``cfg`` whose image has counterfactuals: the selected images (``cfg.images``), or ``image_ids``.

    ``setup`` reuses what the explain stage loaded; ``skip`` holds ``(image_id, model_id, target, variant,
    model_hash)`` keys already measured. Planning errors are those of the maps (the explain stage records them).
    """
    variants = _counterfactuals(run, image_ids)
    if not len(variants):
        return _empty()
    setup = setup or ExplainSetup.build(run, cfg)
    ids = sorted(set(setup.image_ids if image_ids is None else map(str, image_ids))
                 & set(variants["image_id"].astype(str)))
    rows: list[dict[str, Any]] = []
    for plan in setup.plans([], ids):
        rows += _measure(run, setup, plan, variants, skip or set(), [])
    return _finish(rows)


def measure_mark_effects(run: Run, cfg: Any, *, setup: ExplainSetup | None = None,
                         skip: set[tuple[str, ...]] | None = None,
                         errors: list[ErrorRow] | None = None) -> pd.DataFrame:
    """The Clever-Hans effect of the confounder mark (module docstring): effect rows of the target
    ``centroid:<confounded syndrome>`` (own subject left out, the models, slots, gallery and cosine of ``cfg``) for
    every photo with a mark variant. Empty without a confounder or mark variants."""
    from gestalt_xai.assess.planted import confounded_syndrome, read_truth

    variants = _counterfactuals(run, None)
    variants = variants[variants["variant"].isin(MARK_VARIANTS)]
    truth, _ = read_truth(run)  # an unreadable truth is reported by the aggregate stage
    syndrome = confounded_syndrome(truth)
    if not len(variants) or syndrome is None:
        return _empty()
    target_cfg = cfg.model_copy(update={"target": "centroid", "syndromes": [syndrome]})
    setup = setup.retarget(run, target_cfg) if setup is not None else ExplainSetup.build(run, target_cfg)
    ids = sorted(set(variants["image_id"].astype(str)) & set(setup.embeddings["image_id"].astype(str)))
    rows: list[dict[str, Any]] = []
    for plan in setup.plans(errors if errors is not None else [], ids):
        rows += _measure(run, setup, plan, variants, skip or set(), errors if errors is not None else [])
    return _finish(rows)


def load_effects(run: Run) -> pd.DataFrame:
    """The run's effects table (:data:`EFFECTS_FILE`); empty with the same columns when there is none."""
    path = run.path / EFFECTS_FILE
    if not path.exists():
        return _empty()
    return _finish(pd.read_parquet(path))


def upsert_effects(run: Run, rows: pd.DataFrame) -> Path:
    """Replace the table's rows with ``rows``' keys (:data:`EFFECT_KEY`) and write it, sorted."""
    path = run.path / EFFECTS_FILE
    old = load_effects(run)
    keys = pd.MultiIndex.from_frame(rows[EFFECT_KEY].astype(str))
    keep = ~pd.MultiIndex.from_frame(old[EFFECT_KEY].astype(str)).isin(keys)
    write_parquet(_finish(pd.concat([old[keep], rows], ignore_index=True)), path)
    return path


def explain_effects(run: Run, setup: ExplainSetup, errors: list[ErrorRow]) -> StageResult:
    """The explain stage's effects pass: :func:`measure_effects` of its items and :func:`measure_mark_effects`,
    upserted into :data:`EFFECTS_FILE`. Nothing is loaded or written when the run has no counterfactuals."""
    t0 = time.perf_counter()
    if not len(_counterfactuals(run, None)):
        return StageResult()
    old = load_effects(run)
    skip = set(zip(*(old[c].astype(str) for c in [*EFFECT_KEY, "model_hash"]), strict=True))
    own = measure_effects(run, setup.cfg, setup=setup, skip=skip)
    skip |= set(zip(*(own[c].astype(str) for c in [*EFFECT_KEY, "model_hash"]), strict=True))
    mark = measure_mark_effects(run, setup.cfg, setup=setup, skip=skip, errors=errors)
    new = _finish(pd.concat([own, mark], ignore_index=True))
    seconds = time.perf_counter() - t0
    if not len(new):
        return StageResult(extra={"effects": {"n_new": 0, "seconds": round(seconds, 3)}})
    path = upsert_effects(run, new)
    n_images = new["image_id"].nunique()
    line = (f"effects: {len(new)} score changes under counterfactual edits ({n_images} images, "
            f"{new['model_id'].nunique()} model(s)) → {run.relative(path)} in {seconds:.1f} s")
    return StageResult(summary=[line], outputs={"effects": path},
                       extra={"effects": {"n_new": int(len(new)), "n_images": int(n_images),
                                          "seconds": round(seconds, 3)}})
