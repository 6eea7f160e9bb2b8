"""A simulated eye-tracking study on a synthetic cohort: observers view cohort photos, and their fixations are
written in two real formats (EyeLink ASC, Tobii Pro Lab TSV) so the readers and the whole eye-tracking stage run in
the demo. **Every number this module writes is simulated**: the ASC files carry a ``** SIMULATED DATA`` header line,
the Tobii export a ``Project name`` of ``SIMULATED``, and the participants and answers tables a ``simulated`` column.

Study design (what is simulated)
--------------------------------
Each observer sees every selected photo once, in a seeded order of its own, as a square stimulus of
``stimulus_px`` × ``stimulus_px`` screen pixels centred on a ``screen_width_px`` × ``screen_height_px`` monitor
(``screen_width_mm`` × ``screen_height_mm`` at ``viewing_distance_mm``): the photo padded to a square of side
max(width, height) about its centre and scaled to the stimulus size (``stimuli.csv`` records that box in photo pixels,
so the readers map stimulus pixels back to the photo). With the defaults (1920 × 1080 px, 531 × 299 mm, 600 mm) one
degree of visual angle spans ``D·tan(1°)/pitch`` ≈ 37.9 screen pixels and a face (hairline to chin) about 9°.

Generative model
----------------
1. **Observer habits.** Observer *o* weights the facial regions of :data:`REGION_PRIOR` (eyes strongest, then nose,
   mouth, brows …, a little forehead and ears, as in free viewing of faces: Janik et al. 1978; Henderson et al. 2005;
   Peterson & Eckstein 2012) with a Dirichlet draw ``w_o ~ Dir(habit_concentration · prior)``; it has a centre
   offset ``b_o ~ N(0, centre_offset_deg²)`` per axis (habit and calibration error alike), a spread factor
   ``s_o ~ LogNormal(0, 0.2)``, a fixation rate ``λ_o = fixations_per_trial · LogNormal(0, 0.2)`` and a duration
   factor ``LogNormal(0, 0.15)``. An *expert* has a feature share ``φ_o ~ Beta`` with mean ``expert_feature_share``
   (concentration 20); every other group has ``φ_o = 0``.
2. **Fixations of one trial.** Their number is ``max(2, 1 + Poisson(λ_o − 1))``. The first lands on the centre of the
   stimulus (the drift-check target shown before it; ``first_fixation_at_centre``). Each later fixation is, with
   probability ``φ_o``, a *feature fixation*: a planted feature of the photo drawn uniformly among those visible in
   the crop (truth ``visible_in_crop``; negative controls such as ears and a high forehead are never targets), and a
   pixel drawn uniformly in that feature's photo-space truth mask; otherwise a *region fixation*: a region drawn from
   ``w_o``, placed at the region's centre from the photo's true 68 landmarks plus Gaussian scatter of the region's
   size times ``s_o``. Every fixation then moves by ``b_o`` and by Gaussian noise of ``spatial_noise_deg`` per axis
   (eye-tracker accuracy and precision), converted from degrees to photo pixels through the display geometry. A photo
   without visible planted features (a control) gives experts region fixations only.
3. **Timing.** Fixation durations are ``duration_min_ms + Gamma(duration_shape)`` with mean ``duration_mean_ms``,
   times the observer's factor (whole milliseconds); a saccade of amplitude *A* degrees between two fixations lasts
   ``21 + 2.2·A`` ms and peaks at ``500·(1 − exp(−A/14))`` °/s (main sequence: Carpenter 1988; Baloh et al. 1975).
   The EyeLink files run at 1000 Hz; the Tobii export has one row per gaze sample at ``recording_hz``, fixations
   and saccades rounded to whole samples (at least two samples per fixation, one per saccade).
4. **Answers.** After each trial the observer names a syndrome of the cohort (``answers.csv``). It is right with
   probability ``sigmoid(logit(accuracy[group]) + answer_feature_gain · (f − f̄_group))``, where *f* is the share of
   the trial's fixations inside a visible planted feature's mask and *f̄* its group mean; a wrong answer is uniform
   over the other syndromes. The link is an *assumption* of the simulator, so that an analysis of correct vs
   incorrect answers has an effect to find; ``answer_feature_gain: 0`` makes answers independent of gaze.

It exercises readers, coordinate mapping, maps and metrics with known truth and a group effect that comes only from
the truth masks (``expert_feature_share: 0`` removes it); it says nothing about how real clinicians look at faces
(the prior's weights are round numbers, not estimates). ``data_cards/eyetracking.md`` describes real data too.

Outputs of :func:`simulate_study` (``out_dir``): ``stimuli.csv``, ``display.csv``, ``participants.csv``,
``answers.csv``, ``<participant>.asc`` for half of each group (EyeLink events-only ASC in the layout EDF2ASC writes:
``SFIX``/``EFIX``/``SSACC``/``ESACC`` events, ``TRIALID``, ``!V IMGLOAD CENTER``, ``!V TRIAL_VAR`` and
``TRIAL_RESULT`` messages; SR Research, *EyeLink 1000 Plus User Manual* §4.9 and *Data Viewer User Manual*,
"Protocol for EyeLink Data to Viewer Integration"), one Tobii Pro Lab data export ``tobii_pro_lab_export.tsv`` for
the other half (Tobii Pro Lab *User Manual*, "Data export": per-sample rows with ``Eye movement type``,
``Eye movement type index``, ``Gaze event duration``, ``Fixation point X/Y (MCSnorm)``, ``Gaze point X/Y``), and
``truth.parquet``: every simulated fixation in photo pixels (the shared fixation-table columns, with the file and
line each one was written to, plus ``group``, ``target_kind`` and ``target``). Trial time zero is the stimulus onset
(ASC: the ``TRIALID``, ``START`` and ``!V IMGLOAD`` lines share its timestamp; Tobii: the stimulus's first sample);
trials are numbered 1, 2, … in presentation order. Same seed → byte-identical files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from gestalt_xai.config import StageConfig
from gestalt_xai.data.synthetic.truth import TruthTables, load_masks, load_truth
from gestalt_xai.errors import ConfigError, InputError
from gestalt_xai.runs import Run, atomic_write_text, write_parquet

log = logging.getLogger(__name__)

__all__ = ["SimulationConfig", "simulate_study", "REGION_PRIOR", "TRUTH_COLUMNS", "SIMULATED_NOTE"]

#: the shared fixation table's columns (``formats.FIXATION_COLUMNS``), then the simulator's own
TRUTH_COLUMNS = ["participant", "trial", "stimulus", "image_id", "fixation", "start_ms", "duration_ms", "x", "y",
                 "photo_px_per_degree", "eye", "format", "source", "line", "group", "target_kind", "target"]
SIMULATED_NOTE = "SIMULATED DATA: not a recording of any person; written by gestalt-xai's eye-tracking simulator"

#: population prior over facial regions (share of fixations); eyes strongest (free viewing of faces)
REGION_PRIOR: dict[str, float] = {
    "periorbital_left": 0.20, "periorbital_right": 0.20, "brow_left": 0.03, "brow_right": 0.03,
    "nasal_bridge": 0.08, "nose": 0.16, "philtrum": 0.04, "mouth": 0.10, "chin": 0.03,
    "cheek_left": 0.03, "cheek_right": 0.03, "forehead": 0.05, "ear_left": 0.01, "ear_right": 0.01,
}
_REGIONS = tuple(REGION_PRIOR)
_TOBII_FILE = "tobii_pro_lab_export.tsv"
_TOBII_COLUMNS = ["Recording timestamp", "Participant name", "Recording name", "Gaze point X",
                  "Gaze point Y", "Presented Stimulus name", "Eye movement type", "Gaze event duration",
                  "Eye movement type index", "Fixation point X (MCSnorm)", "Fixation point Y (MCSnorm)"]


class SimulationConfig(StageConfig):
    """Options of the simulated eye-tracking study (see the module docstring for the model)."""

    observers: dict[str, int] = Field(default_factory=lambda: {"expert": 6, "non_clinician": 6},
                                      description="observers per group; the group 'expert' (clinicians) also "
                                                  "fixates planted features")
    images: list[str] | None = Field(None, description="image ids shown (default: test photos, images_per_syndrome "
                                                       "per syndrome, drawn by seed)")
    images_per_syndrome: int = Field(2, ge=1, description="photos per syndrome when images is not given")
    include_controls: bool = Field(False, description="also show unaffected controls (no planted features)")
    fixations_per_trial: float = Field(12.0, gt=1, description="mean fixations per trial (per-observer rates vary)")
    duration_mean_ms: float = Field(250.0, gt=0)
    duration_min_ms: float = Field(80.0, ge=0)
    duration_shape: float = Field(3.0, gt=0, description="gamma shape of fixation durations above the minimum")
    expert_feature_share: float = Field(0.5, ge=0, le=1, description="mean share of an expert's fixations (after "
                                                                     "the first) aimed at the planted features")
    spatial_noise_deg: float = Field(0.5, ge=0, description="Gaussian noise per axis, degrees of visual angle")
    centre_offset_deg: float = Field(0.4, ge=0, description="sd of an observer's habitual offset, degrees")
    habit_concentration: float = Field(50.0, gt=0, description="Dirichlet concentration of observers' region "
                                                               "weights around REGION_PRIOR (larger: more alike)")
    first_fixation_at_centre: bool = True
    accuracy: dict[str, float] = Field(default_factory=lambda: {"expert": 0.6, "non_clinician": 0.15},
                                       description="share of right answers per group (at the group's mean feature "
                                                   "dwell)")
    answer_feature_gain: float = Field(4.0, ge=0, description="log-odds of a right answer per unit of the trial's "
                                                              "feature-fixation share above its group's mean")
    screen_width_px: int = Field(1920, gt=0)
    screen_height_px: int = Field(1080, gt=0)
    screen_width_mm: float = Field(531.0, gt=0)
    screen_height_mm: float = Field(299.0, gt=0)
    viewing_distance_mm: float = Field(600.0, gt=0)
    stimulus_px: int = Field(1000, gt=0, description="side of the square stimulus on screen (screen pixels)")
    recording_hz: float = Field(30.0, gt=0, le=1200, description="sampling rate of the Tobii export")
    tobii_decimal_comma: bool = Field(True, description="write decimal commas in the Tobii export, as Pro Lab does "
                                                        "in many locales")
    seed: int = 0

    @field_validator("observers")
    @classmethod
    def _observer_counts(cls, v: dict[str, int]) -> dict[str, int]:
        if not v or any(n < 1 for n in v.values()):
            raise ValueError("observers: give at least one group, each with at least one observer")
        return v

    @model_validator(mode="after")
    def _accuracy_per_group(self) -> SimulationConfig:
        missing = sorted(set(self.observers) - set(self.accuracy))
        if missing:
            raise ValueError(f"accuracy: no value for group(s) {missing}")
        if any(not 0 < a < 1 for a in self.accuracy.values()):
            raise ValueError("accuracy: values must lie strictly between 0 and 1")
        if self.stimulus_px > min(self.screen_width_px, self.screen_height_px):
            raise ValueError("stimulus_px: the stimulus must fit on the screen")
        if self.duration_min_ms >= self.duration_mean_ms:
            raise ValueError("duration_min_ms must be below duration_mean_ms")
        return self

    def screen_px_per_degree(self) -> float:
        """Screen pixels per degree of visual angle at the centre: ``D·tan(1°)/pitch`` (horizontal pitch)."""
        return self.viewing_distance_mm * math.tan(math.radians(1.0)) / (self.screen_width_mm / self.screen_width_px)


# ------------------------------------------------------------------------------------------------ the cohort side
@dataclass
class _Photos:
    """The shown photos: geometry, region centres and spreads, planted-feature pixels (all in photo pixels)."""

    ids: list[str]
    syndromes: list[str]
    box: np.ndarray  # (n, 3) left, top, side of the square stimulus box
    ppd: np.ndarray  # (n,) photo pixels per degree
    centre: np.ndarray  # (n, R, 2)
    spread: np.ndarray  # (n, R, 2)
    features: list[list[str]]  # visible planted features per photo
    pixels: list[list[np.ndarray]]  # (k, 2) x, y of each feature's mask pixels
    feature_union: list[np.ndarray]  # bool (H, W): any visible feature


def _region_geometry(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres and (sx, sy) spreads of :data:`REGION_PRIOR`'s regions from 68 iBUG landmarks (photo pixels).

    Landmark groups as in :func:`gestalt_xai.faces.regions.landmark_atlas`: jaw 0–16, brows 17–21 / 22–26, nose
    27–35, eyes 36–41 / 42–47, lips 48–67; "left" is image left. The forehead sits one inter-ocular distance above the
    brows and the ears beside the jaw at the level of the eyes and nose — outside the aligned 112² crop mostly.
    """
    io = float(np.linalg.norm(p[36:42].mean(0) - p[42:48].mean(0)))
    brows = p[17:27].mean(0)
    out_l = p[1] - p[15]
    out_l = out_l / max(np.linalg.norm(out_l), 1e-9)
    geometry = {
        "periorbital_left": (p[36:42].mean(0), (0.22, 0.12)), "periorbital_right": (p[42:48].mean(0), (0.22, 0.12)),
        "brow_left": (p[17:22].mean(0), (0.22, 0.07)), "brow_right": (p[22:27].mean(0), (0.22, 0.07)),
        "nasal_bridge": (p[27:30].mean(0), (0.08, 0.15)), "nose": (p[30:36].mean(0), (0.16, 0.09)),
        "philtrum": ((p[33] + p[51]) / 2, (0.07, 0.05)), "mouth": (p[48:60].mean(0), (0.26, 0.09)),
        "chin": ((p[7:10].mean(0) + p[57]) / 2, (0.2, 0.08)),
        "cheek_left": (p[[2, 3, 31, 41]].mean(0), (0.14, 0.14)),
        "cheek_right": (p[[13, 14, 35, 46]].mean(0), (0.14, 0.14)),
        "forehead": (brows - np.array([0.0, 1.0 * io]), (0.35, 0.2)),
        "ear_left": ((p[1] + p[2]) / 2 + 0.3 * io * out_l, (0.08, 0.2)),
        "ear_right": ((p[15] + p[14]) / 2 - 0.3 * io * out_l, (0.08, 0.2)),
    }
    centre = np.array([geometry[r][0] for r in _REGIONS], np.float64)
    spread = np.array([geometry[r][1] for r in _REGIONS], np.float64) * io
    return centre, spread


def _select_images(run: Run, table: pd.DataFrame, truth: TruthTables, cfg: SimulationConfig) -> pd.DataFrame:
    if cfg.images is not None:
        ids = [str(i) for i in cfg.images]
        missing = sorted(set(ids) - set(table["image_id"]))
        if missing:
            raise InputError(f"simulate: images {missing[:5]} are not in {run.path}'s cohort")
        if len(set(ids)) != len(ids):
            raise ConfigError("simulate: images lists an image twice")
        return table.set_index("image_id").loc[ids].reset_index()
    controls = set(truth.images.loc[truth.images["is_control"].astype(bool), "image_id"].astype(str))
    pool = table[~table["undiagnosed"] & table["aligned"]]
    pool = pool[pool["test"]] if pool["test"].any() else pool
    if not cfg.include_controls:
        pool = pool[~pool["image_id"].isin(controls)]
    if pool.empty:
        raise InputError(f"simulate: no aligned, diagnosed photos to show in {run.path}")
    rng = np.random.default_rng([cfg.seed, 1])
    picked = []
    for _, group in pool.groupby("syndrome_id", sort=True):
        ids = sorted(group["image_id"])
        picked += [ids[i] for i in sorted(rng.permutation(len(ids))[: cfg.images_per_syndrome])]
    return table.set_index("image_id").loc[picked].reset_index()


def _photos(truth: TruthTables, shown: pd.DataFrame, cfg: SimulationConfig) -> _Photos:
    rows = truth.images.assign(image_id=truth.images["image_id"].astype(str)).set_index("image_id")
    feats = truth.features.assign(image_id=truth.features["image_id"].astype(str))
    ids = list(shown["image_id"])
    unknown = sorted(set(ids) - set(rows.index))
    if unknown:
        raise InputError(f"simulate: images {unknown[:5]} have no truth rows in {truth.root} (not a synthetic cohort?)")
    size = rows.loc[ids, ["width", "height"]].to_numpy(np.float64)
    side = size.max(1)
    box = np.column_stack([(size[:, 0] - side) / 2, (size[:, 1] - side) / 2, side])
    ppd = cfg.screen_px_per_degree() * side / cfg.stimulus_px
    geo = [_region_geometry(np.asarray(rows.loc[i, "landmarks68"], np.float64).reshape(68, 2)) for i in ids]
    features, pixels, union = [], [], []
    for i in ids:
        masks = load_masks(truth.root.parent, i, feats)
        visible = [f for f in sorted(feats.loc[(feats["image_id"] == i) & feats["visible_in_crop"].astype(bool),
                                                "feature"]) if masks[f].any()]
        features.append(visible)
        pixels.append([np.argwhere(masks[f])[:, ::-1].astype(np.float64) for f in visible])
        union.append(np.logical_or.reduce([masks[f] for f in visible] + [np.zeros_like(masks["face"])]))
    return _Photos(ids, list(rows.loc[ids, "syndrome_id"].astype(str)), box, ppd,
                   np.stack([g[0] for g in geo]), np.stack([g[1] for g in geo]), features, pixels, union)


# --------------------------------------------------------------------------------------------- observers and draws
@dataclass
class _Observers:
    ids: list[str]
    group: list[str]
    fmt: list[str]  # "eyelink_asc" | "tobii_tsv"
    eye: list[str]
    weights: np.ndarray  # (n, R) region weights
    offset: np.ndarray  # (n, 2) degrees
    spread: np.ndarray  # (n,)
    rate: np.ndarray  # (n,)
    duration: np.ndarray  # (n,) factor of the gamma part
    share: np.ndarray  # (n,) feature share
    pupil: np.ndarray  # (n,) mean pupil area (EyeLink units)
    years: np.ndarray  # (n,)


def _observers(cfg: SimulationConfig, rng: np.random.Generator) -> _Observers:
    labels = [g for g, n in cfg.observers.items() for _ in range(n)]
    n = len(labels)
    group = [labels[i] for i in rng.permutation(n)]
    ids = [f"sim{k + 1:02d}" for k in range(n)]
    # half of each group (the first, third, … in id order) recorded with EyeLink, the other half with Tobii
    fmt = ["eyelink_asc" if group[:k].count(g) % 2 == 0 else "tobii_tsv" for k, g in enumerate(group)]
    prior = np.array([REGION_PRIOR[r] for r in _REGIONS])
    weights = rng.dirichlet(cfg.habit_concentration * prior / prior.sum(), size=n)
    offset = rng.normal(0.0, cfg.centre_offset_deg, (n, 2))
    spread = np.exp(rng.normal(0.0, 0.2, n))
    rate = cfg.fixations_per_trial * np.exp(rng.normal(0.0, 0.2, n))
    duration = np.exp(rng.normal(0.0, 0.15, n))
    phi = cfg.expert_feature_share
    # drawn for every value of phi, so that the other habits do not depend on it
    beta = rng.beta(min(max(phi, 0.01), 0.99) * 20, min(max(1 - phi, 0.01), 0.99) * 20, n)
    share = np.where(np.array(group) == "expert", beta if 0 < phi < 1 else phi, 0.0)
    right = rng.random(n) < 0.8
    eye = [("R" if r else "L") if f == "eyelink_asc" else "B" for r, f in zip(right, fmt, strict=True)]
    pupil = rng.normal(1100, 150, n).clip(500)
    years = np.where(np.array(group) == "expert", rng.integers(2, 31, n), 0)
    return _Observers(ids, group, fmt, eye, weights, offset, spread, rate, duration, share, pupil, years)


def _draw_fixations(photos: _Photos, obs: _Observers, cfg: SimulationConfig,
                    rng: np.random.Generator) -> pd.DataFrame:
    """Every fixation of every trial in photo pixels, with its drawn duration and the saccade after it (ms)."""
    n_obs, n_img = len(obs.ids), len(photos.ids)
    order = np.stack([rng.permutation(n_img) for _ in range(n_obs)])  # (obs, presentation) → photo
    t_obs, t_img = np.repeat(np.arange(n_obs), n_img), order.ravel()
    n_fix = np.maximum(2, 1 + rng.poisson(np.maximum(obs.rate[t_obs] - 1, 0.0)))
    o, i = np.repeat(t_obs, n_fix), np.repeat(t_img, n_fix)
    trial = np.repeat(np.arange(len(t_obs)), n_fix)
    k = np.arange(len(o)) - np.repeat(np.cumsum(n_fix) - n_fix, n_fix)
    u_kind, u_region, u_feat, u_pix = (rng.random(len(o)) for _ in range(4))
    z_region, z_noise = rng.normal(size=(len(o), 2)), rng.normal(size=(len(o), 2))

    n_feat = np.array([len(f) for f in photos.features])
    centre_first = (k == 0) & cfg.first_fixation_at_centre
    is_feature = ~centre_first & (u_kind < obs.share[o]) & (n_feat[i] > 0)
    region = np.minimum((u_region[:, None] > np.cumsum(obs.weights, 1)[o]).sum(1), len(_REGIONS) - 1)
    xy = photos.centre[i, region] + photos.spread[i, region] * z_region * obs.spread[o, None]
    target = np.array(_REGIONS, dtype=object)[region]
    # feature fixations: a feature drawn uniformly among the photo's visible ones, a pixel uniformly in its mask
    for idx in np.flatnonzero(is_feature):
        f = int(u_feat[idx] * n_feat[i[idx]])
        pix = photos.pixels[i[idx]][f]
        xy[idx] = pix[int(u_pix[idx] * len(pix))]
        target[idx] = photos.features[i[idx]][f]
    box = photos.box[i]
    xy[centre_first] = box[centre_first, :2] + box[centre_first, 2:3] / 2
    target[centre_first] = "centre"
    xy = xy + (obs.offset[o] + z_noise * cfg.spatial_noise_deg) * photos.ppd[i, None]

    dur = np.rint(cfg.duration_min_ms + obs.duration[o] * rng.gamma(
        cfg.duration_shape, (cfg.duration_mean_ms - cfg.duration_min_ms) / cfg.duration_shape, len(o)))
    amp = np.zeros(len(o))
    nxt = np.r_[trial[1:] == trial[:-1], False]  # a saccade follows (same trial)
    amp[nxt] = np.linalg.norm(np.diff(xy, axis=0), axis=1)[nxt[:-1]] / photos.ppd[i[nxt]]
    pupil = np.rint(obs.pupil[o] * np.exp(rng.normal(0.0, 0.05, len(o)))).astype(int)
    kinds = np.where(centre_first, "centre", np.where(is_feature, "feature", "region"))
    return pd.DataFrame({"obs": o, "presentation": np.tile(np.arange(n_img), n_obs)[trial], "img": i,
                         "trial_row": trial, "fixation": k, "x": xy[:, 0], "y": xy[:, 1], "dur": dur.astype(int),
                         "saccade_deg": amp, "saccade_ms": np.where(nxt, np.rint(21 + 2.2 * amp), 0).astype(int),
                         "pupil": pupil, "target_kind": kinds, "target": target.astype(str)})


def _on_features(fix: pd.DataFrame, photos: _Photos) -> np.ndarray:
    """Whether each fixation lies inside a visible planted feature's mask of its photo."""
    out = np.zeros(len(fix), bool)
    x, y, img = np.rint(fix["x"]).astype(int).to_numpy(), np.rint(fix["y"]).astype(int).to_numpy(), fix["img"]
    for i, mask in enumerate(photos.feature_union):
        at = np.flatnonzero((img == i).to_numpy() & (x >= 0) & (y >= 0) & (x < mask.shape[1]) & (y < mask.shape[0]))
        out[at] = mask[y[at], x[at]]
    return out


def _answers(fix: pd.DataFrame, photos: _Photos, obs: _Observers, choices: list[str], cfg: SimulationConfig,
             rng: np.random.Generator) -> pd.DataFrame:
    share = fix.assign(hit=_on_features(fix, photos)).groupby("trial_row", sort=True).agg(
        obs=("obs", "first"), img=("img", "first"), presentation=("presentation", "first"), f=("hit", "mean"))
    group = np.array(obs.group)[share["obs"]]
    f_mean = share.groupby(group)["f"].transform("mean").to_numpy()
    acc = np.array([cfg.accuracy[g] for g in group])
    logit = np.log(acc / (1 - acc)) + cfg.answer_feature_gain * (share["f"].to_numpy() - f_mean)
    right = rng.random(len(share)) < 1 / (1 + np.exp(-logit))
    wrong = rng.integers(0, max(len(choices) - 1, 1), len(share))
    others = [[c for c in choices if c != photos.syndromes[img]] for img in share["img"]]
    answer = [photos.syndromes[img] if r or not other else other[w % len(other)]
              for r, w, img, other in zip(right, wrong, share["img"], others, strict=True)]
    return pd.DataFrame({"participant": np.array(obs.ids)[share["obs"]],
                         "trial": (share["presentation"] + 1).astype(str).to_numpy(),
                         "image_id": [photos.ids[j] for j in share["img"]],
                         "stimulus": [_stimulus(photos.ids[j]) for j in share["img"]],
                         "answer": answer, "simulated": True})


def _stimulus(image_id: str) -> str:
    return f"{image_id}.png"


# ------------------------------------------------------------------------------------------------------- writers
def _screen_placement(cfg: SimulationConfig) -> tuple[int, int, float, float]:
    """``!V IMGLOAD CENTER`` centre (xc, yc) and the stimulus's top-left corner on screen."""
    xc, yc = cfg.screen_width_px // 2, cfg.screen_height_px // 2
    return xc, yc, xc - cfg.stimulus_px / 2, yc - cfg.stimulus_px / 2


def _screen_xy(fix: pd.DataFrame, photos: _Photos, cfg: SimulationConfig) -> np.ndarray:
    """Photo pixels → screen pixels through the stimulus box and its placement."""
    box = photos.box[fix["img"].to_numpy()]
    _, _, left, top = _screen_placement(cfg)
    scale = cfg.stimulus_px / box[:, 2]
    return np.column_stack([left + (fix["x"].to_numpy() - box[:, 0]) * scale,
                            top + (fix["y"].to_numpy() - box[:, 1]) * scale])


def _within_trial_start(n: np.ndarray, gap: np.ndarray, trial_row: np.ndarray) -> np.ndarray:
    """Start of each fixation from its trial's start, given its length ``n`` and the gap after it (same unit)."""
    step = n + gap
    total = np.cumsum(step) - step
    first = pd.Series(total).groupby(trial_row).transform("first").to_numpy()
    return total - first


def _write_asc(path: Path, p: int, fix: pd.DataFrame, photos: _Photos, obs: _Observers, cfg: SimulationConfig,
               gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One participant's events-only ASC file; returns each fixation's start (ms from the trial's onset) and the
    1-based line of its EFIX (``fix`` order)."""
    eye = obs.eye[p]
    side = "RIGHT" if eye == "R" else "LEFT"
    xc, yc, _, _ = _screen_placement(cfg)
    ppd = cfg.screen_px_per_degree()
    scr = _screen_xy(fix, photos, cfg)
    start = _within_trial_start(fix["dur"].to_numpy(), fix["saccade_ms"].to_numpy(), fix["trial_row"].to_numpy())
    lines = [f"** {SIMULATED_NOTE} (seed {cfg.seed}), in the layout EDF2ASC writes for an events-only ASC file",
             "** DATE: none (simulated)", "** TYPE: EDF_FILE BINARY EVENT TAGGED", "** VERSION: EYELINK II 1",
             "** SOURCE: EYELINK CL", "** RECORDED BY gestalt-xai simulate", "**", ""]
    clock = 1_000_000 + 100_000 * p
    lines += [f"MSG\t{clock} DISPLAY_COORDS 0 0 {cfg.screen_width_px - 1} {cfg.screen_height_px - 1}",
              f"MSG\t{clock} RETRACE_INTERVAL  16.667", f"MSG\t{clock} SIMULATED"]
    clock += 1000
    efix_line = np.zeros(len(fix), int)
    for j, (presentation, rows) in enumerate(fix.groupby("presentation", sort=True)):
        image_id = photos.ids[int(rows["img"].iloc[0])]
        at = fix.index.get_indexer(rows.index)
        onset = clock
        lines += [f"MSG\t{onset} TRIALID {presentation + 1}", f"START\t{onset} \t{side}\tEVENTS", "PRESCALER\t1",
                  "VPRESCALER\t1", "PUPIL\tAREA", f"EVENTS\tGAZE\t{side}\tRATE\t1000.00\tTRACKING\tCR\tFILTER\t2",
                  f"MSG\t{onset} !V IMGLOAD CENTER images/{_stimulus(image_id)} {xc} {yc} "
                  f"{cfg.stimulus_px} {cfg.stimulus_px}",
                  f"MSG\t{onset} !MODE RECORD CR 1000 2 1 {eye}"]
        for n, a in enumerate(at):
            s = onset + int(start[a])
            d = int(fix["dur"].iat[a])
            e = s + d - 1
            x, y = scr[a]
            lines += [f"SFIX {eye}   {s}", f"EFIX {eye}   {s}\t{e}\t{d}\t{x:7.1f}\t{y:7.1f}\t{fix['pupil'].iat[a]:7d}"]
            efix_line[a] = len(lines)
            if n + 1 < len(at):
                g = int(fix["saccade_ms"].iat[a])
                amp = float(fix["saccade_deg"].iat[a])
                x2, y2 = scr[at[n + 1]]
                lines += [f"SSACC {eye}  {e + 1}",
                          f"ESACC {eye}  {e + 1}\t{e + g}\t{g}\t{x:7.1f}\t{y:7.1f}\t{x2:7.1f}\t{y2:7.1f}\t"
                          f"{amp:6.2f}\t{round(500 * (1 - math.exp(-amp / 14))):7d}"]
            else:
                end = e + 1
        lines += [f"END\t{end} \tEVENTS\tRES\t{ppd:7.2f}\t{ppd:7.2f}",
                  f"MSG\t{end + 2} !V TRIAL_VAR stimulus {_stimulus(image_id)}",
                  f"MSG\t{end + 3} TRIAL_RESULT 0"]
        clock = end + int(gaps[j])
    atomic_write_text(path, "\n".join(lines) + "\n")
    return start, efix_line


def _tobii_rows(fix: pd.DataFrame, photos: _Photos, obs: _Observers, cfg: SimulationConfig,
                rng: np.random.Generator, gaps: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pro Lab rows (one per gaze sample) for the Tobii observers, and per fixation its written start, duration and
    first line; ``fix`` holds only those observers' fixations, sorted by participant and time."""
    period = 1000.0 / cfg.recording_hz
    n_fix = np.maximum(2, np.rint(fix["dur"].to_numpy() / period)).astype(int)
    follows = fix["saccade_ms"].to_numpy() > 0
    n_sac = np.where(follows, np.maximum(1, np.rint(fix["saccade_ms"].to_numpy() / period)), 0).astype(int)
    trial_row = fix["trial_row"].to_numpy()
    start = _within_trial_start(n_fix, n_sac, trial_row)  # samples from the trial's first sample
    # each trial's first sample on the recording's sample clock: trials follow each other with a gap
    trials = fix.groupby("trial_row", sort=False).agg(obs=("obs", "first"))
    length = pd.Series(n_fix + n_sac).groupby(trial_row, sort=False).sum().to_numpy()
    step = length + np.rint(gaps[: len(length)] / period).astype(int)
    onset = np.cumsum(step) - step
    onset -= pd.Series(onset).groupby(trials["obs"].to_numpy()).transform("first").to_numpy()
    t_onset = pd.Series(onset, index=trials.index).reindex(trial_row).to_numpy()
    k0 = t_onset + start  # each fixation's first sample

    def stamp(k: np.ndarray) -> np.ndarray:
        return np.rint(k * period).astype(np.int64)

    written = pd.DataFrame({"start_ms": (stamp(k0) - stamp(t_onset)).astype(float),
                            "duration_ms": (stamp(k0 + n_fix) - stamp(k0)).astype(float)}, index=fix.index)
    # samples: each fixation's samples, then its saccade's
    scr = _screen_xy(fix, photos, cfg)
    nxt = np.r_[scr[1:], scr[-1:]]
    ev_n = np.column_stack([n_fix, n_sac]).ravel()
    ev_fix = np.tile([True, False], len(fix))
    ev_of = np.repeat(np.arange(len(fix)), 2)
    keep = ev_n > 0
    ev_n, ev_fix, ev_of = ev_n[keep], ev_fix[keep], ev_of[keep]
    s_of = np.repeat(ev_of, ev_n)
    s_fix = np.repeat(ev_fix, ev_n)
    s_pos = np.arange(len(s_of)) - np.repeat(np.cumsum(ev_n) - ev_n, ev_n)  # sample within its event
    k = np.where(s_fix, k0[s_of] + s_pos, k0[s_of] + n_fix[s_of] + s_pos)
    frac = np.where(s_fix, 0.0, (s_pos + 1) / (n_sac[s_of] + 1))[:, None]
    jitter = rng.normal(0.0, 0.1 * cfg.screen_px_per_degree(), (len(s_of), 2)) * s_fix[:, None]
    gaze = np.rint(scr[s_of] * (1 - frac) + nxt[s_of] * frac + jitter).astype(np.int64)
    participant = np.array(obs.ids)[fix["obs"].to_numpy()]
    # Pro Lab numbers fixations and saccades separately, 1, 2, … per recording
    fix_index = fix.groupby("obs").cumcount().to_numpy() + 1
    sac_index = pd.Series(follows.astype(int)).groupby(fix["obs"].to_numpy()).cumsum().to_numpy()
    stim = photos.box[fix["img"].to_numpy()]
    mcs = np.column_stack([(fix["x"].to_numpy() - stim[:, 0]) / stim[:, 2], (fix["y"].to_numpy() - stim[:, 1])
                           / stim[:, 2]])
    mcs_txt = np.char.mod("%.4f", mcs)
    if cfg.tobii_decimal_comma:
        mcs_txt = np.char.replace(mcs_txt, ".", ",")
    sac_ms = stamp(k0 + n_fix + n_sac) - stamp(k0 + n_fix)
    rows = pd.DataFrame({
        "Recording timestamp": stamp(k),
        "Participant name": participant[s_of],
        "Recording name": "SIMULATED",
        "Gaze point X": gaze[:, 0], "Gaze point Y": gaze[:, 1],
        "Presented Stimulus name": np.array([_stimulus(photos.ids[j]) for j in fix["img"]])[s_of],
        "Eye movement type": np.where(s_fix, "Fixation", "Saccade"),
        "Gaze event duration": np.where(s_fix, written["duration_ms"].to_numpy().astype(int)[s_of], sac_ms[s_of]),
        "Eye movement type index": np.where(s_fix, fix_index[s_of], sac_index[s_of]),
        "Fixation point X (MCSnorm)": np.where(s_fix, mcs_txt[s_of, 0], ""),
        "Fixation point Y (MCSnorm)": np.where(s_fix, mcs_txt[s_of, 1], ""),
    }, columns=_TOBII_COLUMNS)
    first_row = np.full(len(fix), -1)
    first_row[ev_of[ev_fix]] = (np.cumsum(ev_n) - ev_n)[ev_fix]
    written["line"] = first_row + 2  # the header is line 1
    return rows, written


# ------------------------------------------------------------------------------------------------------ the study
def simulate_study(run: Run | str | Path, out_dir: str | Path, cfg: SimulationConfig | None = None) -> dict[str, Path]:
    """Simulate observers viewing photos of a synthetic-cohort run and write the study folder ``out_dir``.

    Parameters
    ----------
    run:
        A run with a synthetic cohort (``cohort/truth``) and its alignment (only read).
    out_dir:
        Folder of the simulated study (created; files in it are overwritten).
    cfg:
        The simulation's options (defaults: :class:`SimulationConfig`).

    Returns
    -------
    dict
        ``stimuli``, ``display``, ``participants``, ``answers``, ``truth`` (``truth.parquet``), ``tobii_tsv`` (when an
        observer was recorded with Tobii) and ``eyelink_asc:<participant>`` per ASC file.
    """
    cfg = cfg or SimulationConfig()
    run = run if isinstance(run, Run) else Run(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    truth_tables = load_truth(run.path)
    table = run.image_table()
    table = table.assign(image_id=table["image_id"].astype(str), syndrome_id=table["syndrome_id"].astype(str))
    photos = _photos(truth_tables, _select_images(run, table, truth_tables, cfg), cfg)
    obs = _observers(cfg, rng)
    fix = _draw_fixations(photos, obs, cfg, rng)
    choices = sorted(set(table.loc[~table["undiagnosed"], "syndrome_id"].astype(str)))
    answers = _answers(fix, photos, obs, choices, cfg, rng)
    gaps = rng.integers(1500, 3500, len(answers))  # ms between trials (answer, drift check)
    n_img = len(photos.ids)

    paths: dict[str, Path] = {}
    fix = fix.assign(start_ms=np.nan, duration_ms=fix["dur"].astype(float), line=0, source="")
    for p, pid in enumerate(obs.ids):
        if obs.fmt[p] != "eyelink_asc":
            continue
        mine = fix["obs"] == p
        path = out / f"{pid}.asc"
        start, line = _write_asc(path, p, fix[mine], photos, obs, cfg, gaps[p * n_img:(p + 1) * n_img])
        fix.loc[mine, "start_ms"], fix.loc[mine, "line"], fix.loc[mine, "source"] = start, line, path.name
        paths[f"eyelink_asc:{pid}"] = path
    tobii = fix["obs"].map(lambda p: obs.fmt[p] == "tobii_tsv").to_numpy(bool)
    if tobii.any():
        t_gaps = np.concatenate([gaps[p * n_img:(p + 1) * n_img] for p in range(len(obs.ids))
                                 if obs.fmt[p] == "tobii_tsv"])
        rows, written = _tobii_rows(fix[tobii], photos, obs, cfg, rng, t_gaps)
        path = out / _TOBII_FILE
        atomic_write_text(path, rows.to_csv(sep="\t", index=False, lineterminator="\n"))
        fix.loc[tobii, ["start_ms", "duration_ms", "line"]] = written[["start_ms", "duration_ms", "line"]]
        fix.loc[tobii, "source"] = path.name
        paths["tobii_tsv"] = path

    truth = pd.DataFrame({
        "participant": np.array(obs.ids)[fix["obs"]], "trial": (fix["presentation"] + 1).astype(str),
        "stimulus": [_stimulus(photos.ids[j]) for j in fix["img"]], "image_id": [photos.ids[j] for j in fix["img"]],
        "fixation": fix["fixation"].astype("int64"), "start_ms": fix["start_ms"].astype(float),
        "duration_ms": fix["duration_ms"].astype(float), "x": fix["x"], "y": fix["y"],
        "photo_px_per_degree": photos.ppd[fix["img"]], "eye": np.array(obs.eye)[fix["obs"]],
        "format": np.array(obs.fmt)[fix["obs"]], "source": fix["source"].astype(str),
        "line": fix["line"].astype("int64"), "group": np.array(obs.group)[fix["obs"]],
        "target_kind": fix["target_kind"], "target": fix["target"]}, columns=TRUTH_COLUMNS)  # in time order
    write_parquet(truth, out / "truth.parquet")
    paths["truth"] = out / "truth.parquet"

    xc, yc, left, top = _screen_placement(cfg)
    stimuli = pd.DataFrame({"stimulus": [_stimulus(i) for i in photos.ids], "image_id": photos.ids,
                            "width": cfg.stimulus_px, "height": cfg.stimulus_px, "crop_left": photos.box[:, 0],
                            "crop_top": photos.box[:, 1], "crop_width": photos.box[:, 2],
                            "crop_height": photos.box[:, 2]})
    geometry = ("screen_width_px", "screen_height_px", "screen_width_mm", "screen_height_mm", "viewing_distance_mm")
    display = pd.DataFrame([{"participant": "*", **{k: getattr(cfg, k) for k in geometry}, "image_left_px": left,
                             "image_top_px": top, "image_width_px": cfg.stimulus_px,
                             "image_height_px": cfg.stimulus_px}])
    specialty = {"expert": "clinical genetics", "non_clinician": "none"}
    participants = pd.DataFrame({"participant": obs.ids, "group": obs.group,
                                 "specialty": [specialty.get(g, "") for g in obs.group], "years": obs.years,
                                 "simulated": True})
    for name, frame in (("stimuli", stimuli), ("display", display), ("participants", participants),
                        ("answers", answers)):
        atomic_write_text(out / f"{name}.csv", frame.to_csv(index=False, lineterminator="\n"))
        paths[name] = out / f"{name}.csv"
    log.info("simulated study: %d observers × %d photos, %d fixations (%s)", len(obs.ids), n_img, len(truth), out)
    return dict(sorted(paths.items()))
