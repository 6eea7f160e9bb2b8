"""Targets: the scalar an explanation explains, one value per image, and the key it is stored under.

A target is a small callable ``target(logits, embedding) -> (B,)`` (Captum's "forward function returns one scalar
per input" contract, pytorch-grad-cam's "target is a callable" idea). The built-in kinds (registered in
:mod:`~gestalt_xai.attribution.target_kinds`, which says how the explain stage builds each):

* :class:`LogitTarget` — a class logit ``z_c``; needs a classifier head.
* :class:`CentroidTarget` — similarity of the embedding ``f`` to a syndrome centroid ``r``.
* :class:`PairTarget` — similarity of ``f`` to another image's embedding ``r``.

Similarity targets default to the **linearised cosine**

.. math::

    \\tilde s = \\hat r \\cdot f / \\operatorname{stopgrad}(\\lVert f \\rVert),
    \\qquad \\hat r = r/\\lVert r \\rVert

which has the value of the cosine but the gradient :math:`\\hat r/\\lVert f\\rVert`. The exact cosine's gradient
:math:`(\\hat r - s \\hat f)/\\lVert f\\rVert` is orthogonal to ``f``, so decompositions (HiResCAM, FullGrad, LRP)
of it sum to ~0 (tests/test_attribution_gradients.py checks value and gradient). ``exact=True`` gives the exact
cosine; ``describe()`` records which one was used.

Every map is stored under a :class:`TargetKey` ``kind:ref`` (``centroid:S01``, ``logit:S01``, ``pair:img7``).

Centroids (:class:`CentroidBank`) are the mean of L2-normalised gallery embeddings, averaged per subject first
(every subject weighs the same however many photos it has), computed per model and TTA slot, and **exclude the
query's own subject** (a patient is never explained against a centroid that contains himself).

Target *specs* (what the explain stage is asked for) are parsed by :func:`parse_syndrome_spec` and
:func:`parse_pair_spec`: syndromes ``label`` | ``topk:K`` | ``ID,ID,…``; pairs ``nearest:K`` | a table path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.matching.centroids import CentroidBank

__all__ = [
    "TargetKey",
    "TTASlot",
    "split_targets",
    "Target",
    "LogitTarget",
    "CosineTarget",
    "CentroidTarget",
    "PairTarget",
    "CentroidBank",
    "SyndromeSpec",
    "PairSpec",
    "parse_syndrome_spec",
    "parse_pair_spec",
    "linearised_cosine",
]

#: a TTA view of one image: ``(flip, gray)``
TTASlot: TypeAlias = tuple[bool, bool]
Slot = TTASlot  # the name used by the centroid code below


# ------------------------------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class TargetKey:
    """What a map explains: a target ``kind`` and its reference, stored as the string ``kind:ref``.

    ``ref`` is a syndrome id (``centroid``, ``logit``) or an image id (``pair``); it may contain ``:``, the kind
    may not.

    >>> key = TargetKey.parse("centroid:S01")
    >>> key.kind, key.ref, str(key)
    ('centroid', 'S01', 'centroid:S01')
    >>> TargetKey.parse("pair:a:b").ref
    'a:b'
    """

    kind: str
    ref: str

    def __post_init__(self) -> None:
        if not self.kind or ":" in self.kind or not self.ref:
            raise InputError(f"a target is 'kind:ref' with a non-empty kind without ':' and a non-empty reference, "
                             f"got kind {self.kind!r} and ref {self.ref!r}")

    @classmethod
    def parse(cls, text: str | TargetKey) -> TargetKey:
        """The key of a stored target string (a key is returned as it is)."""
        if isinstance(text, TargetKey):
            return text
        kind, sep, ref = str(text).partition(":")
        if not sep:
            raise InputError(f"target {text!r} is not of the form 'kind:ref' (e.g. 'centroid:S01')")
        return cls(kind, ref)

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}"


def split_targets(targets: Iterable[str] | pd.Series) -> pd.DataFrame:
    """Target strings (e.g. the map index's ``target`` column) as columns ``target_kind, target_ref``, vectorised.

    >>> split_targets(["centroid:S01", "pair:a:b"]).values.tolist()
    [['centroid', 'S01'], ['pair', 'a:b']]
    """
    values = pd.Series(targets, dtype=object).astype(str)
    parts = values.str.partition(":").reindex(columns=[0, 1, 2])  # an empty input gives no columns
    if bad := values[(parts[1] != ":") | (parts[0] == "") | (parts[2] == "")].tolist():
        raise InputError(f"targets not of the form 'kind:ref': {bad[:5]}")
    return pd.DataFrame({"target_kind": parts[0].astype(object), "target_ref": parts[2].astype(object)},
                        index=values.index)


# ------------------------------------------------------------------------------------------------- callables
class Target(ABC):
    """One scalar per image from model outputs ``(logits | None, embedding)``."""

    kind: ClassVar[str] = "target"
    #: whether the target reads the classifier's logits (members without a classifier are skipped)
    needs_logits: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, logits: torch.Tensor | None, embedding: torch.Tensor) -> torch.Tensor:
        """Return the explained score, shape ``(B,)``."""

    @abstractmethod
    def output_relevance(
        self, logits: torch.Tensor | None, embedding: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Relevance of the model outputs for LRP: ``(R_logits, R_embedding)``, each summing to the score.

        The last operation of every target is linear in the model output (a logit pick, or ``r̂·f/‖f‖`` with the norm
        held constant), so the z-rule on it is exact: ``R_j = w_j x_j`` with no bias to absorb relevance.
        """

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description recorded with every map."""
        return {"kind": self.kind}

    def select(self, rows: Sequence[int]) -> Target:
        """The same target for a subset of the batch's images (per-image references follow their rows).

        A target with a single row broadcasts to any batch, which is how Captum methods that expand the batch
        (IG steps, NoiseTunnel samples, DeepLIFT baselines) are run: one image at a time.
        """
        return self


class LogitTarget(Target):
    """The logit of one class per image (``class_idx`` an int or one index per image).

    >>> t = LogitTarget(1)
    >>> t(torch.tensor([[0.0, 2.0], [1.0, 3.0]]), torch.zeros(2, 4)).tolist()
    [2.0, 3.0]
    """

    kind = "logit"
    needs_logits = True

    def __init__(self, class_idx: int | Sequence[int] | torch.Tensor) -> None:
        self.class_idx = torch.as_tensor(class_idx, dtype=torch.long)

    def select(self, rows: Sequence[int]) -> LogitTarget:
        if self.class_idx.ndim == 0:
            return self
        return LogitTarget(self.class_idx[list(rows)])

    def _index(self, logits: torch.Tensor) -> torch.Tensor:
        idx = self.class_idx.to(logits.device)
        if idx.ndim == 0 or idx.numel() == 1:
            idx = idx.reshape(()).expand(logits.shape[0])
        if idx.shape[0] != logits.shape[0]:
            raise ValueError(f"{idx.shape[0]} class indices for a batch of {logits.shape[0]}")
        return idx

    def __call__(self, logits: torch.Tensor | None, embedding: torch.Tensor) -> torch.Tensor:
        if logits is None:
            raise ConfigError("a logit target needs a classifier head; this model returns only an embedding")
        return logits.gather(1, self._index(logits)[:, None])[:, 0]

    def output_relevance(self, logits, embedding):  # type: ignore[no-untyped-def]
        if logits is None:
            raise ConfigError("a logit target needs a classifier head; this model returns only an embedding")
        onehot = F.one_hot(self._index(logits), logits.shape[1]).to(logits.dtype)
        return (onehot * logits).detach(), None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "class_idx": self.class_idx.tolist()}


def linearised_cosine(embedding: torch.Tensor, reference: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """``r̂·f / stopgrad(‖f‖)`` per row (or the exact cosine with ``exact=True``).

    ``reference`` is ``(D,)`` or ``(B, D)``. Same value either way; gradients differ (module docstring).
    """
    ref = reference.to(embedding.dtype).to(embedding.device)
    if ref.ndim == 1 or ref.shape[0] == 1:
        ref = ref.reshape(1, -1).expand_as(embedding)
    r_hat = F.normalize(ref, dim=1)
    norm = embedding.norm(dim=1)
    if not exact:
        norm = norm.detach()
    return (r_hat * embedding).sum(1) / norm.clamp_min(1e-12)


class CosineTarget(Target):
    """Cosine similarity of the embedding to a reference (one per image, or one shared), linearised by default."""

    kind = "cosine"

    def __init__(self, reference: torch.Tensor | np.ndarray, *, exact: bool = False) -> None:
        ref = torch.as_tensor(np.asarray(reference, dtype=np.float32))
        if ref.ndim not in (1, 2):
            raise ValueError(f"reference must be (D,) or (B, D), got {tuple(ref.shape)}")
        if not torch.isfinite(ref).all() or (ref.norm(dim=-1) == 0).any():
            raise InputError("reference embedding is zero or not finite")
        self.reference = ref
        self.exact = exact

    def __call__(self, logits: torch.Tensor | None, embedding: torch.Tensor) -> torch.Tensor:
        return linearised_cosine(embedding, self.reference, exact=self.exact)

    def output_relevance(self, logits, embedding):  # type: ignore[no-untyped-def]
        # z-rule on the last "layer" s = Σ_j (r̂_j/‖f‖) f_j: R_j = f_j r̂_j/‖f‖ (sums to s, no bias). The same
        # relevance is used for the exact cosine (LRP is not a gradient method; recorded in describe()).
        ref = self.reference.to(embedding.device, embedding.dtype)
        if ref.ndim == 1 or ref.shape[0] == 1:
            ref = ref.reshape(1, -1).expand_as(embedding)
        r_hat = F.normalize(ref, dim=1)
        rel = embedding.detach() * r_hat / embedding.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
        return None, rel

    def select(self, rows: Sequence[int]) -> CosineTarget:
        if self.reference.ndim == 1:
            return self
        return type(self)(self.reference[list(rows)], exact=self.exact)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "cosine": "exact" if self.exact else "linearised"}


class CentroidTarget(CosineTarget):
    """Cosine similarity to a syndrome centroid (see :class:`CentroidBank`)."""

    kind = "centroid"


class PairTarget(CosineTarget):
    """Cosine similarity to another image's embedding (same model and TTA slot)."""

    kind = "pair"


# ------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class SyndromeSpec:
    """Which syndromes to explain: the known ``label``, the ``topk`` best-ranked, or explicit ``ids``."""

    mode: str  # "label" | "topk" | "ids"
    k: int = 0
    ids: tuple[str, ...] = ()

    def __str__(self) -> str:
        return {"label": "label", "topk": f"topk:{self.k}"}.get(self.mode, ",".join(self.ids))


def parse_syndrome_spec(spec: str | Sequence[str]) -> SyndromeSpec:
    """``"label"`` | ``"topk:K"`` | ``"ID,ID"`` (or a list of ids).

    >>> parse_syndrome_spec("topk:3")
    SyndromeSpec(mode='topk', k=3, ids=())
    >>> parse_syndrome_spec("OMIM1, OMIM2").ids
    ('OMIM1', 'OMIM2')
    """
    if not isinstance(spec, str):
        ids = tuple(str(s).strip() for s in spec if str(s).strip())
        if not ids:
            raise ConfigError("syndromes: empty list of syndrome ids")
        return SyndromeSpec("ids", ids=ids)
    s = spec.strip()
    if s == "label":
        return SyndromeSpec("label")
    if s.startswith("topk:"):
        return SyndromeSpec("topk", k=_count_after(s, "syndromes", "topk"))
    ids = tuple(p.strip() for p in s.split(",") if p.strip())
    if not ids:
        raise ConfigError(f"syndromes: expected 'label', 'topk:K' or syndrome ids, got {spec!r}")
    return SyndromeSpec("ids", ids=ids)


def _count_after(spec: str, option: str, prefix: str) -> int:
    """The K of ``"<prefix>:K"`` (K ≥ 1), or a :class:`ConfigError` naming the option."""
    try:
        k = int(spec.split(":", 1)[1])
    except ValueError:
        k = 0
    if k < 1:
        raise ConfigError(f"{option}: expected {prefix}:K with K ≥ 1, got {spec!r}")
    return k


@dataclass(frozen=True)
class PairSpec:
    """Partners for pair targets: ``nearest`` K gallery images per selected syndrome, or an explicit ``table``."""

    mode: str  # "nearest" | "table"
    k: int = 0
    table: Path | None = None

    def __str__(self) -> str:
        return f"nearest:{self.k}" if self.mode == "nearest" else str(self.table)


def parse_pair_spec(spec: str) -> PairSpec:
    """``"nearest:K"`` or the path of a CSV/Parquet table with columns ``image_id, partner_id``.

    >>> parse_pair_spec("nearest:2")
    PairSpec(mode='nearest', k=2, table=None)
    """
    s = str(spec).strip()
    if s.startswith("nearest:"):
        return PairSpec("nearest", k=_count_after(s, "pairs", "nearest"))
    return PairSpec("table", table=Path(s))


def read_pairs_table(path: Path) -> pd.DataFrame:
    """Read a pairs table (``image_id, partner_id``); both directions are explained, so each pair gives two maps."""
    if not path.is_file():
        raise ConfigError(f"pairs table not found: {path}")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, sep=None, engine="python")
    if not {"image_id", "partner_id"} <= set(df.columns):
        raise InputError(f"{path}: pairs table needs columns image_id, partner_id; has {list(df.columns)}")
    df = df[["image_id", "partner_id"]].astype(str)
    both = pd.concat([df, df.rename(columns={"image_id": "partner_id", "partner_id": "image_id"})])
    both = both[both["image_id"] != both["partner_id"]]
    return both.drop_duplicates().sort_values(["image_id", "partner_id"]).reset_index(drop=True)
