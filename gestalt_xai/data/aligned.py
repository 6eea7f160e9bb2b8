"""Aligned face crops of a run: loading, and a torch Dataset with GM-Arc's training augmentation.

The align stage writes ``run/aligned/<image_id>.png`` (112×112 RGB, ArcFace template). :func:`load_crops`
reads them as one uint8 array; :class:`AlignedFaces` serves them with class labels for training.

Images leave this module as RGB uint8 ``(112, 112, 3)``: normalisation and channel order belong to the model
(:func:`gestalt_xai.models.gestaltmatcher.preprocess`), so one dataset serves RGB and BGR models alike.

Augmentation follows GM-Arc's ``GestaltMatcherDataset`` (``lib/datasets/gestalt_matcher_dataset.py``), in its
order:

1. *shrink-zoom* with probability 0.1: resize to a random size in [50, 100] px and back to 112 (a
   low-resolution photo);
2. horizontal flip with probability 0.5;
3. colour jitter, always (albumentations' ``ColorJitter(hue=0.1)`` defaults: brightness, contrast, saturation
   factors in [0.8, 1.2], hue shift in [−0.1, 0.1] of a turn), applied here in the fixed order brightness →
   contrast → saturation → hue;
4. 3-channel gray with probability 0.1 (BT.601 luma, as the TTA gray slot).

Randomness is drawn from a generator seeded by ``(seed, epoch, index)``, so an item's augmentation does not
depend on DataLoader workers or batch order, and the same seed gives the same images (call
:meth:`AlignedFaces.set_epoch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from gestalt_xai.errors import InputError
from gestalt_xai.faces.align import CROP_SIZE

if TYPE_CHECKING:
    from gestalt_xai.data.cohort import Cohort
    from gestalt_xai.runs import Run

__all__ = [
    "CROP_SIZE",
    "Augmentation",
    "AlignedFaces",
    "augment_crop",
    "load_crops",
    "read_crop",
]

def read_crop(path: Path) -> np.ndarray:
    """One aligned 112×112 crop as RGB uint8; :class:`InputError` naming the file when missing or malformed."""
    if not path.is_file():
        raise InputError(
            f"aligned crop not found: {path}; run `gestalt-xai align` first (failed images are listed "
            "in errors.parquet)"
        )
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"{path}: unreadable aligned crop ({exc})") from None
    if arr.shape != (CROP_SIZE, CROP_SIZE, 3):
        raise InputError(f"{path}: expected a {CROP_SIZE}×{CROP_SIZE} crop, got {arr.shape[1]}×{arr.shape[0]}")
    return arr


def load_crops(run: Run, image_ids: Sequence[str]) -> np.ndarray:
    """Aligned crops of ``image_ids`` as an ``(N, 112, 112, 3)`` RGB uint8 array, in the given order.

    Raises :class:`InputError` naming the first missing or malformed crop.
    """
    out = np.empty((len(image_ids), CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    for i, image_id in enumerate(image_ids):
        out[i] = read_crop(run.crop_path(str(image_id)))
    return out


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation (GM-Arc's defaults); set a probability to 0 to switch a step off."""

    shrink_zoom_p: float = 0.1
    shrink_min: int = 50
    shrink_max: int = 100
    flip_p: float = 0.5
    jitter_p: float = 1.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.1


def _gray(img: np.ndarray) -> np.ndarray:
    y = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return np.repeat(y[:, :, None], 3, axis=2)


def augment_crop(img: np.ndarray, rng: np.random.Generator, aug: Augmentation = Augmentation()) -> np.ndarray:
    """Apply :class:`Augmentation` to one RGB uint8 crop with ``rng`` (see the module docstring)."""
    out = img
    h, w = out.shape[:2]
    if rng.random() < aug.shrink_zoom_p:
        size = int(rng.integers(aug.shrink_min, aug.shrink_max + 1))
        small = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < aug.flip_p:
        out = out[:, ::-1]
    if rng.random() < aug.jitter_p:
        x = out.astype(np.float32)
        b = rng.uniform(1 - aug.brightness, 1 + aug.brightness)
        c = rng.uniform(1 - aug.contrast, 1 + aug.contrast)
        s = rng.uniform(1 - aug.saturation, 1 + aug.saturation)
        hshift = rng.uniform(-aug.hue, aug.hue)
        x = np.clip(x * b, 0, 255)
        mean = float(_gray(x.astype(np.uint8))[..., 0].mean())
        x = np.clip((x - mean) * c + mean, 0, 255)
        g = _gray(x.astype(np.uint8)).astype(np.float32)
        x = np.clip((x - g) * s + g, 0, 255).astype(np.uint8)
        if hshift != 0.0:
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # OpenCV hue is 0..179 for uint8
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(hshift * 180))) % 180).astype(np.uint8)
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        out = x
    if rng.random() < aug.gray_p:
        out = _gray(np.ascontiguousarray(out))
    return np.ascontiguousarray(out, dtype=np.uint8)


class AlignedFaces(Dataset):
    """Aligned crops with class labels: items are ``(uint8 tensor (112, 112, 3), class index)``.

    Parameters
    ----------
    run: the run whose ``aligned/`` holds the crops.
    image_ids: images to serve, in order.
    labels: syndrome id of each image (omit for unlabelled use; the class index is then −1).
    classes: class index order (default: sorted unique ``labels``, GM-Arc's lookup-table order).
    augment: an :class:`Augmentation`, ``True`` for the defaults, or ``False``/``None`` for none.
    seed: seed of the per-item augmentation generators.
    preload: read every crop once into memory (default); otherwise read per item.

    Examples
    --------
    >>> import tempfile
    >>> from gestalt_xai.data.images import save_png
    >>> from gestalt_xai.runs import Run
    >>> run = Run(tempfile.mkdtemp())
    >>> save_png(run.crop_path("a"), np.zeros((112, 112, 3), np.uint8))
    >>> ds = AlignedFaces(run, ["a"], ["OMIM:1"], augment=True, seed=0)
    >>> img, y = ds[0]
    >>> tuple(img.shape), img.dtype, y
    ((112, 112, 3), torch.uint8, 0)
    """

    def __init__(
        self,
        run: Run,
        image_ids: Sequence[str],
        labels: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        augment: Augmentation | bool | None = None,
        seed: int = 0,
        preload: bool = True,
    ) -> None:
        self.run = run
        self.image_ids = [str(i) for i in image_ids]
        if labels is not None and len(labels) != len(self.image_ids):
            raise InputError(f"{len(labels)} labels for {len(self.image_ids)} images")
        self.labels = [str(s) for s in labels] if labels is not None else None
        if classes is None:
            classes = sorted(set(self.labels)) if self.labels is not None else []
        self.classes = [str(c) for c in classes]
        index = {c: i for i, c in enumerate(self.classes)}
        if self.labels is not None:
            unknown = sorted(set(self.labels) - set(index))
            if unknown:
                raise InputError(f"labels {unknown[:5]} are not among the {len(self.classes)} classes")
            self.targets = np.array([index[s] for s in self.labels], dtype=np.int64)
        else:
            self.targets = np.full(len(self.image_ids), -1, dtype=np.int64)
        self.augmentation = Augmentation() if augment is True else (augment or None)
        self.seed = int(seed)
        self.epoch = 0
        self._cache = load_crops(run, self.image_ids) if preload else None

    @classmethod
    def from_cohort(
        cls,
        run: Run,
        cohort: Cohort,
        set_name: str = "train",
        classes: Sequence[str] | None = None,
        augment: Augmentation | bool | None = None,
        seed: int = 0,
    ) -> AlignedFaces:
        """The aligned images of one split set of a :class:`~gestalt_xai.data.cohort.Cohort` (``train``, ``val``,
        ``frequent_gallery`` …) that have a crop, labelled with their syndrome ids."""
        ids = [i for i in cohort.image_ids(set_name) if run.crop_path(i).is_file()]
        syn = cohort.images.set_index("image_id").loc[ids, "syndrome_id"].astype(str).tolist()
        return cls(run, ids, syn, classes=classes, augment=augment, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch`` (call before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.image_ids)

    def crop(self, i: int) -> np.ndarray:
        """The un-augmented crop of item ``i``."""
        return self._cache[i] if self._cache is not None else read_crop(self.run.crop_path(self.image_ids[i]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.crop(i)
        if self.augmentation is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            img = augment_crop(img, rng, self.augmentation)
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.targets[i])
