"""The align stage: photos (a folder or a cohort table) → aligned 112×112 crops + ``alignment.parquet``.

For every photo: load it safely, find the 5 landmarks (a detector, an external landmark table, or none for crops that
are already aligned), optionally level the eyes and detect again (GM-Arc's two-pass alignment), estimate the
similarity transform onto the ArcFace template and write ``aligned/<image_id>.png`` (no metadata). A photo that fails
becomes one row of ``errors.parquet`` (and an ``ok = False`` row of ``alignment.parquet``) and the run goes on.
Finished photos are recorded in the stage's ledger, so a rerun (or a resumed, killed run) skips them.

Bad input, each one error row that says why:

* a photo-folder entry named like a photo that is no readable file — a symbolic link loop, a link to a missing
  file or out of the folder, a folder (:func:`_folder_cohort`);
* an unreadable, truncated, unsupported or too large file (:func:`~gestalt_xai.data.images.load_image`);
* a photo with a side shorter than :data:`~gestalt_xai.faces.detect.MIN_FACE_PIXELS` (20) pixels: too small to hold
  a face (MTCNN would fail inside ``torch.cat``);
* a photo stored upside down (no EXIF orientation): with ``orientation="auto"`` (the default) the detector also
  looks at the photo turned by 180° and the face is aligned upright from whichever orientation shows more faces
  (:func:`~gestalt_xai.faces.detect.faces_by_orientation`; the turn is recorded in ``orientation``);
* landmarks whose mouth lies above the eyes once the eyes are level (:func:`~gestalt_xai.faces.align.mouth_drop`
  ≤ 0, checked after the ``two_pass`` levelling and independent of the tilt, so tilted faces pass): an
  upside-down face listed by image side, which no similarity transform can align upright.

A synthetic cohort's counterfactual renderings (:mod:`~gestalt_xai.data.synthetic.counterfactuals`, next to the
cohort tables in ``<cohort>/counterfactuals/``) are never detected: each is cut with its factual photo's stored matrix,
so factual and counterfactual crops compare pixel for pixel (:func:`_align_counterfactuals`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from gestalt_xai.config import StageConfig
from gestalt_xai.data.cohort import (
    SPLIT_COLUMNS,
    UNDIAGNOSED,
    Cohort,
    load_cohort,
    resolve_inside,
    save_run_cohort,
    undiagnosed_splits,
)
from gestalt_xai.data.images import DEFAULT_MAX_PIXELS, load_image, save_png
from gestalt_xai.errors import ConfigError, DetectionError, GestaltXAIError, InputError, error_kind
from gestalt_xai.faces.align import (
    ARCFACE_TEMPLATE,
    CROP_SIZE,
    estimate_transform,
    eye_level_rotation,
    mouth_drop,
    row_matrix,
    transform_points,
    turn_photo,
    turn_points,
    warp_photo_to_crop,
    warp_to_crop,
    yaw_proxy,
)
from gestalt_xai.faces.detect import Detection, FaceDetector, check_face_size, faces_by_orientation, make_detector
from gestalt_xai.progress import progress
from gestalt_xai.runs import LAYOUT, ErrorRow, Run, write_parquet
from gestalt_xai.stages import StageResult, stage

log = logging.getLogger(__name__)

__all__ = ["AlignConfig", "align_stage", "read_landmark_table", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".heic", ".heif")
ALIGNMENT_COLUMNS = ["image_id", "ok", "detector", "n_faces", "score", "yaw", "frontal", "landmarks", "landmarks68",
                     "matrix",
                     "photo_width", "photo_height", "orientation", "two_pass_angle", "error_kind", "message"]


class AlignConfig(StageConfig):
    """Options of ``gestalt-xai align``. Paths may contain ``{run}``, replaced by the run folder."""

    images: str | None = Field(None, description="folder of photos (image_id = file name without suffix)")
    cohort: str | None = Field(None, description="GMDB metadata folder, a gmdb_*.csv file, or a plain cohort CSV")
    image_root: str | None = Field(None, description="folder the cohort's images live in")
    version: str | None = Field(None, description="GMDB version suffix, when the folder holds several")
    pattern: str = Field("{image_id}.jpg", description="GMDB image file name under image_root")
    detector: Literal["mtcnn", "retinaface"] = "mtcnn"
    detector_weights: str | None = None
    threshold: float = Field(0.95, gt=0.0, le=1.0, description="minimum face confidence")
    aligned_input: bool = Field(False, description="inputs are already aligned 112×112 crops (identity transform)")
    landmarks: str | None = Field(None, description="table of external landmarks (GM-Arc face_coords.csv layout)")
    two_pass: bool = Field(False, description="rotate so the eyes are level and detect again (GM-Arc)")
    orientation: Literal["auto", "as_stored"] = Field(
        "auto", description="auto: also look for faces in the photo turned upside down (stored without EXIF "
        "orientation) and align the face upright from the orientation with more faces; as_stored: detect only as "
        "stored")
    face_selection: Literal["frontal_first", "confidence"] = Field(
        "frontal_first", description="which face to keep when several are found: the most confident of the "
        "frontal ones (|yaw| ≤ max_yaw; falls back to all faces), or the most confident overall (GM-Arc)")
    max_yaw: float = Field(0.2, gt=0.0, description="largest |yaw proxy| (inter-ocular units) counted as frontal")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    workers: int = Field(1, ge=1, description="parallel worker processes")

    @model_validator(mode="after")
    def _one_source(self) -> AlignConfig:
        if (self.images is None) == (self.cohort is None):
            raise ValueError("give exactly one of 'images' (a folder) or 'cohort' (a table)")
        if self.aligned_input and (self.landmarks or self.two_pass):
            raise ValueError("'aligned_input' cannot be combined with 'landmarks' or 'two_pass'")
        if self.detector_weights and self.detector == "mtcnn":
            raise ValueError("'detector_weights' is only for the retinaface detector")
        if self.detector == "retinaface" and not self.detector_weights and not (self.aligned_input or self.landmarks):
            raise ValueError("the retinaface detector needs 'detector_weights' (biubug6 Resnet50_Final.pth)")
        return self

    def resolved(self, run: Run) -> AlignConfig:
        """Copy with ``{run}`` expanded in every path option."""
        sub = {k: getattr(self, k).replace("{run}", str(run.path)) for k in
               ("images", "cohort", "image_root", "detector_weights", "landmarks") if getattr(self, k)}
        return self.model_copy(update=sub)


# ----------------------------------------------------------------------------------------------- landmark tables
def read_landmark_table(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read external landmarks: ``image_id`` (or GM-Arc's ``img`` file name) → ``{"lm5": (5,2)[, "lm68": (68,2)]}``.

    Accepted layout (GM-Arc ``face_coords.csv``): ``img, bbox_x1, bbox_y1, bbox_x2, bbox_y2, kp1_x, kp1_y, …, kp5_y``;
    ``image_id`` may replace ``img``; optional 68-point columns ``p0_x, p0_y, …, p67_y``. A cell that is not a number
    is read as NaN, so only that image fails (the align stage refuses non-finite landmarks, naming the table).
    """
    path = Path(path)
    try:
        # as text: ids keep their leading zeros; numbers are parsed below
        df = pd.read_csv(path, dtype=str, keep_default_na=False).fillna("")
    except (OSError, ValueError, OverflowError) as exc:  # ParserError, EmptyDataError, UnicodeDecodeError
        raise InputError(f"{path}: cannot read landmark table: {exc}") from None
    key = "image_id" if "image_id" in df.columns else "img" if "img" in df.columns else None
    kp = [f"kp{i}_{a}" for i in range(1, 6) for a in "xy"]
    missing = [c for c in kp if c not in df.columns]
    if key is None or missing:
        raise InputError(f"{path}: expected columns img (or image_id) and {', '.join(kp)}; missing "
                         f"{', '.join(([] if key else ['img']) + missing)}")
    p68 = [f"p{j}_{a}" for j in range(68) for a in "xy"]
    has68 = all(c in df.columns for c in p68)

    def numbers(columns: list[str], n: int) -> np.ndarray:
        return df[columns].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64).reshape(-1, n, 2)

    lm5, lm68 = numbers(kp, 5), numbers(p68, 68) if has68 else None
    out: dict[str, dict[str, np.ndarray]] = {}
    for i, ident in enumerate(df[key]):
        image_id = Path(ident).stem if key == "img" else ident
        # GM-Arc names crops "<image_id>_aligned.jpg"; photos "<image_id>.jpg"
        image_id = re.sub(r"_aligned$", "", image_id)
        out[image_id] = {"lm5": lm5[i]} if lm68 is None else {"lm5": lm5[i], "lm68": lm68[i]}
    return out


# ----------------------------------------------------------------------------------------------------- sources
def _folder_cohort(folder: Path) -> Cohort:
    """Every entry of ``folder`` named like a photo (:data:`IMAGE_SUFFIXES`) is a photo: image id = name without
    suffix. Entries that are no readable file — a symbolic link loop, a link to a missing file or out of the folder,
    a folder — and names shared by several files are rejected, one row each (error rows of the align stage)."""
    if not folder.is_dir():
        raise ConfigError(f"images: folder not found: {folder}")
    try:
        entries = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise ConfigError(f"images: cannot list the folder {folder}: {exc}") from None
    if not entries:
        raise ConfigError(f"images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    stems = pd.Series([p.stem for p in entries])
    dup = set(stems[stems.duplicated()])
    rows, rejected = [], []
    for p in entries:
        if p.stem in dup:
            rejected.append({"image_id": p.name, "message": f"{p}: several files share the image id {p.stem!r}"})
            continue
        try:
            path = resolve_inside(folder, p.name)  # the cohort tables' rule: symlinks out of the folder are refused
            if not path.is_file():
                what = (f"a symbolic link to {path}, which does not exist" if not path.exists()
                        else "a folder, not a photo" if path.is_dir() else "not a regular file")
                raise InputError(f"{p}: {what}")
        except InputError as exc:
            rejected.append({"image_id": p.stem, "message": str(exc)})
            continue
        # a photo folder says nothing about diagnoses: every photo is an undiagnosed patient
        rows.append({"image_id": p.stem, "subject_id": p.stem, "syndrome_id": UNDIAGNOSED, "path": str(path)})
    images = pd.DataFrame(rows, columns=["image_id", "subject_id", "syndrome_id", "path"])
    syndromes = pd.DataFrame({"syndrome_id": [], "syndrome_name": []}, dtype=object)
    splits = undiagnosed_splits(images, pd.DataFrame(columns=SPLIT_COLUMNS))
    return Cohort(images=images, syndromes=syndromes, splits=splits, version="folder",
                  image_root=str(folder.resolve()), rejected=pd.DataFrame(rejected, columns=["image_id", "message"]))


# ----------------------------------------------------------------------------------------------- one work unit
_WORKER: dict[str, Any] = {}


def _init_worker(cfg: AlignConfig, threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    _WORKER["cfg"] = cfg
    _WORKER["landmarks"] = read_landmark_table(cfg.landmarks) if cfg.landmarks else None
    _WORKER["detector"] = None if (cfg.aligned_input or cfg.landmarks) else make_detector(
        cfg.detector, cfg.detector_weights, cfg.threshold)


def _pick_face(found: list[Detection]) -> tuple[np.ndarray, float, int]:
    cfg: AlignConfig = _WORKER["cfg"]
    if cfg.face_selection == "frontal_first" and len(found) > 1:
        # group photos: a turned bystander can be the most confident face; prefer the frontal ones
        found = sorted(found, key=lambda d: abs(yaw_proxy(d.landmarks)) > cfg.max_yaw)  # stable: by score within
    return found[0].landmarks, found[0].score, len(found)


def _second_pass(detector: FaceDetector, photo: np.ndarray, lm5: np.ndarray, score: float,
                 image_id: str) -> tuple[np.ndarray, float, float | None]:
    """GM-Arc's two-pass alignment: level the eyes, detect again, map the landmarks back to ``photo``."""
    h, w = photo.shape[:2]
    R, angle = eye_level_rotation(lm5)
    rotated = cv2.warpAffine(photo, R, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    again = detector.detect(rotated)
    if not again:
        log.info("%s: second pass found no face; keeping the first pass", image_id)
        return lm5, score, None
    # the same face: the detection whose nose is nearest the first pass' nose after levelling
    nose = transform_points(lm5[2:3], R)[0]
    best = min(again, key=lambda d: float(np.linalg.norm(d.landmarks[2] - nose)))
    # landmarks found on the levelled photo, mapped back to the original photo's pixels
    return transform_points(best.landmarks, cv2.invertAffineTransform(R)), best.score, float(angle)


def _upside_down(image_id: str, drop: float, source: str) -> str:
    return (f"{image_id}: the face is upside down: {source} put the mouth above the eyes once the eyes are level "
            f"(mouth drop {drop:.2f} inter-ocular distances; a face has about 1)")


def _detect_upright(photo: np.ndarray, image_id: str) -> dict[str, Any]:
    """Find the face in the orientation (as stored, or turned upside down) the detector finds most faces in, and
    return its landmarks in the photo's own pixels with the turn, detector score, face count and two-pass angle."""
    cfg: AlignConfig = _WORKER["cfg"]
    detector: FaceDetector = _WORKER["detector"]
    ranked, probed = faces_by_orientation(detector, photo) if cfg.orientation == "auto" else ([0], {})
    problem = None
    for angle in ranked:
        frame = turn_photo(photo, angle)
        found = probed[angle] if angle in probed else detector.detect(frame)
        if not found:
            continue
        lm5, score, n_faces = _pick_face(found)
        two_pass_angle = None
        if cfg.two_pass:
            lm5, score, two_pass_angle = _second_pass(detector, frame, lm5, score, image_id)
        lm5 = turn_points(lm5, angle, photo.shape[:2])
        if (drop := mouth_drop(lm5)) <= 0:  # after levelling: the measure does not depend on the tilt
            problem = problem or (_upside_down(image_id, drop, f"the landmarks {detector.name} found")
                                  + "; turn the photo upright")
            continue
        return {"landmarks": lm5, "orientation": angle, "score": score, "n_faces": n_faces,
                "two_pass_angle": two_pass_angle}
    where = " in the photo as stored or turned upside down" if len(ranked) > 1 else ""
    raise DetectionError(problem or f"{image_id}: no face found by {detector.name} at confidence ≥ "
                                    f"{getattr(detector, 'threshold', '?')}{where}")


def _align_one(image_id: str, path: str, crops_dir: str) -> dict[str, Any]:
    """Align one photo; returns the alignment record (ok or error). Never raises for bad input."""
    cfg: AlignConfig = _WORKER["cfg"]
    rec: dict[str, Any] = {"image_id": image_id, "ok": False, "detector": None, "n_faces": 0, "score": None,
                           "yaw": None, "frontal": None,
                           "landmarks": None, "landmarks68": None, "matrix": None, "photo_width": None,
                           "photo_height": None, "orientation": None, "two_pass_angle": None, "error_kind": None,
                           "message": None}
    try:
        photo = load_image(path, max_pixels=cfg.max_pixels)
        h, w = photo.shape[:2]
        rec.update(photo_width=w, photo_height=h)
        lm68 = None
        if cfg.aligned_input:
            if (h, w) != (CROP_SIZE, CROP_SIZE):
                raise InputError(f"{path}: --aligned-input expects {CROP_SIZE}×{CROP_SIZE} crops, got {w}×{h}")
            M = np.array([[1.0, 0, 0], [0, 1.0, 0]])
            rec.update(detector="aligned_input", n_faces=1, score=1.0, orientation=0,
                       landmarks=ARCFACE_TEMPLATE.ravel().tolist())
        else:
            check_face_size(photo, where=str(path))
            if cfg.landmarks:
                entry = _WORKER["landmarks"].get(image_id)
                if entry is None:
                    raise InputError(f"{image_id}: no row in landmark table {cfg.landmarks}")
                lm5, lm68 = entry["lm5"], entry.get("lm68")
                if not np.isfinite(lm5).all():
                    raise InputError(f"{image_id}: the row of landmark table {cfg.landmarks} holds missing or "
                                     "non-numeric values in kp1_x … kp5_y")
                if (drop := mouth_drop(lm5)) <= 0:
                    raise InputError(_upside_down(image_id, drop, f"the landmarks in {cfg.landmarks}")
                                     + "; turn the photo upright, or fix the order of the points in the table")
                face = {"landmarks": lm5, "orientation": 0, "score": 1.0, "n_faces": 1, "two_pass_angle": None}
                det_name = "landmark_table"
            else:
                face = _detect_upright(photo, image_id)
                det_name = cfg.detector
            lm5 = face["landmarks"]
            M = estimate_transform(lm5)
            yaw = yaw_proxy(lm5)
            rec.update(detector=det_name, n_faces=int(face["n_faces"]), score=float(face["score"]), yaw=yaw,
                       frontal=abs(yaw) <= cfg.max_yaw, landmarks=np.asarray(lm5, np.float64).ravel().tolist(),
                       orientation=face["orientation"], two_pass_angle=face["two_pass_angle"])
            if lm68 is not None:
                rec["landmarks68"] = np.asarray(lm68, np.float64).ravel().tolist()
        crop = warp_to_crop(photo, M)
        save_png(Path(crops_dir) / f"{image_id}.png", crop)
        rec.update(ok=True, matrix=np.asarray(M, np.float64).ravel().tolist())
    except GestaltXAIError as exc:
        rec.update(error_kind=error_kind(exc), message=str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad photo must never stop the run; the error is recorded
        log.exception("%s: unexpected error while aligning", image_id)
        rec.update(error_kind=error_kind(exc), message=f"{path}: {type(exc).__name__}: {exc}")
    return rec


# -------------------------------------------------------------------------------------------- counterfactuals
#: the names of counterfactual variants (they become file names)
_VARIANT = re.compile(r"with(out)?_[a-z0-9_]+")


def _align_counterfactuals(run: Run, cfg: AlignConfig, table: pd.DataFrame) -> tuple[int, list[ErrorRow]]:
    """Cut the counterfactual renderings of every aligned photo with the factual photo's stored matrix.

    Writes ``aligned/counterfactuals/<image_id>/<variant>.png`` (no metadata), ``…/<image_id>/change_masks.png``
    (the photo-space change-mask bits brought into the crop, same bit layout: each bit warped as 0/1 with bilinear
    interpolation and kept where ≥ 0.5, :func:`~gestalt_xai.faces.align.warp_photo_to_crop`) and
    ``aligned/counterfactuals/counterfactuals.parquet`` (the cohort's counterfactual table restricted to the written
    crops, plus ``change_px_crop``). A photo that failed alignment gets no counterfactual crop (its own error row says
    why); an unreadable counterfactual file is one error row keyed by its variant. Returns the number of crops and the
    error rows. Cheap (no detector), so every run cuts them all again: they always match the current alignment.
    """
    from gestalt_xai.data.synthetic.truth import (
        COUNTERFACTUALS_DIR,
        decode_mask_bits,
        load_counterfactuals,
        pack_mask_bits,
    )
    out = run.path / LAYOUT.counterfactual_crops
    source = Path(cfg.cohort) if cfg.cohort else None
    source = source if source is None or source.is_dir() else source.parent
    errors: list[ErrorRow] = []
    try:
        cf = load_counterfactuals(source) if source is not None else None
    except GestaltXAIError as exc:
        cf, errors = None, [ErrorRow(COUNTERFACTUALS_DIR, error_kind(exc), str(exc))]
    if cf is None or cf.empty:
        if out.exists():
            shutil.rmtree(out)
        return 0, errors
    aligned = table[table["ok"]].set_index("image_id")
    rows, keep = [], set()
    for image_id, group in progress(cf.groupby("image_id", sort=True), "aligning counterfactuals",
                                    total=cf["image_id"].nunique()):
        if image_id not in aligned.index:
            continue
        M = row_matrix(aligned.loc[image_id])
        try:
            bits = decode_mask_bits(source / COUNTERFACTUALS_DIR / "change_masks" / f"{image_id}.png")
        except GestaltXAIError as exc:
            errors.append(ErrorRow(image_id, error_kind(exc), str(exc), key={"counterfactual": "change_masks"}))
            continue
        layers = {}
        for r in group.itertuples(index=False):
            try:
                if not _VARIANT.fullmatch(str(r.variant)):
                    raise InputError(f"{image_id}: {r.variant!r} is not a counterfactual variant name")
                photo = load_image(resolve_inside(source, r.path), max_pixels=cfg.max_pixels)
            except GestaltXAIError as exc:
                errors.append(ErrorRow(image_id, error_kind(exc), str(exc), key={"counterfactual": r.variant}))
                continue
            path = run.path / LAYOUT.counterfactual_crop(image_id, r.variant)
            save_png(path, warp_to_crop(photo, M))
            layers[int(r.mask_bit)] = warp_photo_to_crop((bits >> int(r.mask_bit)) & 1 == 1, M)
            rows.append({**r._asdict(), "change_px_crop": int(layers[int(r.mask_bit)].sum())})
            keep.add(path)
        if layers:
            path = run.path / LAYOUT.change_mask_crop(image_id)
            save_png(path, pack_mask_bits(layers, (CROP_SIZE, CROP_SIZE)))
            keep.add(path)
    crops = pd.DataFrame(rows, columns=[*cf.columns, "change_px_crop"]).astype({"change_px_crop": "int64"})
    write_parquet(crops, run.path / LAYOUT.counterfactual_crop_table)
    keep.add(run.path / LAYOUT.counterfactual_crop_table)
    for p in sorted(out.rglob("*"), reverse=True):  # crops of photos no longer aligned or listed
        if p.is_file() and p not in keep:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    return len(crops), errors


# ------------------------------------------------------------------------------------------------------- stage
@stage("align", options=AlignConfig, order=20,
       summary="detect and align faces to the ArcFace 112×112 template",
       reads=(), writes=(LAYOUT.cohort, LAYOUT.aligned, LAYOUT.alignments),
       example="gestalt-xai align --run runs/try --images photos/", tiny_options={"cohort": "{run}/cohort"})
def align_stage(run: Run, cfg: AlignConfig) -> StageResult:
    """Detect and align every photo of a folder or cohort into ``<run>/aligned/``.

    Writes ``aligned/<image_id>.png`` and ``aligned/alignment.parquet`` (one row per photo, ``ok`` for the aligned
    ones) and the cohort tables; bad photos become error rows and the run goes on; reruns skip finished photos.

    Examples
    --------
    ``gestalt-xai align --run runs/demo --images photos/`` or, in Python::

        align_stage(Run("runs/demo"), AlignConfig(images="photos/"))
    """
    given, cfg = cfg, cfg.resolved(run)
    if cfg.landmarks and not Path(cfg.landmarks).is_file():
        raise ConfigError(f"landmarks: table not found: {cfg.landmarks}")
    if cfg.detector_weights and not Path(cfg.detector_weights).is_file():
        raise ConfigError(f"detector_weights: file not found: {cfg.detector_weights}")
    cohort = _folder_cohort(Path(cfg.images)) if cfg.images else load_cohort(
        cfg.cohort, cfg.image_root, cfg.version, cfg.pattern)
    save_run_cohort(run, cohort)
    crops_dir = run.dir("aligned")
    ledger = run.ledger(given, ignore=("workers",))
    done = ledger.done()
    todo = [(i, p) for i, p in zip(cohort.images["image_id"], cohort.images["path"], strict=True) if i not in done]
    if done:
        log.info("align: %d of %d photos already aligned; %d to do", len(done), len(cohort.images), len(todo))
    workers = min(cfg.workers, max(1, len(todo)))
    if workers == 1:
        _init_worker(cfg, None)
        results = (_align_one(i, p, str(crops_dir)) for i, p in todo)
        for rec in progress(results, "aligning", total=len(todo)):
            ledger.add(rec["image_id"], rec, ok=rec["ok"])
    else:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(cfg, threads)) as pool:
            futures = pool.map(_align_one, [i for i, _ in todo], [p for _, p in todo],
                               [str(crops_dir)] * len(todo), chunksize=4)
            for rec in progress(futures, "aligning", total=len(todo)):
                ledger.add(rec["image_id"], rec, ok=rec["ok"])

    records = ledger.records()
    wanted = set(cohort.images["image_id"])
    rows = [{c: records[i].get(c) for c in ALIGNMENT_COLUMNS} for i in sorted(wanted) if i in records]
    for rej in cohort.rejected.itertuples():
        rows.append({**{c: None for c in ALIGNMENT_COLUMNS}, "image_id": rej.image_id, "ok": False,
                     "error_kind": "input", "message": rej.message})
    table = pd.DataFrame(rows, columns=ALIGNMENT_COLUMNS).sort_values("image_id", kind="stable")
    table["message"] = [run.shorten(m) if isinstance(m, str) else m for m in table["message"]]
    table = table.astype({"ok": bool, "n_faces": "Int64", "score": "Float64", "yaw": "Float64",
                          "frontal": "boolean", "photo_width": "Int64", "photo_height": "Int64",
                          "orientation": "Int64", "two_pass_angle": "Float64"}).reset_index(drop=True)
    write_parquet(table, crops_dir / "alignment.parquet")
    n_cf, cf_errors = _align_counterfactuals(run, cfg, table)
    failed = table[~table["ok"]]
    run.write_errors([*(ErrorRow(r.image_id, r.error_kind or "error", r.message or "") for r in failed.itertuples()),
                      *cf_errors])
    n_aligned = int(table["ok"].sum())
    summary = [f"aligned {n_aligned} of {len(table)} photos → {run.relative(crops_dir)}"]
    if n_cf:
        summary.append(f"{n_cf} counterfactual crops cut with their photos' matrices → "
                       f"{run.relative(run.path / LAYOUT.counterfactual_crops)}")
    return StageResult(items=len(table), extra={"n_aligned": n_aligned, "n_counterfactual_crops": n_cf},
                       outputs={"aligned": crops_dir, "alignments": crops_dir / "alignment.parquet"},
                       summary=summary)
