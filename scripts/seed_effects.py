"""Seed-to-seed noise of the feature effects: does the demo model use its planted features more than chance would?

Trains the demo run's model again with other seeds (same options, same data) in a scratch run that links the demo
run's ``cohort/`` and ``aligned/`` (the demo run itself is not written), embeds the test photos with every seed's
model, and measures each feature's effect ``Δ = s(photo) − s(photo without the feature)`` on the own-syndrome
centroid score through :func:`gestalt_xai.attribution.effects.measure_effects` — the same function and targets the
explain stage uses — and the mark's Clever-Hans effect (:func:`~gestalt_xai.attribution.effects.measure_mark_effects`).

Per group of (photo, feature) pairs:

* **trained syndromes, in-crop features**: the effects the demo model should show;
* **untrained syndromes, features no trained syndrome has** (expected null): the model never learned them;
* **out-of-crop features whose change misses the crop** (negative controls): Δ = 0 exactly by construction.

it prints the demo model's mean Δ, the seed-to-seed noise (the pooled standard deviation over seeds of each pair's
Δ) and the share of pairs whose demo-model Δ exceeds twice that noise. The table is written to
``<work>/seed_effects.parquet`` and ``<work>/seed_effects.md`` (``scripts/readme_results.py`` copies it into the
README).

Usage: python scripts/seed_effects.py [--run runs/demo] [--seeds 1 2] [--work runs/demo-seeds]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from gestalt_xai.attribution.effects import measure_effects, measure_mark_effects
from gestalt_xai.attribution.explain import ExplainConfig
from gestalt_xai.data.synthetic.truth import load_truth
from gestalt_xai.models.embed import EmbedConfig, embed_stage
from gestalt_xai.models.train import TrainConfig, train_stage
from gestalt_xai.runs import Run

log = logging.getLogger("seed_effects")

GROUPS = {
    "trained": "trained syndromes, in-crop features",
    "untrained": "untrained syndromes, features of no trained syndrome (expected null)",
    "outside": "features whose change misses the crop (negative controls)",
}


def _link(work: Path, run: Path, name: str) -> None:
    link = work / name
    if not link.exists():
        link.symlink_to((run / name).resolve(), target_is_directory=True)


def _feature_groups(run: Run, effects: pd.DataFrame, trained_classes: set[str]) -> pd.DataFrame:
    """Effect rows of single-feature removals with their group (module docstring)."""
    truth = load_truth(run.path)
    true_syndrome = truth.images.set_index("image_id")["syndrome_id"].astype(str)
    syndromes = {s["syndrome_id"]: {f["feature"] for f in s["features"]} for s in truth.syndromes["syndromes"]}
    trained_features = set().union(*(syndromes.get(s, set()) for s in trained_classes))
    cf = run.counterfactuals()[["image_id", "variant", "change_px_crop"]]
    rows = effects[effects["variant"].str.startswith("without_")
                   & ~effects["variant"].isin(["without_mark", "without_all_features"])]
    rows = rows.merge(cf, on=["image_id", "variant"], how="left")
    rows["syndrome"] = rows["image_id"].map(true_syndrome)
    in_crop = rows["change_px_crop"].fillna(0) > 0
    trained = rows["syndrome"].isin(trained_classes)
    rows["group"] = np.select(
        [~in_crop, trained, ~trained & ~rows["feature"].isin(trained_features)], ["outside", "trained", "untrained"],
        default="")
    return rows[rows["group"] != ""]


def summarise(pairs: pd.DataFrame, demo_model: str) -> pd.DataFrame:
    """Per group: pairs, the demo model's mean Δ, the pooled seed-to-seed SD and the share of pairs above 2 SD."""
    wide = pairs.pivot_table(index=["group", "image_id", "feature"], columns="model_id", values="delta")
    out = []
    for group, w in wide.groupby(level="group", sort=False):
        w = w.dropna()
        if not len(w):
            continue
        noise = float(np.sqrt(np.mean(w.var(axis=1, ddof=1))))
        demo = w[demo_model]
        out.append({"group": group, "what": GROUPS[group], "pairs": len(w), "features": w.index.get_level_values(
            "feature").nunique(), "mean_delta": float(demo.mean()), "mean_delta_all_seeds": float(w.to_numpy().mean()),
            "seed_sd": noise, "share_above_2sd": float((demo > 2 * noise).mean()),
            "share_positive_every_seed": float((w > 0).all(axis=1).mean())})
    return pd.DataFrame(out)


def markdown(summary: pd.DataFrame, marks: pd.DataFrame, seeds: list[int]) -> str:
    names = ", ".join(map(str, seeds))
    lines = [f"Feature effects of the demo model (seed 0) beside {len(seeds)} retrained seeds ({names}; "
             "`python scripts/seed_effects.py`): Δ = centroid score of the test photo minus that of the same photo "
             "with one planted feature removed; seed SD = pooled standard deviation of a pair's Δ over the "
             f"{len(seeds) + 1} models.", "",
             "| photos × features | pairs | mean Δ (demo model) | mean Δ (all seeds) | seed SD | Δ > 2 seed SD | "
             "Δ > 0 for every seed |", "|---|---|---|---|---|---|---|"]
    for r in summary.to_dict("records"):
        lines.append(f"| {r['what']} | {r['pairs']} | {r['mean_delta']:+.3f} | {r['mean_delta_all_seeds']:+.3f} | "
                     f"{r['seed_sd']:.3f} | {r['share_above_2sd']:.0%} | {r['share_positive_every_seed']:.0%} |")
    if len(marks):
        lines += ["", "The mark's Clever-Hans effect per model (test set): share of marked photos whose score drops "
                  "when it is removed / of other photos whose score rises when it is added.", "",
                  "| model | removed: drops | added: rises |", "|---|---|---|"]
        for model, g in marks.groupby("model_id", sort=True):
            cells = {}
            for r in g.to_dict("records"):
                cells[r["change"]] = f"{r['n_expected']}/{r['n']} ({r['share']:.0%}, mean Δ {r['mean_delta']:+.3f})"
            lines.append(f"| {model} | {cells.get('remove', '–')} | {cells.get('add', '–')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--work", type=Path, default=None, help="scratch run (default: <run>-seeds)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("GESTALT_XAI_QUIET", "1")
    run = Run(args.run)
    work_dir = args.work or args.run.with_name(args.run.name + "-seeds")
    work_dir.mkdir(parents=True, exist_ok=True)
    for name in ("cohort", "aligned"):
        _link(work_dir, args.run, name)
    work = Run(work_dir)
    manifest = json.loads((args.run / "manifest.json").read_text())
    train_cfg = manifest["stages"]["train"]["config"]
    demo = TrainConfig(**train_cfg)
    demo_id = demo.resolved_model_id()
    demo_path = run.path / "models" / f"{demo_id}.safetensors"
    models = [{"path": str(demo_path.resolve()), "id": demo_id}]
    for seed in args.seeds:
        cfg = TrainConfig(**{**train_cfg, "seed": seed, "model_id": f"{demo_id}_seed{seed}"})
        out = train_stage(work, cfg).outputs["model"]
        models.append({"path": str(Path(out).resolve()), "id": cfg.model_id})
    embed_stage(work, EmbedConfig(models=models, tta=False))
    explain = ExplainConfig(methods=["saliency"], target="centroid", syndromes="label", images="test", models=models)
    effects = measure_effects(work, explain)
    trained = set(json.loads((run.path / "models" / f"{demo_id}.json").read_text())["syndrome_ids"])
    pairs = _feature_groups(work, effects, trained)
    summary = summarise(pairs, demo_id)
    from gestalt_xai.assess.localisation import mark_effects
    from gestalt_xai.assess.planted import confounded_syndrome

    marks = measure_mark_effects(work, explain.model_copy(update={"images": "all"}))
    confounded = confounded_syndrome(load_truth(work.path))
    mark_table, _ = mark_effects(marks, work.image_table(), confounded, report_sets=("test",))
    mark_table = mark_table[mark_table["set"] == "test"] if len(mark_table) else mark_table
    pairs.to_parquet(work_dir / "seed_effects_pairs.parquet", index=False)
    summary.to_parquet(work_dir / "seed_effects.parquet", index=False)
    text = markdown(summary, mark_table, args.seeds)
    (work_dir / "seed_effects.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
