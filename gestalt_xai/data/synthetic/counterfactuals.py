"""Counterfactual renderings: a synthetic photo again, with planted features removed or the confounder mark changed.

Each variant of a photo of the plan (:func:`~gestalt_xai.data.synthetic.cohort.plan_cohort`) is rendered from exactly
the inputs of the factual photo (:func:`~gestalt_xai.data.synthetic.cohort.render_image`): the subject's identity,
the photo's pose, light, background, camera, noise seed and JPEG quality. Only the phenotype effects handed to
:func:`~gestalt_xai.data.synthetic.phenotypes.apply_features`, or the mark, differ. Every random draw of the renderer
depends on the identity and the photo alone (:func:`~gestalt_xai.data.synthetic.renderer.render_photo`), so a variant
consumes the same draws, and a variant that changes nothing is the factual JPEG byte for byte
(:func:`render_counterfactual`).

Variants of a photo, in this order (``mask_bit`` is the variant's bit in the change-mask image):

* ``without_<feature>``: one planted feature removed, for each planted feature (effect > 0) including the
  out-of-crop negative controls; ``mask_bit`` is the feature's bit in ``truth/features.parquet``;
* ``without_all_features``: every planted feature removed (the mark, if any, stays); bit 6;
* ``without_mark`` (marked photos) or ``with_mark`` (unmarked ones), when the cohort has a confounder; bit 7.

Photos selected by ``counterfactuals.mark_sets`` but not by ``sets`` get the mark variant only
(:func:`render_mark_counterfactuals`): the Clever-Hans effect measured on training photos too, at one rendering each.

The *change mask* of a variant is the set of pixels where ``|factual − counterfactual|`` exceeds
:data:`CHANGE_THRESHOLD` (more than one 8-bit level in any channel), compared on
:attr:`~gestalt_xai.data.synthetic.renderer.RenderedPhoto.clean`, the photos before sensor noise and JPEG: the
pixels the feature (or the mark) changes, a subset of its region mask (the pixels it may change; the tests check both
for every catalogue feature). After noise and JPEG the two files also differ in the 8×8 JPEG blocks the change
touches (:func:`~gestalt_xai.data.synthetic.renderer.encode_jpeg` does not subsample chroma).

Files and table: see :mod:`~gestalt_xai.data.synthetic.truth`. The synth stage renders them in a second pass (the
split that selects the photos is drawn after the first), in the same worker processes, resumable through its own
ledger (:func:`write_counterfactuals`).
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gestalt_xai.data.synthetic.cohort import (
    CohortPlan,
    ImagePlan,
    SynthConfig,
    photo_conditions,
    planted_features,
    subject_identity,
)
from gestalt_xai.data.synthetic.phenotypes import apply_features
from gestalt_xai.data.synthetic.renderer import RenderedPhoto, Scene, prepare_scene, render_photo
from gestalt_xai.data.synthetic.truth import (
    ALL_FEATURES_BIT,
    CONFOUNDER_BIT,
    COUNTERFACTUAL_COLUMNS,
    COUNTERFACTUALS_DIR,
    encode_mask_bits,
)

__all__ = [
    "CHANGE_THRESHOLD",
    "WITHOUT_ALL",
    "Variant",
    "CounterfactualItem",
    "plan_variants",
    "render_counterfactual",
    "change_mask",
    "render_counterfactuals",
    "select_images",
    "write_counterfactuals",
]

#: a pixel is changed when some channel differs by more than this many 8-bit levels (of 255) before noise and JPEG
CHANGE_THRESHOLD = 1.0
WITHOUT_ALL = "without_all_features"
#: split sets each ``counterfactuals.sets`` value selects (``undiagnosed`` photos count as test photos)
SET_MEMBERS = {"test": ("test", "frequent_test", "rare_test", "undiagnosed"), "train": ("train",), "val": ("val",)}


@dataclass(frozen=True)
class Variant:
    """One counterfactual of a photo: its name, what changes, and what is rendered."""

    name: str
    feature: str  # feature key | "all" | "mark"
    change: str  # "remove" | "add"
    mask_bit: int
    effects: dict[str, float] = field(hash=False)
    mark: bool


def plan_variants(image: ImagePlan, mark_variants: bool, features: bool = True) -> list[Variant]:
    """The variants of ``image`` (module docstring); ``mark_variants``: the cohort has a confounder and they are on;
    ``features``: also the feature removals (off for photos only ``counterfactuals.mark_sets`` selects)."""
    effects = image.subject.effects
    planted = planted_features(effects) if features else []
    out = [Variant(f"without_{key}", key, "remove", bit, {k: v for k, v in effects.items() if k != key}, image.mark)
           for bit, key in enumerate(planted)]
    if planted:
        out.append(Variant(WITHOUT_ALL, "all", "remove", ALL_FEATURES_BIT, {}, image.mark))
    if mark_variants:
        name, change = ("without_mark", "remove") if image.mark else ("with_mark", "add")
        out.append(Variant(name, "mark", change, CONFOUNDER_BIT, dict(effects), not image.mark))
    return out


def render_counterfactual(cfg: SynthConfig, image: ImagePlan, remove: Iterable[str] = (),
                          mark: bool | None = None) -> RenderedPhoto:
    """``image`` rendered with the features in ``remove`` taken out and the mark on or off (``None``: as in the
    factual photo), with :attr:`~gestalt_xai.data.synthetic.renderer.RenderedPhoto.clean`. With nothing removed and
    the mark unchanged it is the factual photo: the same JPEG bytes as
    :func:`~gestalt_xai.data.synthetic.cohort.render_image`."""
    remove = set(remove)
    unknown = remove - set(planted_features(image.subject.effects))
    if unknown:
        raise KeyError(f"{image.image_id}: {', '.join(sorted(unknown))} not planted in this photo")
    effects = {k: v for k, v in image.subject.effects.items() if k not in remove}
    return _render(cfg, image, effects, image.mark if mark is None else mark)


def _render(cfg: SynthConfig, image: ImagePlan, effects: dict[str, float], mark: bool,
            scene: Scene | None = None) -> RenderedPhoto:
    base, look = subject_identity(cfg, image.subject)
    return render_photo(apply_features(base, effects), look, photo_conditions(cfg, image), mark=mark, clean=True,
                        scene=scene)


def change_mask(factual_clean: np.ndarray, counterfactual_clean: np.ndarray) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels a counterfactual changes (:data:`CHANGE_THRESHOLD`, any channel).

    >>> a = np.zeros((1, 3, 3), np.float32)
    >>> change_mask(a, a + np.array([[[0, 0, 1.0]], [[0, 2.0, 0]], [[0, 0, 0]]]).reshape(1, 3, 3)).tolist()
    [[False, True, False]]
    """
    return np.abs(np.asarray(counterfactual_clean, np.float32) - np.asarray(factual_clean, np.float32)).max(-1) \
        > CHANGE_THRESHOLD


@dataclass
class CounterfactualItem:
    """The counterfactuals of one photo: JPEG bytes per variant, the change-mask PNG and the table rows."""

    image_id: str
    jpegs: dict[str, bytes]
    mask_png: bytes
    rows: list[dict[str, Any]]


def _relative(image_id: str, variant: str) -> str:
    return f"{COUNTERFACTUALS_DIR}/images/{image_id}/{variant}.jpg"


def render_counterfactuals(cfg: SynthConfig, image: ImagePlan) -> CounterfactualItem:
    """Render every variant of ``image`` (:func:`plan_variants`) and its change mask. Variants that render the same
    phenotype and mark (e.g. ``without_all_features`` of a photo with one feature) are rendered once, and all share
    the photo's :class:`~gestalt_xai.data.synthetic.renderer.Scene` (drawn once)."""
    return _render_variants(cfg, image, features=True)


def render_mark_counterfactuals(cfg: SynthConfig, image: ImagePlan) -> CounterfactualItem:
    """Only the mark variant of ``image`` (``without_mark`` or ``with_mark``) and its change mask: the photos
    ``counterfactuals.mark_sets`` selects beyond ``sets``."""
    return _render_variants(cfg, image, features=False)


def _render_variants(cfg: SynthConfig, image: ImagePlan, features: bool) -> CounterfactualItem:
    base, look = subject_identity(cfg, image.subject)
    scene = prepare_scene(base, look, photo_conditions(cfg, image))
    factual = _render(cfg, image, image.subject.effects, image.mark, scene)
    size = factual.clean.shape[:2]
    rendered: dict[tuple[tuple[tuple[str, float], ...], bool], tuple[bytes, np.ndarray]] = {}
    layers: dict[int, np.ndarray] = {}
    jpegs, rows = {}, []
    for v in plan_variants(image, cfg.confounder is not None and cfg.counterfactuals.mark, features):
        key = (tuple(sorted((k, e) for k, e in v.effects.items() if e > 0)), v.mark)
        if key not in rendered:
            out = _render(cfg, image, v.effects, v.mark, scene)
            rendered[key] = (out.jpeg, change_mask(factual.clean, out.clean))
        jpegs[v.name], layers[v.mask_bit] = rendered[key]
        rows.append({"image_id": image.image_id, "variant": v.name, "feature": v.feature, "change": v.change,
                     "path": _relative(image.image_id, v.name), "change_px": int(layers[v.mask_bit].sum()),
                     "mask_bit": v.mask_bit})
    features = [layers[b] for b in sorted(b for b in layers if b < ALL_FEATURES_BIT)]
    png = encode_mask_bits(features, layers.get(ALL_FEATURES_BIT), layers.get(CONFOUNDER_BIT), size)
    return CounterfactualItem(image.image_id, jpegs, png, rows)


def select_images(sets: Sequence[str], splits: pd.DataFrame, image_ids: Iterable[str],
                  undiagnosed: Iterable[str]) -> list[str]:
    """Sorted ids of the photos ``sets`` selects (``counterfactuals.sets``): members of the named sets of the long
    split table drawn on the true labels, plus the ``undiagnosed`` photos for ``test``; ``all``: every one of
    ``image_ids``.

    >>> sp = pd.DataFrame({"image_id": ["1", "1", "2", "3", "3"], "set": ["train", "frequent_gallery", "val",
    ...                    "rare_test", "rare_gallery"], "split": [-1, -1, -1, 0, 1]})
    >>> ids = ["1", "2", "3", "4", "5"]
    >>> select_images(["test"], sp, ids, ["4"]), select_images(["train", "val"], sp, ids, [])
    (['3', '4'], ['1', '2'])
    >>> select_images([], sp, ids, [])
    []
    >>> select_images(["all"], sp, ids, [])
    ['1', '2', '3', '4', '5']
    """
    if "all" in sets:
        return sorted({str(i) for i in image_ids})
    wanted = {m for s in sets for m in SET_MEMBERS[s]}
    ids = set(splits.loc[splits["set"].isin(wanted), "image_id"].astype(str))
    if "test" in sets:
        ids |= {str(i) for i in undiagnosed}
    return sorted(ids)


def _files_exist(root: Path, rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and all((root / r["path"]).is_file() for r in rows) and (
        root / COUNTERFACTUALS_DIR / "change_masks" / f"{rows[0]['image_id']}.png").is_file()


def write_counterfactuals(cfg: SynthConfig, plan: CohortPlan, out_dir: Path, image_ids: Sequence[str],
                          done: dict[str, list[dict[str, Any]]] | None, on_item: Callable[[str, list], None] | None,
                          render: Callable[..., Iterator[CounterfactualItem]],
                          mark_only_ids: Sequence[str] = ()) -> dict[str, int]:
    """Write the counterfactuals of ``image_ids`` (every variant) and of ``mark_only_ids`` (the mark variant only)
    into ``<out_dir>/counterfactuals/`` and return counts.

    ``done`` maps photos whose counterfactuals an earlier run wrote to their table rows (reused when their files
    exist and their variants are the ones planned now); ``on_item(image_id, rows)`` is called after each newly
    written photo; ``render`` is the cohort's renderer (its worker processes). Photos without a variant (no planted
    feature, no confounder) are skipped. Files of photos no longer selected are removed; with none selected the
    folder goes.
    """
    from gestalt_xai.runs import atomic_write_bytes, write_parquet

    root = out_dir / COUNTERFACTUALS_DIR
    mark_variants = cfg.confounder is not None and cfg.counterfactuals.mark
    full, mark_only = set(image_ids), set(mark_only_ids) - set(image_ids)
    planned = {im.image_id: [v.name for v in plan_variants(im, mark_variants, im.image_id in full)]
               for im in plan.images if im.image_id in full | mark_only}
    wanted = {k for k, names in planned.items() if names}
    if not wanted:
        if root.exists():
            shutil.rmtree(root)
        return {"n_counterfactual_images": 0, "n_counterfactuals": 0, "n_counterfactuals_rendered": 0}
    done = {k: v for k, v in (done or {}).items()
            if k in wanted and [r["variant"] for r in v] == planned[k] and _files_exist(out_dir, v)}
    todo = [im for im in plan.images if im.image_id in wanted and im.image_id not in done]
    rows = {k: list(v) for k, v in done.items()}
    items = itertools.chain(
        render(render_counterfactuals, [im for im in todo if im.image_id in full], "synth: counterfactuals",
               per_worker=2),
        render(render_mark_counterfactuals, [im for im in todo if im.image_id not in full],
               "synth: mark counterfactuals", per_worker=4))
    for item in items:
        for name, data in item.jpegs.items():
            atomic_write_bytes(out_dir / _relative(item.image_id, name), data)
        atomic_write_bytes(root / "change_masks" / f"{item.image_id}.png", item.mask_png)
        rows[item.image_id] = item.rows
        if on_item is not None:
            on_item(item.image_id, item.rows)
    table = pd.DataFrame([r for i in sorted(rows) for r in rows[i]], columns=COUNTERFACTUAL_COLUMNS)
    table = table.astype({"change_px": "int64", "mask_bit": "int64"}).sort_values(["image_id", "mask_bit"])
    write_parquet(table.reset_index(drop=True), root / "counterfactuals.parquet")
    # what an earlier run with other options wrote and this one does not list
    keep = {(out_dir / p).resolve() for p in table["path"]} | {
        (root / "change_masks" / f"{i}.png").resolve() for i in rows} | {(root / "counterfactuals.parquet").resolve()}
    for p in sorted(root.rglob("*"), reverse=True):
        if p.is_file() and p.resolve() not in keep:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    return {"n_counterfactual_images": len(rows), "n_counterfactuals": len(table),
            "n_counterfactuals_rendered": len(todo)}
