"""GestaltMatcher model: iResNet backbone + 512-d embedding + syndrome classifier, preprocessing, TTA, ensembles.

Follows GestaltMatcher-Arc (Hustinx et al., WACV 2023; igsb/GestaltMatcher-Arc):

* ``forward(x) -> (logits, embedding)``; ``logits`` is ``None`` for backbone-only members (the ``.onnx`` model).
* Input: aligned 112×112 face crops, uint8, ``x/255``, then ``(x − 0.5)/0.5`` (so pixel 0 ↦ −1, 255 ↦ +1).
  Each model records the channel order it expects (``channel_order``, ``"RGB"`` or ``"BGR"``); images handed to
  this module are always RGB and are reordered per model.
* Test-time augmentation: 4 slots = {original, horizontal flip} × {colour, 3-channel gray}, in GM-Arc's loop order
  (flip outer, gray inner): ``(flip=False, gray=False), (False, True), (True, False), (True, True)``.
  Gray is ITU-R BT.601 luma ``Y = 0.299 R + 0.587 G + 0.114 B`` computed on the uint8 image with OpenCV 4's
  fixed-point rounding (``(9798 R + 19235 G + 3735 B + 2^14) >> 15``, what ``cv2.COLOR_RGB2GRAY`` — and so
  albumentations' ``to_gray`` in GM-Arc — gives; checked against OpenCV 4.12 on all 2^24 colours) and replicated to
  3 channels, so our gray slots equal GM-Arc's bit for bit.
* Ensemble distances: for each slot (model m, flip, gray) the cosine distance matrix test × gallery is computed
  between embeddings of the *same* slot, and the ``n_models · n_slots`` matrices are averaged (GM-Arc's
  ``evaluate_ensemble.py``: ``pairwise_distances(..., 'cosine')`` per slot, then ``np.mean`` over slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from gestalt_xai.errors import InputError
from gestalt_xai.faces.align import CROP_SIZE
from gestalt_xai.models.iresnet import IResNet, build_iresnet

__all__ = [
    "TTA_SLOTS",
    "Encoding",
    "Ensemble",
    "GestaltMatcher",
    "build_gestaltmatcher",
    "encode",
    "preprocess",
    "reinitialised",
    "slotwise_cosine_distances",
    "to_gray_bt601",
    "tta_slots",
]

ChannelOrder = Literal["RGB", "BGR"]
#: TTA slots as ``(flip, gray)`` in GM-Arc's order (``lib/encode.py``: ``for flip ...: for gray ...``).
TTA_SLOTS: tuple[tuple[bool, bool], ...] = ((False, False), (False, True), (True, False), (True, True))


def tta_slots(tta: bool) -> tuple[tuple[bool, bool], ...]:
    """``(flip, gray)`` slots: all four with TTA, only ``(False, False)`` without (GM-Arc's REST service)."""
    return TTA_SLOTS if tta else TTA_SLOTS[:1]


class GestaltMatcher(nn.Module):
    """Backbone + embedding + optional classifier.

    Attributes
    ----------
    backbone : :class:`IResNet` (native or fused layout); its output is the 512-d embedding.
    classifier : ``nn.Sequential(nn.Dropout(0.5), nn.Linear(512, C))`` or ``None`` (embedding-only member).
    syndrome_ids : class index → syndrome id (GM-Arc's lookup table), or ``None`` when unknown.
    channel_order : ``"RGB"`` or ``"BGR"``: the order the network expects its input channels in.
    arch : ``"r18" | "r34" | "r50" | "r100"``.
    config : JSON-serialisable description (arch, width, fused, num_classes, channel order, preprocessing,
        source format …) stored beside our checkpoints.

    >>> m = build_gestaltmatcher("r18", width=0.25, num_classes=3).eval()
    >>> logits, emb = m(torch.zeros(1, 3, 112, 112))
    >>> tuple(logits.shape), tuple(emb.shape)
    ((1, 3), (1, 512))
    """

    def __init__(
        self,
        backbone: IResNet,
        num_classes: int | None = None,
        *,
        syndrome_ids: Sequence[str] | None = None,
        channel_order: ChannelOrder = "RGB",
        classifier_dropout: float = 0.5,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        if syndrome_ids is not None:
            syndrome_ids = [str(s) for s in syndrome_ids]
            if num_classes is None:
                num_classes = len(syndrome_ids)
            elif len(syndrome_ids) != num_classes:
                raise ValueError(f"{len(syndrome_ids)} syndrome ids for {num_classes} classes")
        self.backbone = backbone
        dim = backbone.num_features
        self.classifier: nn.Sequential | None = (
            nn.Sequential(nn.Dropout(classifier_dropout), nn.Linear(dim, num_classes))
            if num_classes is not None
            else None
        )
        self.syndrome_ids: list[str] | None = syndrome_ids
        self.channel_order: ChannelOrder = channel_order
        cfg = backbone.config
        self.config: dict[str, Any] = {
            "arch": cfg.arch,
            "width": cfg.width,
            "num_features": cfg.num_features,
            "dropout": cfg.dropout,
            "fused": cfg.fused,
            "num_classes": num_classes,
            "classifier_dropout": classifier_dropout,
            "syndrome_ids": syndrome_ids,
            "channel_order": channel_order,
            "input_size": CROP_SIZE,
            "preprocessing": "x/255, (x-0.5)/0.5",
        }
        if config:
            self.config.update({k: v for k, v in config.items() if k not in self.config})

    @property
    def arch(self) -> str:
        return self.backbone.config.arch

    @property
    def num_classes(self) -> int | None:
        return None if self.classifier is None else self.classifier[1].out_features  # type: ignore[return-value]

    @property
    def embedding_dim(self) -> int:
        return self.backbone.num_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        embedding = self.backbone(x)
        logits = self.classifier(embedding) if self.classifier is not None else None
        return logits, embedding

    def preprocess(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        flip: bool = False,
        gray: bool = False,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """RGB uint8 ``(N, 112, 112, 3)`` → normalised ``(N, 3, 112, 112)`` in this model's channel order."""
        if device is None:
            device = next(self.parameters()).device
        return preprocess(images, channel_order=self.channel_order, flip=flip, gray=gray, device=device)

    def encode(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        tta: bool = True,
        batch_size: int = 16,
        device: torch.device | str | None = None,
    ) -> Encoding:
        """Embeddings (and logits) of RGB uint8 crops for each TTA slot; see :func:`encode`."""
        return encode(self, images, tta=tta, batch_size=batch_size, device=device)

    def embed(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        tta: bool = True,
        batch_size: int = 16,
        device: torch.device | str | None = None,
    ) -> np.ndarray:
        """``(n_slots, N, 512)`` float32 embeddings of RGB uint8 crops."""
        return self.encode(images, tta=tta, batch_size=batch_size, device=device).embeddings


def build_gestaltmatcher(
    arch: str = "r50",
    *,
    width: float = 1.0,
    num_classes: int | None = None,
    syndrome_ids: Sequence[str] | None = None,
    channel_order: ChannelOrder = "RGB",
    fused: bool = False,
    dropout: float = 0.0,
    num_features: int = 512,
) -> GestaltMatcher:
    """A fresh (randomly initialised) :class:`GestaltMatcher`; ``num_classes`` defaults to ``len(syndrome_ids)``."""
    backbone = build_iresnet(arch, width, num_features=num_features, dropout=dropout, fused=fused)
    return GestaltMatcher(backbone, num_classes, syndrome_ids=syndrome_ids, channel_order=channel_order)


def reinitialised(model: GestaltMatcher, seed: int) -> GestaltMatcher:
    """The random-model control of ``model``: its architecture with every weight freshly initialised.

    The fresh model is :func:`build_gestaltmatcher` with the same architecture (arch, width, fused layout, embedding
    size, dropout, classes, syndrome ids, channel order) under ``torch.manual_seed(seed)`` — the initialisation
    :func:`gestalt_xai.models.train._build_model` starts training from scratch with (``TrainConfig.seed == seed``
    gives the same weights): kaiming-normal convolutions, BatchNorm weight 1 / bias 0 with reset running statistics
    (mean 0, variance 1), PyTorch's default PReLU and linear layers. The global RNG is left as it was
    (``torch.random.fork_rng``). Used as the model-randomisation sanity check of saliency maps (Adebayo et al.,
    NeurIPS 2018): an explanation that looks the same for this model explains the input, not the model.

    >>> m = build_gestaltmatcher("r18", width=0.125, num_classes=2).eval()
    >>> r = reinitialised(m, seed=0)
    >>> r.config["randomised"], r.arch, r.num_classes
    ({'seed': 0}, 'r18', 2)
    >>> bool(torch.equal(r.backbone.conv1.weight, reinitialised(m, seed=0).backbone.conv1.weight))
    True
    """
    cfg = model.backbone.config
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = build_gestaltmatcher(cfg.arch, width=cfg.width, num_classes=model.num_classes,
                                     syndrome_ids=model.syndrome_ids, channel_order=model.channel_order,
                                     fused=cfg.fused, dropout=cfg.dropout, num_features=cfg.num_features)
    if model.classifier is not None and fresh.classifier is not None:
        fresh.classifier[0].p = model.classifier[0].p
    fresh.config.update({k: v for k, v in model.config.items() if k not in ("randomised",)})
    fresh.config["randomised"] = {"seed": int(seed)}
    return fresh.to(device).eval()


# ----------------------------------------------------------------------------------------------- preprocessing
def _as_uint8_nhwc(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise InputError(f"expected RGB images of shape (N, H, W, 3) or (H, W, 3), got {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        raise InputError(f"expected uint8 pixels (0–255), got {t.dtype}; pass the aligned crops as read")
    if t.shape[1:3] != (CROP_SIZE, CROP_SIZE):
        raise InputError(
            f"expected aligned {CROP_SIZE}×{CROP_SIZE} crops, got {t.shape[1]}×{t.shape[2]}; run the align stage"
        )
    return t


def to_gray_bt601(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """3-channel gray copy of RGB uint8 images (ITU-R BT.601 luma with OpenCV's fixed-point rounding).

    ``Y = (9798 R + 19235 G + 3735 B + 2^14) >> 15`` — the coefficients 0.299/0.587/0.114 in 15-bit fixed point,
    which is exactly OpenCV 4's ``cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)`` and therefore GM-Arc's ``A.to_gray``.
    """
    t = torch.as_tensor(images)
    rgb = t.to(torch.int32)
    y = (rgb[..., 0] * 9798 + rgb[..., 1] * 19235 + rgb[..., 2] * 3735 + 16384) >> 15
    return y.clamp(0, 255).to(torch.uint8).unsqueeze(-1).expand(*y.shape, 3).contiguous()


def preprocess(
    images: np.ndarray | torch.Tensor,
    *,
    channel_order: ChannelOrder = "RGB",
    flip: bool = False,
    gray: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """GM-Arc preprocessing of RGB uint8 crops ``(N, 112, 112, 3)`` (or one ``(112, 112, 3)``).

    Optional 3-channel gray (:func:`to_gray_bt601`) and horizontal flip, then reorder channels to ``channel_order``
    and normalise ``(x/255 − 0.5)/0.5``. Returns float32 ``(N, 3, 112, 112)``.

    >>> x = preprocess(np.zeros((112, 112, 3), np.uint8))
    >>> tuple(x.shape), float(x.min())
    ((1, 3, 112, 112), -1.0)
    """
    t = _as_uint8_nhwc(images)
    if device is not None:
        t = t.to(device)
    if gray:
        t = to_gray_bt601(t)
    if flip:
        t = t.flip(2)  # width axis of NHWC
    if channel_order == "BGR":
        t = t.flip(3)
    elif channel_order != "RGB":
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    x = t.permute(0, 3, 1, 2).to(torch.float32)
    return x.div_(255.0).sub_(0.5).div_(0.5).contiguous()


# ----------------------------------------------------------------------------------------------- encoding
@dataclass
class Encoding:
    """Per-slot outputs of one model.

    embeddings : ``(n_slots, N, D)`` float32.
    logits : ``(n_slots, N, C)`` float32 or ``None`` (no classifier).
    slots : ``(flip, gray)`` per slot.
    """

    embeddings: np.ndarray
    logits: np.ndarray | None
    slots: tuple[tuple[bool, bool], ...]


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


def encode(
    model: GestaltMatcher,
    images: np.ndarray | torch.Tensor,
    *,
    tta: bool = True,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> Encoding:
    """Run ``model`` (in eval mode, under ``torch.inference_mode``) on RGB uint8 crops for each TTA slot.

    ``batch_size`` is in images per forward; on a 2-core CPU 8–16 is faster per image than 64
    (``benchmarks/embedding.py``). The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    imgs = _as_uint8_nhwc(images)
    dev = torch.device(device) if device is not None else _model_device(model)
    slots = tta_slots(tta)
    n = imgs.shape[0]
    was_training = model.training
    model.eval()
    embs = np.empty((len(slots), n, model.embedding_dim), np.float32)
    logits = np.empty((len(slots), n, model.num_classes), np.float32) if model.num_classes is not None else None
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                chunk = imgs[start : start + batch_size]
                for s, (flip, gray) in enumerate(slots):
                    x = preprocess(chunk, channel_order=model.channel_order, flip=flip, gray=gray, device=dev)
                    lg, emb = model(x)
                    embs[s, start : start + len(chunk)] = emb.float().cpu().numpy()
                    if logits is not None and lg is not None:
                        logits[s, start : start + len(chunk)] = lg.float().cpu().numpy()
    finally:
        model.train(was_training)
    return Encoding(embeddings=embs, logits=logits, slots=slots)


# ----------------------------------------------------------------------------------------------- distances
def slotwise_cosine_distances(test: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """GM-Arc's ensemble distance: cosine distance per slot (slot i with slot i), averaged over slots.

    ``test``: ``(..., N_test, D)``, ``gallery``: ``(..., N_gallery, D)`` with the same leading slot axes (e.g.
    ``(n_models, n_slots)``; 3 models × 4 TTA slots = 12 matrices). Returns ``(N_test, N_gallery)`` float64:
    ``mean_s (1 − cos(test[s, i], gallery[s, j]))``. A 2-D input is a single slot.
    """
    from gestalt_xai.matching import slotwise_distances  # the one implementation of GM-Arc's rule

    a = np.asarray(test, dtype=np.float64)
    b = np.asarray(gallery, dtype=np.float64)
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"slot axes / embedding size differ: test {a.shape} vs gallery {b.shape}")
    return slotwise_distances(list(a.reshape(-1, *a.shape[-2:])), list(b.reshape(-1, *b.shape[-2:])))


class Ensemble:
    """Several :class:`GestaltMatcher` members evaluated with the same TTA slots (GM-Arc: 3 models × 4 slots).

    >>> ens = Ensemble([build_gestaltmatcher("r18", width=0.125) for _ in range(2)])
    >>> ens.embed(np.zeros((3, 112, 112, 3), np.uint8), tta=True).shape
    (2, 4, 3, 512)
    """

    def __init__(self, models: Sequence[GestaltMatcher], model_ids: Sequence[str] | None = None) -> None:
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = list(models)
        self.model_ids = list(model_ids) if model_ids is not None else [f"m{i}" for i in range(len(models))]
        if len(self.model_ids) != len(self.models):
            raise ValueError(f"{len(self.model_ids)} model ids for {len(self.models)} models")
        dims = {m.embedding_dim for m in self.models}
        if len(dims) != 1:
            raise ValueError(f"ensemble members have different embedding sizes: {sorted(dims)}")

    def __len__(self) -> int:
        return len(self.models)

    def encode(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        tta: bool = True,
        batch_size: int = 16,
        device: torch.device | str | None = None,
    ) -> list[Encoding]:
        """One :class:`Encoding` per member (logits differ in class count between members)."""
        return [encode(m, images, tta=tta, batch_size=batch_size, device=device) for m in self.models]

    def embed(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        tta: bool = True,
        batch_size: int = 16,
        device: torch.device | str | None = None,
    ) -> np.ndarray:
        """``(n_models, n_slots, N, 512)`` float32 embeddings of RGB uint8 crops."""
        encs = self.encode(images, tta=tta, batch_size=batch_size, device=device)
        return np.stack([e.embeddings for e in encs])

    @staticmethod
    def distances(test: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """Slot-wise cosine distances averaged over all model × TTA slots: :func:`slotwise_cosine_distances`."""
        return slotwise_cosine_distances(test, gallery)
