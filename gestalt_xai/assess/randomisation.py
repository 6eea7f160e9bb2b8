"""Sanity checks of saliency maps: model-parameter and data randomisation (Adebayo et al., NeurIPS 2018).

An explanation that does not change when the model's parameters (or the labels it learnt from) are randomised
explains the input, not the model. :func:`randomisation_maps` recomputes every method's maps under a sequence of
randomised copies of the explained model and compares them with the maps as stored
(:func:`gestalt_xai.assess.compare.compare_maps`: Spearman of the raw signed maps, Spearman of their absolute values,
SSIM); :func:`data_randomisation_maps` compares the maps of a model trained on permuted labels with the real ones.

**Layer groups** (:func:`layer_groups`, top-down, the order Adebayo et al. randomise in: from the logits down). A
GestaltMatcher (:mod:`gestalt_xai.models.gestaltmatcher`; a bare :class:`~gestalt_xai.models.iresnet.IResNet` alike)
has six: ``head`` (the classifier, when present, and the embedding head ``bn2 → fc → features``), ``layer4``,
``layer3``, ``layer2``, ``layer1`` (the residual stages) and ``stem`` (``conv1 → bn1 → prelu``); with
``granularity="block"`` each stage is split into its residual blocks, last block first (``layer4.1``, ``layer4.0``,
…). The groups cover every parameter and buffer. Any other ``nn.Module``: one group per child module holding
parameters or buffers, children in reverse registration order (parameters held by the root itself stay as trained).
For a classifier-free target (centroid, pair) the classifier is not part of the explained function: randomising it
leaves those maps unchanged, as it should.

**Randomisation.** Each member model gets one fresh initialisation under ``seed``: for a GestaltMatcher
:func:`~gestalt_xai.models.gestaltmatcher.reinitialised` (the model's own initialisation — kaiming-normal
convolutions, BatchNorm weight 1 / bias 0, PyTorch's default PReLU and Linear — so the last cascading step *is* the
random-model control ``randomise: true, randomise_seed: seed`` of :mod:`gestalt_xai.models.declaration`); for other
modules a deep copy whose modules' ``reset_parameters()`` run under ``torch.manual_seed(seed)`` (what Quantus's
PyTorch wrapper calls). The global generators are left as they were. A step is a deep copy of the trained member with
the state entries (parameters *and* buffers) of its randomised groups loaded from the fresh initialisation — the
groups so far (``cascading``: top-down, cumulative) or one group (``independent``). Loading writes the tensors in
place, so frozen parameters (``requires_grad=False``, as the explain stage loads its models) are randomised like any
other. **BatchNorm running statistics are reset** with their layer (mean 0, variance 1): they are estimates of the
trained layers' activations below them and mean nothing for random weights; Quantus's ``reset_parameters()`` resets
them too. Only one step's copies exist at a time. All copies are in eval mode.

**What is explained.** Every step explains the *same scalar*: the randomised copies replace the networks of the
trained :class:`~gestalt_xai.attribution.score_model.ScoreModel` through ``with_models``, which keeps its targets —
so centroid and pair references are the **trained** model's embeddings (column ``references``: ``"trained model"``)
and a logit target reads the randomised classifier. The randomised model's score of each item is in column ``score``
(step 0: the trained model's; one gradient-free forward per step and batch). Each method runs once per step and
batch (the gradient family: one forward+backward for Grad-CAM, HiResCAM, FullGrad, saliency and input×gradient), on
the same copies for every method.

**Data randomisation.** ``gestalt-xai train --set permute_labels=<seed>`` trains a model on labels permuted across
subjects (:func:`gestalt_xai.models.train.permute_subject_labels`), stored in ``run/controls/permuted_labels/`` so no
stage uses it as a model. :func:`control_setup` swaps it into an explain setup under the trained model's id with its
**own** references: the gallery (and the explained images, for ``topk`` rankings) are embedded through the permuted
model, so a centroid is the permuted model's centroid and a logit target uses its classifier (column
``references``: ``"permuted model"``).

**Quantus 0.6** ``MPRT`` (``tests/test_assess_randomisation.py`` feeds it these copies and agrees to 1e-6) differs:

* it randomises every module with a ``reset_parameters`` method — each Conv, BatchNorm, PReLU and Linear is a step
  (≈ 60 for an iResNet-18) — in reverse ``named_modules()`` *registration* order (a block's ``downsample`` after its
  ``conv2``; the classifier, registered last, first); we randomise whole stages (or blocks) in execution order;
* it re-seeds the global generator with ``seed + 1`` before every module and uses PyTorch's default initialisation
  (kaiming-uniform, ``a = √5``), not the model's own;
* it mutates one copy in place along the cascade and reloads the trained state for ``independent``; we deep-copy
  the trained model per step;
* it takes absolute values (``abs=True``) and divides by the maximum (``normalise=True``) before comparing by
  default: its Spearman equals our ``spearman_abs`` with ``abs=True``, our ``spearman`` with ``abs=False`` (the
  division by a positive maximum changes no rank);
* it explains a class output (``softmax=False`` for logits); the check passes ``y_batch`` = row indices and an
  ``explain_func`` that explains those rows of our ScoreModel.

**Randomisation drop** (:func:`randomisation_drop`, higher = more sensitive to the model): ``1 − mean_i |ρ_i|`` of
the raw-map Spearman ``ρ_i`` of the items at the **last cascading step** (every group randomised): 0 when the maps
are unchanged (or merely inverted), 1 when they are uncorrelated with the trained model's.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from gestalt_xai.assess.compare import compare_maps
from gestalt_xai.assess.metric import metric
from gestalt_xai.errors import ConfigError, InputError

if TYPE_CHECKING:
    from gestalt_xai.attribution.base import AttributionMethod
    from gestalt_xai.attribution.planning import ExplainSetup
    from gestalt_xai.attribution.score_model import ScoreModel
    from gestalt_xai.runs import Run

__all__ = ["COLUMNS", "MODES", "LayerGroup", "control_setup", "data_randomisation_maps", "layer_groups",
           "layout_similarity", "randomisation_drop", "randomisation_drops", "randomisation_maps",
           "randomisation_summary", "randomised_models"]

log = logging.getLogger(__name__)

Mode = Literal["cascading", "independent"]
MODES: tuple[str, ...] = ("cascading", "independent")
#: the metrics each recomputed map is compared with its stored map by (gestalt_xai.assess.compare)
METRICS = ("spearman", "spearman_abs", "ssim")
#: the columns of :func:`randomisation_maps` and :func:`data_randomisation_maps`
COLUMNS = ["item", "method", "layer", "mode", "step", "group", *METRICS, "score", "references"]
_REFERENCE = "Adebayo et al., Sanity checks for saliency maps, NeurIPS 2018"


# ------------------------------------------------------------------------------------------------ layer groups
@dataclass(frozen=True)
class LayerGroup:
    """One randomisation step's modules: ``name`` (shown in tables) and qualified module names inside the model."""

    name: str
    modules: tuple[str, ...]

    def keys(self, state: Mapping[str, Any]) -> list[str]:
        """The entries of ``state`` (a state dict) that belong to this group's modules."""
        return [k for k in state if any(k == m or k.startswith(f"{m}.") for m in self.modules)]


def layer_groups(model: nn.Module, granularity: Literal["stage", "block"] = "stage") -> list[LayerGroup]:
    """The model's randomisation groups, top-down (module docstring).

    >>> from gestalt_xai.models import build_gestaltmatcher
    >>> [g.name for g in layer_groups(build_gestaltmatcher("r18", width=0.125, num_classes=2))]
    ['head', 'layer4', 'layer3', 'layer2', 'layer1', 'stem']
    >>> layer_groups(build_gestaltmatcher("r18", width=0.125), "block")[1]
    LayerGroup(name='layer4.1', modules=('backbone.layer4.1',))
    >>> [g.name for g in layer_groups(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))]
    ['2', '0']
    """
    from gestalt_xai.models.gestaltmatcher import GestaltMatcher
    from gestalt_xai.models.iresnet import IResNet

    if granularity not in ("stage", "block"):
        raise ConfigError(f"granularity must be 'stage' or 'block', got {granularity!r}")
    if isinstance(model, GestaltMatcher | IResNet):
        backbone, p = (model.backbone, "backbone.") if isinstance(model, GestaltMatcher) else (model, "")
        classifier = ("classifier",) if getattr(model, "classifier", None) is not None else ()
        groups = [LayerGroup("head", (*classifier, f"{p}bn2", f"{p}fc", f"{p}features"))]
        for i in (4, 3, 2, 1):
            if granularity == "stage":
                groups.append(LayerGroup(f"layer{i}", (f"{p}layer{i}",)))
            else:
                n_blocks = len(getattr(backbone, f"layer{i}"))
                groups += [LayerGroup(f"layer{i}.{j}", (f"{p}layer{i}.{j}",)) for j in reversed(range(n_blocks))]
        return [*groups, LayerGroup("stem", (f"{p}conv1", f"{p}bn1", f"{p}prelu"))]
    groups = [LayerGroup(name, (name,)) for name, child in reversed(list(model.named_children()))
              if next(iter(child.parameters()), None) is not None or next(iter(child.buffers()), None) is not None]
    if not groups:
        raise ConfigError(f"{type(model).__name__} has no child module with parameters to randomise")
    return groups


def _fresh_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A fresh initialisation of ``model``'s architecture under ``seed`` (module docstring), as a state dict."""
    from gestalt_xai.models.gestaltmatcher import GestaltMatcher, reinitialised

    if isinstance(model, GestaltMatcher):
        return reinitialised(model, seed).state_dict()
    fresh = copy.deepcopy(model).cpu()  # initialised on the CPU generator: the same weights on any device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    return fresh.state_dict()


def randomised_models(models: Sequence[nn.Module], *, mode: Mode = "cascading", seed: int = 0,
                      granularity: Literal["stage", "block"] = "stage",
                      groups: Sequence[str] | None = None) -> Iterator[tuple[str, list[nn.Module]]]:
    """``(group name, randomised copies of models)`` per step, top-down; one step's copies at a time.

    ``models`` are the members of one ScoreModel (one model, or an ensemble of models with the same groups; each
    member gets its own fresh initialisation under ``seed``). The inputs are never modified. ``groups`` names the
    steps to yield (default: every group); a cascading step still randomises every group above it.

    >>> from gestalt_xai.models import build_gestaltmatcher
    >>> m = build_gestaltmatcher("r18", width=0.125).eval()
    >>> steps = [(name, c[0]) for name, c in randomised_models([m], mode="independent")]
    >>> name, copy_ = steps[0]
    >>> name, torch.equal(copy_.backbone.fc.weight, m.backbone.fc.weight), torch.equal(copy_.backbone.conv1.weight,
    ...                                                                                    m.backbone.conv1.weight)
    ('head', False, True)
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    per_model = [layer_groups(m, granularity) for m in models]
    if any([g.name for g in gs] != [g.name for g in per_model[0]] for gs in per_model):
        raise ConfigError("ensemble members have different layer groups; randomise them one model at a time")
    names = [g.name for g in per_model[0]]
    if unknown := sorted(set(groups or ()) - set(names)):
        raise ConfigError(f"unknown layer groups {unknown}; this model's groups are {names}")
    fresh = [_fresh_state(m, seed) for m in models]
    for step, group in enumerate(per_model[0]):
        if groups is not None and group.name not in groups:
            continue
        copies = []
        for model, gs, state in zip(models, per_model, fresh, strict=True):
            chosen = gs[: step + 1] if mode == "cascading" else [gs[step]]
            c = copy.deepcopy(model)
            c.load_state_dict({k: state[k] for g in chosen for k in g.keys(state)}, strict=False)
            copies.append(c.eval())
        yield group.name, copies


# ------------------------------------------------------------------------------------------------ the engines
def _stored_maps(maps: Mapping[Any, np.ndarray], built: list[tuple[AttributionMethod, list[str]]],
                 layers: Sequence[str], n: int) -> dict[tuple[str, str], np.ndarray]:
    """The stored map of every (method, layer) the methods produce: ``maps[(method, layer)]``, or ``maps[method]``
    for an input-space method or a layer method computed at one layer."""
    out = {}
    for inst, names in built:
        for name in names:
            for layer in (layers if name in inst.layer_methods else [""]):
                key = (name, layer) if (name, layer) in maps else name
                if key not in maps or (key == name and name in inst.layer_methods and len(layers) > 1):
                    raise InputError(f"no stored map for {name!r}" + (f" at {layer!r}" if layer else "")
                                     + (f"; key maps by (method, layer) for {len(layers)} layers" if layer else ""))
                arr = np.asarray(maps[key], np.float32)
                if arr.shape[0] != n or arr.ndim != 3:
                    raise InputError(f"maps[{key!r}] has shape {arr.shape}; expected ({n}, H, W)")
                out[(name, layer)] = arr
    return out


def _compare_step(score_model: ScoreModel, x: torch.Tensor, stored: Mapping[tuple[str, str], np.ndarray],
                  built: list[tuple[AttributionMethod, list[str]]], layers: Sequence[str],
                  batch_size: int) -> pd.DataFrame:
    """Recompute every method's maps through ``score_model`` in batches and compare them with ``stored``."""
    parts = []
    n = len(x)
    for start in range(0, n, batch_size):
        rows = list(range(start, min(start + batch_size, n)))
        sub = score_model if len(rows) == n else score_model.select(rows)
        xb = x[rows[0]: rows[-1] + 1]
        with torch.no_grad():
            scores = sub(xb).double().cpu().numpy()
        for inst, names in built:
            for mm in inst.attribute(sub, xb, names, layers):
                new = mm.maps.detach().cpu().float().numpy()
                values = compare_maps(stored[(mm.method, mm.layer)][rows], new, metrics=METRICS)
                parts.append(pd.DataFrame({"item": rows, "method": mm.method, "layer": mm.layer,
                                           **{k: np.asarray(values[k], np.float64) for k in METRICS},
                                           "score": scores}))
    return pd.concat(parts, ignore_index=True)


def _prepare(score_model: ScoreModel, crops: np.ndarray, maps: Mapping[Any, np.ndarray], methods: Sequence[str],
             method_params: Mapping[str, Mapping[str, Any]] | None,
             layers: Sequence[str] | None) -> tuple[torch.Tensor, Any, list[str], dict[tuple[str, str], np.ndarray]]:
    from gestalt_xai.attribution.base import build_methods
    from gestalt_xai.attribution.gradients import DEFAULT_LAYER
    from gestalt_xai.models.gestaltmatcher import preprocess

    if not methods:
        raise ConfigError("methods: give at least one attribution method")
    built = build_methods(list(methods), dict(method_params or {}))
    layers = [DEFAULT_LAYER] if layers is None else list(layers)
    device = next(score_model.parameters()).device
    x = preprocess(np.asarray(crops, np.uint8), channel_order="RGB", device=device)
    return x, built, layers, _stored_maps(maps, built, layers, len(x))


def _finish(frames: list[pd.DataFrame], mode: str, references: str) -> pd.DataFrame:
    out = pd.concat(frames, ignore_index=True).assign(mode=mode, references=references)
    out = out.sort_values(["step", "method", "layer", "item"], kind="stable").reset_index(drop=True)
    return out[COLUMNS]


def randomisation_maps(score_model: ScoreModel, crops: np.ndarray, maps: Mapping[Any, np.ndarray], *,
                       methods: Sequence[str], method_params: Mapping[str, Mapping[str, Any]] | None = None,
                       layers: Sequence[str] | None = None, mode: Mode = "cascading", seed: int = 0,
                       batch_size: int = 32, granularity: Literal["stage", "block"] = "stage",
                       groups: Sequence[str] | None = None, check_original: bool = True) -> pd.DataFrame:
    """Model-parameter randomisation: each method's maps under each randomisation step vs the stored maps.

    Parameters
    ----------
    score_model : the trained ScoreModel the maps explain, one target row per crop.
    crops : ``(B, 112, 112, 3)`` uint8 RGB aligned crops.
    maps : the stored raw maps ``(B, 112, 112)`` by method name (or ``(method, layer)`` for several CAM layers).
    methods, method_params : as the explain stage's (:func:`~gestalt_xai.attribution.base.build_methods`).
    layers : CAM layers (default ``backbone.layer4``).
    mode : ``cascading`` (top-down, cumulative) or ``independent`` (one group at a time).
    seed : the fresh initialisation's seed. ``granularity``: ``stage`` or ``block`` groups (:func:`layer_groups`).
    groups : run only the steps of these groups (e.g. ``["head", "layer2", "stem"]`` for a cheap cascading curve;
        each cascading step still randomises every group above it). Steps keep their numbers in the full sequence.
    check_original : also recompute the maps with the trained model (step 0, group ``original``): Spearman 1 up to
        float rounding when the stored maps are this model's — the reference point of the curve.

    Returns
    -------
    One row per item × method × layer × step (:data:`COLUMNS`): ``step`` 0 = original, then 1… in group order;
    ``spearman``, ``spearman_abs``, ``ssim`` against the stored map; ``score`` the step's model's score of the item;
    ``references`` ``"trained model"`` (module docstring).
    """
    x, built, layers, stored = _prepare(score_model, crops, maps, methods, method_params, layers)
    frames = []
    if check_original:
        frames.append(_compare_step(score_model, x, stored, built, layers, batch_size).assign(step=0,
                                                                                             group="original"))
    names = [g.name for g in layer_groups(score_model.members[0], granularity)]
    steps = randomised_models(list(score_model.members), mode=mode, seed=seed, granularity=granularity,
                              groups=groups)
    for group, copies in steps:
        step = names.index(group) + 1
        frame = _compare_step(score_model.with_models(copies), x, stored, built, layers, batch_size)
        frames.append(frame.assign(step=step, group=group))
        log.debug("randomisation %s step %d (%s): mean spearman %s", mode, step, group,
                  frame.groupby("method")["spearman"].mean().round(3).to_dict())
        del copies
    return _finish(frames, mode, "trained model")


def data_randomisation_maps(score_model: ScoreModel, crops: np.ndarray, maps: Mapping[Any, np.ndarray], *,
                            methods: Sequence[str], method_params: Mapping[str, Mapping[str, Any]] | None = None,
                            layers: Sequence[str] | None = None, batch_size: int = 32) -> pd.DataFrame:
    """Data randomisation: the maps of a model trained on permuted labels vs the real model's stored ``maps``.

    ``score_model`` is the permuted-label model's ScoreModel for the same items, with its own references (build its
    work items from :func:`control_setup`). Rows as :func:`randomisation_maps` with ``mode`` ``"data"``, one step
    (``1``, group ``permuted_labels``) and ``references`` ``"permuted model"``.
    """
    x, built, layers, stored = _prepare(score_model, crops, maps, methods, method_params, layers)
    frame = _compare_step(score_model, x, stored, built, layers, batch_size).assign(step=1, group="permuted_labels")
    return _finish([frame], "data", "permuted model")


def control_setup(run: Run, setup: ExplainSetup, model_id: str, model: nn.Module, *,
                  batch_size: int = 16) -> ExplainSetup:
    """``setup`` with ``model`` (e.g. the permuted-label control) standing in for the trained model ``model_id``.

    Same options, images, slots, target kind and model id, so the work items are the same (image, target) pairs
    (with ``topk`` syndromes they are the control's own ranking); the references come from ``model``'s own
    embeddings: the gallery and the explained images are embedded through it (:mod:`gestalt_xai.models.embed`, the
    setup's TTA slots). ``model`` is put in eval mode and frozen, as the explain stage loads its models.
    """
    from gestalt_xai.attribution.target_kinds import get_target_kind
    from gestalt_xai.models.embed import EmbedConfig, _encode_chunk

    if model_id not in [mid for mid, _, _ in setup.models]:
        raise ConfigError(f"model {model_id!r} is not one of the setup's models {[m for m, _, _ in setup.models]}")
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    ids = sorted(set(setup.gallery_ids) | set(setup.image_ids))
    table, errors = _encode_chunk(model, run, model_id, ids, EmbedConfig(tta=setup.cfg.tta, batch_size=batch_size),
                                  next(model.parameters()).device)
    if errors:
        raise InputError(f"{len(errors)} crops could not be embedded through the control, e.g. {errors[0]}")
    own = table.to_pandas().astype({"image_id": str, "model_id": str})
    embeddings = pd.concat([setup.embeddings[setup.embeddings["model_id"] != model_id], own], ignore_index=True)
    models = [(mid, model if mid == model_id else m, f"control:{sha}" if mid == model_id else sha)
              for mid, m, sha in setup.models]
    new = replace(setup, models=models, embeddings=embeddings, kind=get_target_kind(setup.cfg.target)(setup.cfg))
    new.kind.prepare(run, models, new.images, embeddings, new.gallery_ids)
    return new


# ------------------------------------------------------------------------------------------------ summaries
@metric("randomisation_drop", family="randomisation", direction="higher", reference=_REFERENCE)
def randomisation_drop(spearman: np.ndarray) -> float:
    """``1 − mean |ρ|`` of the items' raw-map Spearman at the last cascading step (module docstring); NaN-skipping.

    >>> randomisation_drop(np.array([1.0, -1.0])), randomisation_drop(np.array([0.1, -0.1]))
    (0.0, 0.9)
    """
    rho = np.abs(np.asarray(spearman, np.float64))
    rho = rho[np.isfinite(rho)]
    return float(1.0 - rho.mean()) if len(rho) else float("nan")


def layout_similarity(maps: Mapping[Any, np.ndarray]) -> pd.DataFrame:
    """How alike the stored maps of *different* items are: the mean comparison of each item's map with the next
    item's (cyclically), per method and layer (keys as in :func:`randomisation_maps`; pass one item per image).

    On aligned faces maps share a layout (eyes, mouth, borders at fixed places), so unrelated maps are far from
    uncorrelated: this is the level a map that kept nothing of its own image would sit at. A randomised model's maps
    below it kept no more of the trained map than another face's map shares with it.
    """
    rows = []
    for key, arr in maps.items():
        a = np.asarray(arr, np.float32)
        values = compare_maps(a, np.roll(a, 1, axis=0), metrics=METRICS) if len(a) > 1 else {}
        method, layer = key if isinstance(key, tuple) else (key, "")
        rows.append({"method": method, "layer": layer, "n": len(a),
                     **{k: float(np.nanmean(values[k])) if values else float("nan") for k in METRICS}})
    return pd.DataFrame(rows, columns=["method", "layer", *METRICS, "n"])


def randomisation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per method, layer, mode and step: the mean of each comparison and of the score, the items, and
    :func:`randomisation_drop` of that step's Spearman (the method's drop is its value at the last cascading step:
    :func:`randomisation_drops`)."""
    keys = ["method", "layer", "mode", "step", "group"]
    grouped = table.groupby(keys, sort=True)
    out = grouped[[*METRICS, "score"]].mean()
    out["n"] = grouped.size()
    out["drop"] = grouped["spearman"].agg(randomisation_drop)
    return out.reset_index()


def randomisation_drops(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and layer: the randomisation drop and the mean Spearman, raw and absolute, and SSIM at the last
    cascading step (every group randomised), and that step's group. Empty without cascading rows."""
    cascade = table[table["mode"] == "cascading"]
    last = cascade[cascade["step"] == cascade.groupby(["method", "layer"])["step"].transform("max")]
    summary = randomisation_summary(last)
    return summary[["method", "layer", "group", "drop", *METRICS, "n"]].rename(columns={"group": "last_group"})
