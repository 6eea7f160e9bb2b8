"""The ``synth`` stage: a GMDB-format cohort of rendered faces with planted phenotypes and full ground truth.

The cohort is a pure function of :class:`SynthConfig`: syndromes are designed from ``(seed, 0)``, each subject's
identity and phenotype from ``(seed, 1|2, subject)``, each photo's conditions from ``(seed, 3, image)`` and its
confounder draw from ``(seed, 4, image)``. Photos can therefore be rendered in any order, in parallel, or resumed
after an interruption, and the files come out byte-identical.

Class sizes follow GMDB's long tail: ``n_frequent`` syndromes with more than six subjects (geometrically
decreasing from ``frequent_subjects[1]`` to ``frequent_subjects[0]``) and the rest rare, with 2–6 subjects each.
Unaffected controls form their own class (``S00``).

With ``counterfactuals`` (default: the test photos), a second pass renders each selected photo again with planted
features removed and the mark removed or added (:mod:`.counterfactuals`) into ``counterfactuals/``, beside the
cohort tables and never in them.

With ``undiagnosed: N``, N test subjects of frequent syndromes (one per syndrome, :func:`undiagnosed_subjects`) are
written to the cohort tables without a diagnosis (label ``unknown``, split set ``undiagnosed``): the demo's new
patients, ranked against the gallery and explained towards their suggestions. Their true syndrome stays in
``truth/images.parquet`` (column ``undiagnosed`` marks them), and every other image keeps the split it has without
the option (splits are drawn on the true labels first).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from gestalt_xai.config import StageConfig
from gestalt_xai.data.synthetic.face_model import FaceShape, Pose
from gestalt_xai.data.synthetic.identity import Appearance, PhotoConditions, sample_identity, sample_photo
from gestalt_xai.data.synthetic.phenotypes import (
    PHENOTYPES,
    Syndrome,
    apply_features,
    design_syndromes,
    express,
    feature_regions,
    rasterise_regions,
)
from gestalt_xai.data.synthetic.renderer import MARK_CENTRE, MARK_RADIUS, RenderedPhoto, render_photo
from gestalt_xai.data.synthetic.truth import COUNTERFACTUALS_DIR, MAX_FEATURE_BITS, encode_mask_bits
from gestalt_xai.faces.align import CROP_SIZE
from gestalt_xai.runs import LAYOUT, Run
from gestalt_xai.stages import CliAction, StageResult, stage

log = logging.getLogger(__name__)

__all__ = [
    "ConfounderConfig",
    "CounterfactualConfig",
    "SynthConfig",
    "SubjectPlan",
    "ImagePlan",
    "CohortPlan",
    "CONTROL_ID",
    "plan_cohort",
    "undiagnosed_subjects",
    "render_image",
    "planted_features",
    "synth_stage",
    "generate_cohort",
]

CONTROL_ID = "S00"
CONTROL_NAME = "Unaffected (control)"


class ConfounderConfig(StageConfig):
    """A spurious cue correlated with one syndrome: a small dark mark on the image-right cheek (inside the crop)."""

    syndrome: str = Field("S01", description="syndrome id whose photos carry the mark at `rate`")
    rate: float = Field(0.8, ge=0.0, le=1.0, description="share of that syndrome's photos with the mark")
    base_rate: float = Field(0.0, ge=0.0, le=1.0, description="share of all other photos with the mark")


class CounterfactualConfig(StageConfig):
    """Which photos get counterfactual renderings (:mod:`~gestalt_xai.data.synthetic.counterfactuals`)."""

    sets: list[Literal["test", "train", "val", "all"]] = Field(
        ["test"], description="photos to render counterfactuals of: test (frequent_test, rare_test and undiagnosed "
                              "photos), train, val, all; [] for none")
    mark: bool = Field(True, description="also render without_mark / with_mark (when the cohort has a confounder)")
    mark_sets: list[Literal["test", "train", "val", "all"]] | None = Field(
        None, description="photos that get the mark variants (without_mark / with_mark) only, beyond those of sets "
                          "(e.g. [train] to measure the Clever-Hans effect on training photos too); null: none")


class SynthConfig(StageConfig):
    """Options of the synthetic cohort (``gestalt-xai synth``)."""

    version: str = Field("synthetic-v1", description="GMDB version suffix of the written files")
    seed: int = Field(0, ge=0)
    n_syndromes: int = Field(12, ge=1, le=60)
    n_frequent: int = Field(4, ge=0, description="syndromes with more than 6 subjects; the rest have 2–6")
    frequent_subjects: tuple[int, int] = Field((8, 16), description="subjects of the smallest/largest frequent one")
    rare_subjects: tuple[int, int] = (2, 6)
    images_per_subject: tuple[int, int] = (1, 4)
    n_controls: int = Field(12, ge=0, description="unaffected subjects (class S00)")
    features_per_syndrome: tuple[int, int] = (1, 4)
    negative_control_rate: float = Field(0.35, ge=0.0, le=1.0,
                                         description="share of syndromes that also carry an out-of-crop feature")
    canvas: tuple[int, int] = Field((320, 400), description="range of the photo width in pixels")
    jpeg_quality: tuple[int, int] = (75, 95)
    confounder: ConfounderConfig | None = None
    undiagnosed: int = Field(0, ge=0, description="test subjects of frequent syndromes (one per syndrome, at most "
                                                  "n_frequent) written without a diagnosis (label unknown); their "
                                                  "true syndrome stays in truth/")
    counterfactuals: CounterfactualConfig = Field(
        default_factory=CounterfactualConfig, description="counterfactual renderings (features removed, mark removed "
                                                          "or added) of some photos, beside the cohort tables")
    workers: int = Field(2, ge=1, le=64, description="rendering processes (does not change the output)")

    @field_validator("frequent_subjects", "rare_subjects", "images_per_subject", "features_per_syndrome", "canvas",
                     "jpeg_quality")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] > v[1] or v[0] < 1:
            raise ValueError(f"expected (low, high) with 1 ≤ low ≤ high, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SynthConfig:
        if self.n_frequent > self.n_syndromes:
            raise ValueError(f"n_frequent ({self.n_frequent}) exceeds n_syndromes ({self.n_syndromes})")
        if self.undiagnosed > self.n_frequent:
            raise ValueError(f"undiagnosed ({self.undiagnosed}) exceeds n_frequent ({self.n_frequent}): at most one "
                             "test subject per frequent syndrome is left undiagnosed")
        if self.n_frequent and self.frequent_subjects[0] < 7:
            raise ValueError("frequent syndromes need more than 6 subjects (GMDB protocol): frequent_subjects ≥ 7")
        if self.rare_subjects[1] > 6 or self.rare_subjects[0] < 2:
            raise ValueError("rare syndromes have 2–6 subjects (GMDB protocol)")
        if self.features_per_syndrome[1] > MAX_FEATURE_BITS:
            raise ValueError(f"at most {MAX_FEATURE_BITS} features per syndrome")
        if self.canvas[0] < 160 or self.canvas[1] > 2048:
            raise ValueError("canvas width must lie in 160..2048 pixels")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError("jpeg_quality must lie in 1..100")
        if self.confounder is not None and self.confounder.syndrome != CONTROL_ID:
            valid = {f"S{i:02d}" for i in range(1, self.n_syndromes + 1)}
            if self.confounder.syndrome not in valid:
                raise ValueError(f"confounder.syndrome {self.confounder.syndrome!r} is not one of S01..S"
                                 f"{self.n_syndromes:02d}")
        return self


# ------------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class SubjectPlan:
    subject_id: str
    syndrome_id: str
    index: int
    effects: dict[str, float]


@dataclass(frozen=True)
class ImagePlan:
    image_id: str
    index: int
    subject: SubjectPlan
    mark: bool


@dataclass(frozen=True)
class CohortPlan:
    config: SynthConfig
    syndromes: list[Syndrome]
    subjects: list[SubjectPlan]
    images: list[ImagePlan]


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def class_sizes(cfg: SynthConfig) -> list[int]:
    """Subjects per syndrome: geometric decay over the frequent ones, uniform 2–6 for the rare ones."""
    rng = _rng(cfg.seed, 5)
    lo, hi = cfg.frequent_subjects
    nf = cfg.n_frequent
    freq = [int(round(hi * (lo / hi) ** (i / max(nf - 1, 1)))) for i in range(nf)]
    rare = sorted((int(v) for v in rng.integers(cfg.rare_subjects[0], cfg.rare_subjects[1] + 1,
                                                 cfg.n_syndromes - nf)), reverse=True)
    return freq + rare


def plan_cohort(cfg: SynthConfig) -> CohortPlan:
    """Syndromes, subjects (with their expressed phenotypes) and photos of a cohort, without rendering anything."""
    syndromes = design_syndromes(cfg.n_syndromes, _rng(cfg.seed, 0), cfg.features_per_syndrome[0],
                                 cfg.features_per_syndrome[1], cfg.negative_control_rate)
    sizes = class_sizes(cfg)
    groups: list[tuple[str, Syndrome | None, int]] = [(s.syndrome_id, s, n) for s, n in zip(syndromes, sizes,
                                                                                           strict=True)]
    if cfg.n_controls:
        groups.insert(0, (CONTROL_ID, None, cfg.n_controls))
    subjects: list[SubjectPlan] = []
    images: list[ImagePlan] = []
    for sid, syn, n in groups:
        for _ in range(n):
            k = len(subjects)
            subj = SubjectPlan(subject_id=f"{k + 1:04d}", syndrome_id=sid, index=k,
                               effects=express(syn, _rng(cfg.seed, 2, k)))
            subjects.append(subj)
            n_img = int(_rng(cfg.seed, 6, k).integers(cfg.images_per_subject[0], cfg.images_per_subject[1] + 1))
            for _ in range(n_img):
                j = len(images)
                mark = False
                if cfg.confounder is not None:
                    rate = cfg.confounder.rate if sid == cfg.confounder.syndrome else cfg.confounder.base_rate
                    mark = bool(_rng(cfg.seed, 4, j).random() < rate)
                images.append(ImagePlan(image_id=f"{j + 1:05d}", index=j, subject=subj, mark=mark))
    return CohortPlan(cfg, syndromes, subjects, images)


def undiagnosed_subjects(plan: CohortPlan, splits: pd.DataFrame, images: pd.DataFrame) -> list[str]:
    """The subjects written without a diagnosis: for each of the first ``undiagnosed`` frequent syndromes (in id
    order), its test subject (in the GMDB splits drawn on the true labels) with the fewest photos, the first by id
    among equals, so the frequent protocol keeps as many test photos as it can.

    ``splits`` is the long split table (:func:`~gestalt_xai.data.cohort.gmdb_splits`), ``images`` maps image ids to
    ``subject_id``.
    """
    n = plan.config.undiagnosed
    if not n:
        return []
    subject_of = images.set_index("image_id")["subject_id"]
    photos = subject_of.loc[splits.loc[splits["set"] == "frequent_test", "image_id"]].value_counts()
    chosen = []
    for syndrome in plan.syndromes[: plan.config.n_frequent][:n]:
        own = sorted((int(photos[s.subject_id]), s.subject_id) for s in plan.subjects
                     if s.syndrome_id == syndrome.syndrome_id and s.subject_id in photos.index)
        chosen += [subject for _, subject in own[:1]]
    return chosen


# ------------------------------------------------------------------------------------------------- rendering
def subject_identity(cfg: SynthConfig, subject: SubjectPlan) -> tuple[FaceShape, Appearance]:
    """The identity (shape without phenotype, appearance) of a subject."""
    return sample_identity(_rng(cfg.seed, 1, subject.index))


def photo_conditions(cfg: SynthConfig, image: ImagePlan) -> PhotoConditions:
    """The photo conditions of one image."""
    return sample_photo(_rng(cfg.seed, 3, image.index), cfg.canvas, cfg.jpeg_quality)


def planted_features(effects: dict[str, float]) -> list[str]:
    """The planted features (effect > 0) in catalogue order: feature ``i`` has bit ``i`` in the mask images."""
    return [k for k in PHENOTYPES if effects.get(k, 0.0) > 0]


def _crop_fraction(mask: np.ndarray, lm5: np.ndarray) -> float:
    from gestalt_xai.faces.align import estimate_transform, transform_points

    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0
    M = estimate_transform(lm5)
    pts = transform_points(np.column_stack([xs + 0.5, ys + 0.5]), M)
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < CROP_SIZE) & (pts[:, 1] >= 0) & (pts[:, 1] < CROP_SIZE)
    return float(inside.mean())


def mark_mask(shape: FaceShape, pose: Pose, size: tuple[int, int]) -> np.ndarray:
    """Photo-space mask of the confounder mark."""
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    poly = np.column_stack([MARK_CENTRE[0] + MARK_RADIUS * np.cos(t), MARK_CENTRE[1] + MARK_RADIUS * 0.9 * np.sin(t)])
    return rasterise_regions([poly], 0.02, shape, pose, size)


def face_mask(lm68: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Photo-space face mask: convex hull of the 68 landmarks (jaw line and brows)."""
    m = np.zeros(size, np.uint8)
    hull = cv2.convexHull(np.round(lm68 * 16).astype(np.int32))
    cv2.fillConvexPoly(m, hull, 1, lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


@dataclass
class RenderedItem:
    """One rendered photo with its encoded files and its truth rows."""

    image_id: str
    jpeg: bytes
    mask_png: bytes
    record: dict[str, Any]
    photo: RenderedPhoto | None = None


def render_image(cfg: SynthConfig, image: ImagePlan, keep_photo: bool = False) -> RenderedItem:
    """Render one photo of the plan, with its masks and truth record."""
    base, look = subject_identity(cfg, image.subject)
    photo = photo_conditions(cfg, image)
    effects = image.subject.effects
    shape = apply_features(base, effects)
    out = render_photo(shape, look, photo, mark=image.mark)
    size = (photo.height, photo.width)
    regions = feature_regions(base, effects)
    masks, rows = [], []
    for bit, key in enumerate(planted_features(effects)):
        polys, margin = regions[key]
        m = rasterise_regions(polys, margin, shape, photo.pose, size)
        masks.append(m)
        feat = PHENOTYPES[key]
        rows.append({"feature": key, "hpo_id": feat.hpo_id, "hpo_name": feat.hpo_name, "region": feat.region,
                     "effect": float(effects[key]), "visible_in_crop": feat.visible_in_crop, "mask_bit": bit,
                     "mask_px": int(m.sum()), "crop_fraction": round(_crop_fraction(m, out.landmarks5), 4)})
    conf = mark_mask(shape, photo.pose, size) if image.mark else None
    png = encode_mask_bits(masks, face_mask(out.landmarks68, size), conf)
    pose = photo.pose
    record = {
        "image_id": image.image_id, "subject_id": image.subject.subject_id, "syndrome_id": image.subject.syndrome_id,
        "is_control": image.subject.syndrome_id == CONTROL_ID, "width": photo.width, "height": photo.height,
        "landmarks5": [round(float(v), 3) for v in out.landmarks5.ravel()],
        "landmarks68": [round(float(v), 3) for v in out.landmarks68.ravel()],
        "inter_pupil_px": round(float(np.linalg.norm(out.landmarks5[1] - out.landmarks5[0])), 3),
        "roll": round(pose.roll, 3), "yaw": round(pose.yaw, 3), "scale": round(pose.scale, 3),
        "light_azimuth": round(photo.light_azimuth, 2), "light_elevation": round(photo.light_elevation, 2),
        "blur_sigma": round(photo.blur_sigma, 3), "noise_sigma": round(photo.noise_sigma, 3),
        "jpeg_quality": photo.jpeg_quality, "skin_tone": round(look.skin_tone, 4), "age": round(base.age, 4),
        "hair_style": look.hair_style, "confounder": bool(image.mark),
        "features": rows,
    }
    return RenderedItem(image.image_id, out.jpeg, png, record, out if keep_photo else None)


_WORKER_CFG: SynthConfig | None = None


def _init_worker(cfg_json: str) -> None:
    global _WORKER_CFG
    cv2.setNumThreads(1)
    _WORKER_CFG = SynthConfig.model_validate_json(cfg_json)


def _call_in_worker(fn: Callable[[SynthConfig, ImagePlan], Any], image: ImagePlan) -> Any:
    assert _WORKER_CFG is not None
    return fn(_WORKER_CFG, image)


@contextlib.contextmanager
def _renderer(cfg: SynthConfig) -> Iterator[Callable[..., Iterator[Any]]]:
    """``render(fn, images, label, per_worker)`` yields ``fn(cfg, image)`` for each image, in order: in ``cfg.workers``
    processes (spawned on first use with at least ``per_worker`` images each, then shared by later calls) or here."""
    from gestalt_xai.progress import progress

    pool: Any = None
    with contextlib.ExitStack() as stack:
        def render(fn: Callable[[SynthConfig, ImagePlan], Any], images: Sequence[ImagePlan], label: str,
                   per_worker: int = 8) -> Iterator[Any]:
            nonlocal pool
            if pool is None and min(cfg.workers, len(images) // per_worker, os.cpu_count() or 1) > 1:
                import multiprocessing as mp

                # spawn, not fork: forking a process whose OpenCV/torch thread pools are live can deadlock the children
                n = min(cfg.workers, os.cpu_count() or 1)
                pool = stack.enter_context(mp.get_context("spawn").Pool(n, initializer=_init_worker,
                                                                        initargs=(cfg.model_dump_json(),)))
            results = (pool.imap(functools.partial(_call_in_worker, fn), images, chunksize=max(1, per_worker // 2))
                       if pool is not None else (fn(cfg, im) for im in images))
            yield from progress(results, label, total=len(images))

        yield render


# ------------------------------------------------------------------------------------------------- writing
def _age_years(a: float) -> float:
    return round(2.0 + 38.0 * a, 1)


IMAGE_TRUTH_COLUMNS = [
    "image_id", "subject_id", "syndrome_id", "is_control", "width", "height", "landmarks5", "landmarks68",
    "inter_pupil_px", "roll", "yaw", "scale", "light_azimuth", "light_elevation", "blur_sigma", "noise_sigma",
    "jpeg_quality", "skin_tone", "age", "hair_style", "confounder",
]


def _tables(plan: CohortPlan, records: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    recs = sorted(records, key=lambda r: r["image_id"])
    img_rows, feat_rows = [], []
    for r in recs:
        img_rows.append({k: v for k, v in r.items() if k != "features"})
        for f in r["features"]:
            feat_rows.append({"image_id": r["image_id"], "subject_id": r["subject_id"],
                              "syndrome_id": r["syndrome_id"], **f})
    feat_rows.sort(key=lambda f: (f["image_id"], f["mask_bit"]))
    # fixed column order: records may come back from the ledger with their keys sorted
    images = pd.DataFrame(img_rows)[IMAGE_TRUTH_COLUMNS]
    images["landmarks5"] = images["landmarks5"].map(lambda v: np.asarray(v, np.float32))
    images["landmarks68"] = images["landmarks68"].map(lambda v: np.asarray(v, np.float32))
    cols = ["image_id", "subject_id", "syndrome_id", "feature", "hpo_id", "hpo_name", "region", "effect",
            "visible_in_crop", "mask_bit", "mask_px", "crop_fraction"]
    features = pd.DataFrame(feat_rows, columns=cols)
    features = features.astype({"effect": "float64", "mask_bit": "int64", "mask_px": "int64",
                                "crop_fraction": "float64", "visible_in_crop": "bool"})
    return images, features


def catalogue_table() -> pd.DataFrame:
    """The phenotype catalogue as a table."""
    return pd.DataFrame([{"feature": f.key, "hpo_id": f.hpo_id, "hpo_name": f.hpo_name, "region": f.region,
                          "visible_in_crop": f.visible_in_crop, "description": f.description}
                         for f in PHENOTYPES.values()])


def _syndrome_json(plan: CohortPlan) -> dict[str, Any]:
    return {
        "config": plan.config.model_dump(mode="json", exclude={"workers"}),
        "control_id": CONTROL_ID,
        "syndromes": [{"syndrome_id": s.syndrome_id, "name": s.name,
                       "features": [asdict(f) for f in s.features]} for s in plan.syndromes],
    }


def generate_cohort(cfg: SynthConfig, out_dir: str | Path, done: dict[str, dict[str, Any]] | None = None,
                    on_item: Any = None, counterfactuals_done: dict[str, list[dict[str, Any]]] | None = None,
                    on_counterfactuals: Any = None) -> dict[str, Any]:
    """Render the cohort of ``cfg`` into ``out_dir`` (GMDB files, ``images/``, ``truth/``, ``counterfactuals/``);
    return a summary.

    ``done`` maps image ids already rendered (by an interrupted run) to their truth records, which are reused;
    ``on_item(image_id, record)`` is called after each newly written photo (the stage records it in its ledger).
    ``counterfactuals_done`` and ``on_counterfactuals(image_id, rows)`` do the same for the counterfactual renderings
    (:func:`~gestalt_xai.data.synthetic.counterfactuals.write_counterfactuals`).
    """
    from gestalt_xai.data.cohort import UNDIAGNOSED, gmdb_splits, write_gmdb
    from gestalt_xai.data.consent import CONSENT_COLUMN
    from gestalt_xai.data.synthetic.counterfactuals import select_images, write_counterfactuals
    from gestalt_xai.runs import atomic_write_bytes, atomic_write_text, write_parquet

    out = Path(out_dir)
    plan = plan_cohort(cfg)
    done = dict(done or {})
    todo = [im for im in plan.images
            if im.image_id not in done or not (out / "images" / f"{im.image_id}.jpg").exists()
            or not (out / "truth" / "masks" / f"{im.image_id}.png").exists()]
    records = {k: v for k, v in done.items() if k not in {im.image_id for im in todo}}

    def store(item: RenderedItem) -> None:
        atomic_write_bytes(out / "images" / f"{item.image_id}.jpg", item.jpeg)
        atomic_write_bytes(out / "truth" / "masks" / f"{item.image_id}.png", item.mask_png)
        records[item.image_id] = item.record
        if on_item is not None:
            on_item(item.image_id, item.record)

    with _renderer(cfg) as render:
        for item in render(render_image, todo, "synth: rendering"):
            store(item)

        images, features = _tables(plan, list(records.values()))
        meta = images[["image_id", "subject_id", "syndrome_id"]].copy()
        meta["age"] = images["age"].map(_age_years)
        # rendered faces of no one: every photo may be shown (reports show gallery faces only where this is true)
        meta[CONSENT_COLUMN] = True
        splits = gmdb_splits(meta, seed=cfg.seed)  # on the true labels: the undiagnosed option moves no one else
        hidden = undiagnosed_subjects(plan, splits, meta)
        images["undiagnosed"] = images["subject_id"].isin(hidden)
        meta.loc[images["undiagnosed"].to_numpy(), "syndrome_id"] = UNDIAGNOSED
        truth = out / "truth"
        write_parquet(images, truth / "images.parquet")
        write_parquet(features, truth / "features.parquet")
        write_parquet(catalogue_table(), truth / "catalogue.parquet")
        atomic_write_text(truth / "syndromes.json",
                          json.dumps(_syndrome_json(plan), indent=2, sort_keys=True) + "\n")
        names = [(CONTROL_ID, CONTROL_NAME)] if cfg.n_controls else []
        names += [(s.syndrome_id, s.name) for s in plan.syndromes]
        syn = pd.DataFrame(names, columns=["syndrome_id", "syndrome_name"])
        write_gmdb(out, meta, syn, cfg.version, seed=cfg.seed, splits=splits)
        # second pass: the splits exist only now
        chosen = select_images(cfg.counterfactuals.sets, splits, images["image_id"],
                               images.loc[images["undiagnosed"], "image_id"])
        undiagnosed = images.loc[images["undiagnosed"], "image_id"]
        mark_only = select_images(cfg.counterfactuals.mark_sets or [], splits, images["image_id"], undiagnosed)
        cf = write_counterfactuals(cfg, plan, out, chosen, counterfactuals_done, on_counterfactuals, render,
                                   mark_only_ids=mark_only)
    return {"n_images": len(plan.images), "n_subjects": len(plan.subjects), "n_syndromes": len(plan.syndromes),
            "n_rendered": len(todo), "n_confounded": int(images["confounder"].sum()), "n_undiagnosed": len(hidden),
            **cf}


def _preview_action(cfg: SynthConfig, value: Path, run_dir: Path) -> list[str]:
    from gestalt_xai.data.synthetic.preview import render_preview

    return [f"preview: {render_preview(cfg, value)}"]


def _data_card_action(cfg: SynthConfig, value: Path, run_dir: Path) -> list[str]:
    from gestalt_xai.data.synthetic.data_card import write_data_card

    return [f"data card → {write_data_card(run_dir, value)}"]


@stage("synth", options=SynthConfig, order=0,
       summary="render the synthetic cohort (planted, HPO-coded phenotypes with ground truth)",
       writes=(LAYOUT.cohort,),
       tiny_options={"n_syndromes": 4, "n_frequent": 3, "frequent_subjects": [8, 9], "n_controls": 6,
                     "images_per_subject": [1, 2], "workers": 1},
       example="gestalt-xai synth --run runs/demo --seed 0  |  gestalt-xai synth --run runs/demo --preview preview.png",
       actions=(CliAction("--preview", "only draw a montage (one face per syndrome, features outlined) to this PNG; "
                          "write no cohort", _preview_action, replaces_stage=True),
                CliAction("--data-card", "also write the cohort's data card (Markdown) here", _data_card_action)))
def synth_stage(run: Run, cfg: SynthConfig) -> StageResult:
    """Write the synthetic cohort of ``cfg`` into ``<run>/cohort/`` (resumable, deterministic).

    GMDB-format tables and raw photos go to ``cohort/``, the ground truth to ``cohort/truth/``, the counterfactual
    renderings to ``cohort/counterfactuals/``, the data card to ``cohort/data_card.md``; the result's ``extra`` holds
    the counts of images, subjects, syndromes and counterfactuals. Finished photos and counterfactuals are recorded in
    two ledgers, so a rerun renders only what is missing, and changing the ``counterfactuals`` options never renders
    a photo of the cohort again.
    """
    out = run.dir(LAYOUT.cohort)
    unchanged = ("workers", "undiagnosed", "counterfactuals")  # none changes a rendered photo
    ledger = run.ledger(cfg, ignore=unchanged)
    done = {k: v["record"] for k, v in ledger.done().items() if "record" in v}
    # a counterfactual depends on the photo's options and on whether mark variants are made, not on the sets
    cf_options = {**cfg.model_dump(mode="json", exclude=set(unchanged)), "mark": cfg.counterfactuals.mark}
    cf_ledger = run.ledger(cf_options, instance=f"{run.active_stage}.counterfactuals")
    cf_done = {k: v["rows"] for k, v in cf_ledger.done().items() if "rows" in v}
    summary = generate_cohort(cfg, out, done, on_item=lambda i, r: ledger.add(i, {"record": r}),
                              counterfactuals_done=cf_done,
                              on_counterfactuals=lambda i, rows: cf_ledger.add(i, {"rows": rows}))
    from gestalt_xai.data.synthetic.data_card import write_data_card

    write_data_card(out, out / "data_card.md")
    hidden = f", {summary['n_undiagnosed']} left undiagnosed" if summary["n_undiagnosed"] else ""
    lines = [f"{summary['n_images']} photos of {summary['n_subjects']} subjects ({summary['n_syndromes']} syndromes "
             f"+ controls{hidden}) → {run.relative(out)}"]
    if summary["n_counterfactual_images"]:
        lines.append(f"{summary['n_counterfactuals']} counterfactual renderings of "
                     f"{summary['n_counterfactual_images']} photos ({', '.join(cfg.counterfactuals.sets)}"
                     + (f"; the mark only: {', '.join(cfg.counterfactuals.mark_sets)}"
                        if cfg.counterfactuals.mark_sets else "") + ") → "
                     f"{run.relative(out / COUNTERFACTUALS_DIR)}")
    return StageResult(items=summary["n_images"], extra={k: v for k, v in summary.items() if k != "n_images"},
                       outputs={"cohort": out}, summary=lines)
