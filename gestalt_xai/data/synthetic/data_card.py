"""The synthetic cohort's data card (a datasheet), written from the generated cohort's own tables.

Every number in the card is computed from ``truth/`` and the GMDB files of a generated cohort; nothing is typed by
hand, so the card cannot drift from the data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from gestalt_xai.data.synthetic.truth import TruthTables, load_truth
from gestalt_xai.runs import atomic_write_text

__all__ = ["write_data_card", "data_card_text"]


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def _counterfactual_text(truth: TruthTables) -> str:
    """What counterfactual renderings the cohort holds, how many, and how small their change masks are."""
    cf = truth.counterfactuals
    if cf.empty:
        return "None in this cohort (`counterfactuals: {sets: []}`)."
    sets = ", ".join(truth.syndromes["config"].get("counterfactuals", {}).get("sets", []))
    region = truth.features.set_index(["image_id", "feature"])["mask_px"]
    rows = []
    for variant, g in cf.groupby("variant", sort=True):
        feature = g["feature"].iloc[0]
        if variant == "without_mark":
            reg = f"{np.median([truth.masks(i)['confounder'].sum() for i in g['image_id']]):.0f} (mark)"
        elif feature in ("all", "mark"):
            reg = "–"
        else:
            reg = f"{region.loc[list(zip(g['image_id'], g['feature'], strict=True))].median():.0f}"
        rows.append({"variant": variant, "photos": len(g), "median change mask (px)": f"{g['change_px'].median():.0f}",
                     "median region mask (px)": reg})
    return (f"**{len(cf)} counterfactual renderings of {cf['image_id'].nunique()} photos** (sets: {sets}) in "
            f"`counterfactuals/`, beside the cohort tables and listed in none of them: each photo again with the "
            f"identical identity, pose, light, camera, noise and JPEG draws and one change — a planted feature removed "
            f"(`without_<feature>`), all removed (`without_all_features`), the confounder mark removed "
            f"(`without_mark`) or added (`with_mark`). The change mask of a rendering is the set of pixels it "
            f"changes (more than one 8-bit level in a channel before sensor noise and JPEG): a subset of the "
            f"feature's region mask, usually much smaller. Photo pixels:\n\n{_md_table(pd.DataFrame(rows))}")


def data_card_text(run_or_cohort_dir: str | Path) -> str:
    """The data card of a generated synthetic cohort, as Markdown."""
    truth = load_truth(run_or_cohort_dir)
    cfg = truth.syndromes["config"]
    ctrl = truth.syndromes["control_id"]
    img, feat, cat = truth.images, truth.features, truth.catalogue
    n_img, n_subj = len(img), img["subject_id"].nunique()
    syn_rows = []
    per_subj = img.groupby("syndrome_id")["subject_id"].nunique()
    per_img = img.groupby("syndrome_id").size()
    for s in truth.syndromes["syndromes"]:
        sid = s["syndrome_id"]
        n_s = int(per_subj.get(sid, 0))
        fs = ", ".join(f"{f['feature']} ({f['effect']:.2f}±{f['sd']:.2f}, p={f['penetrance']:.2f})"
                       for f in s["features"])
        syn_rows.append({"syndrome": sid, "subjects": n_s, "photos": int(per_img.get(sid, 0)),
                         "class": "frequent" if n_s > 6 else "rare", "features (mean effect ± sd, penetrance)": fs})
    if ctrl in per_subj.index:
        syn_rows.insert(0, {"syndrome": f"{ctrl} (controls)", "subjects": int(per_subj[ctrl]),
                            "photos": int(per_img[ctrl]), "class": "control", "features (mean effect ± sd, "
                            "penetrance)": "none"})
    syn_table = pd.DataFrame(syn_rows)
    n_freq = int((syn_table["class"] == "frequent").sum())
    n_rare = int((syn_table["class"] == "rare").sum())

    cat_rows = []
    for r in cat.itertuples(index=False):
        f = feat[feat["feature"] == r.feature]
        n_syn = sum(any(x["feature"] == r.feature for x in s["features"]) for s in truth.syndromes["syndromes"])
        cat_rows.append({"feature": r.feature, "HPO": f"{r.hpo_id} {r.hpo_name}", "region": r.region,
                         "in crop": "yes" if r.visible_in_crop else "**no (negative control)**",
                         "syndromes": n_syn, "photos": len(f),
                         "mean mask share in crop": f"{f['crop_fraction'].mean():.2f}" if len(f) else "–",
                         "change at effect 1.0": r.description})
    cat_table = pd.DataFrame(cat_rows)

    def rng_str(col: str, fmt: str = "{:.0f}") -> str:
        return f"{fmt.format(img[col].min())}–{fmt.format(img[col].max())}"

    tones = np.histogram(img["skin_tone"], bins=[0, 0.2, 0.4, 0.6, 0.8, 1.0])[0]
    conf = cfg.get("confounder")
    if conf:
        csid = conf["syndrome"]
        on = img[img["syndrome_id"] == csid]["confounder"].mean()
        off = img[img["syndrome_id"] != csid]["confounder"].mean()
        conf_text = (f"**On.** A small dark mark on the image-right cheek (inside the aligned crop) appears on "
                     f"{on:.0%} of the photos of {csid} and {off:.0%} of the other photos; its mask is bit 7 of "
                     f"each mask image. Models that rely on it are taking a shortcut (\"Clever Hans\").")
    else:
        conf_text = "Off in this cohort (`confounder: null`)."
    multi = int((img.groupby("subject_id").size() > 1).sum())
    ips = cfg["images_per_subject"]
    styles = ", ".join(f"{k} {v}" for k, v in img["hair_style"].value_counts().sort_index().items())
    hidden = img[img["undiagnosed"].astype(bool)] if "undiagnosed" in img.columns else img.iloc[:0]
    undiagnosed = []
    if len(hidden):
        truly = ", ".join(f"{s} ({n} subject{'s' if n > 1 else ''})"
                          for s, n in hidden.groupby("syndrome_id")["subject_id"].nunique().items())
        undiagnosed = [f"- **{hidden['subject_id'].nunique()} test subjects left undiagnosed** ({len(hidden)} photos; "
                       f"true syndromes: {truly}): the cohort tables give them no syndrome (label "
                       f"`unknown`, split set `undiagnosed`), so they are in no training, gallery or test set; their "
                       f"truth rows keep the syndrome (column `undiagnosed`)."]
    composition = "\n".join([
        f"- **{n_img} photos** of **{n_subj} subjects** ({multi} with more than one photo; {ips[0]}–{ips[1]} "
        f"photos each), **{len(truth.syndromes['syndromes'])} synthetic syndromes** ({n_freq} frequent with more "
        f"than 6 subjects, {n_rare} rare with 2–6, as in the GMDB frequent/rare protocol) plus unaffected "
        f"controls ({ctrl}).",
        f"- Photos: raw JPEG, {rng_str('width')} × {rng_str('height')} px, inter-pupillary distance "
        f"{rng_str('inter_pupil_px')} px, roll {rng_str('roll', '{:.1f}')}°, yaw {rng_str('yaw', '{:.1f}')}°, "
        f"JPEG quality {rng_str('jpeg_quality')}, blur σ {rng_str('blur_sigma', '{:.2f}')} px, noise σ "
        f"{rng_str('noise_sigma', '{:.1f}')} (0–255).",
        f"- Identities: skin tone along a light→dark scale (photos per fifth, light to dark: "
        f"{', '.join(map(str, tones))}), child→adult proportions (age parameter {rng_str('age', '{:.2f}')}), "
        f"hair styles {styles}.",
        *undiagnosed,
    ])
    return f"""# Data card: synthetic facial-phenotype cohort ({cfg['version']}, seed {cfg['seed']})

*Generated by `gestalt_xai.data.synthetic.data_card` from the cohort's own tables; do not edit by hand.*

## Purpose
A stand-in for patient photographs that can live on any machine: procedurally drawn faces **of no real person**
with HPO-coded facial features planted at known places. It lets gestalt-xai run its whole pipeline (align, train,
embed, match, explain, assess) on a fresh machine and in tests, and, because the location of the evidence is known
exactly, it serves as a ground-truth benchmark for explanation methods, which real data cannot provide.

## Composition
{composition}

### Class sizes
{_md_table(syn_table)}

## Phenotype catalogue
Each feature is a controlled change of the face model with an effect size (1.0 = clearly visible); a patient
expresses each of the syndrome's features with its penetrance, at an effect drawn around the syndrome's mean.
Features are shared between syndromes, so a syndrome is identified by its combination. "Mean mask share in crop"
is the share of the feature's truth mask that falls inside the 112×112 ArcFace crop cut with the true landmarks.

{_md_table(cat_table)}

## Generation process
1. Syndromes are drawn from the catalogue (1–{cfg['features_per_syndrome'][1]} features, no contradictory pair,
   distinct visible-feature sets; {cfg['negative_control_rate']:.0%} also get an out-of-crop feature).
2. Each subject gets an identity (face shape, skin/eye/hair colour, hair style, age-like proportions) drawn
   independently of the syndrome, and the phenotype it expresses.
3. Each photo gets its own pose (roll, small yaw), lighting direction, background, shirt, scale and position in the
   canvas, blur, sensor noise and JPEG quality, then is drawn with OpenCV (anti-aliased polygons at 2× resolution,
   Lambertian shading of an ellipsoidal head, skin and hair texture noise) and compressed.
4. Ground truth per photo (`truth/`): true 5-point landmarks (pupil centres, nose tip, mouth corners) and 68 iBUG
   points, a photo-space mask per planted feature (the region the feature may change: its part with and without
   the feature), the face hull, the confounder mask, and all nuisance parameters.
5. Everything is a pure function of the configuration and seed (per-photo random streams): the same seed gives
   byte-identical files.

Confounder: {conf_text}

Counterfactuals: {_counterfactual_text(truth)}

Configuration:
```json
{json.dumps(cfg, indent=2, sort_keys=True)}
```

## Measured on a run
What a model trained on this cohort does with it cannot be known when the cohort is written (synth runs before any
model exists); `python scripts/readme_results.py --run RUN` writes it here from a finished run.

<!-- post-run:start -->
(not measured yet)
<!-- post-run:end -->

## Known limitations
- Cartoon-like faces: flat layered drawing with analytic shading, no photographic realism, no expressions,
  glasses, occlusions or real hair. Models trained here learn these drawings, not human faces.
- Syndromes are sets of independent, localised features. Real syndromic faces show correlated, global and subtle
  gestalt changes, ethnic and age-dependent presentation, and variability this generator does not model.
- Proportions are a little wider and taller than average adult faces so that ears and the hairline fall mostly
  outside the aligned crop (the negative controls). Mostly, not always: in some photos (roll, yaw, a small face)
  the ear's or the hairline's change reaches the crop's border, which the counterfactuals' crop-space change masks
  record, so a test of "no relevance on a negative control" must read those masks, not assume the crop misses them.
- Skin tones, hair and eye colours span a broad range but are not calibrated to any population.
- Identity and photo conditions are drawn independently of the syndrome, but planted features change a little
  skin area (e.g. full cheeks, synophrys), so the mean face colour carries a weak trace of them: in the test suite
  a classifier on it stays within 3 standard deviations of a subject-level label-permutation null (the confounder
  option, when on, adds a strong cue by design).

## Intended uses
Testing and demonstrating the gestalt-xai pipeline; benchmarking explanation methods against known evidence
locations (localisation, faithfulness, negative controls, shortcut detection); teaching.
The faces are rendered and show no one: the image table marks every photo `consent_to_publish = true`, so reports
show gallery faces (a real cohort's photos are shown only where its own consent column says so).

## Uses it is not intended for
Any clinical or diagnostic purpose; estimating the performance of a model on real patients; drawing conclusions
about real syndromes, populations or skin tones; training models meant for real photographs.
"""


def write_data_card(run_or_cohort_dir: str | Path, path: str | Path) -> Path:
    """Write the data card of a generated cohort to ``path`` (e.g. ``data_cards/synthetic_cohort.md``).

    Parameters
    ----------
    run_or_cohort_dir:
        A run folder (with ``cohort/truth/``) or a cohort folder (with ``truth/``).
    path:
        Where to write the Markdown card.
    """
    path = Path(path)
    atomic_write_text(path, data_card_text(run_or_cohort_dir))
    return path
