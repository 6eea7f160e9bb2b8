"""Write the numbers a run produced into README.md, between ``<!-- NAME:start -->`` / ``<!-- NAME:end -->`` markers.

Sections filled (each only when its source exists):

* ``demo-results``: the demo run's stage timings (manifest), alignment success, and the matching summary in
  GM-Arc's table layout (``matching/summary.parquet``), with the chance level of the frequent test set;
* ``benchmarks``: the text the benchmark scripts wrote to ``benchmarks/results/*.txt`` (``make bench``).

The demo section also holds the change-mask localisation beside the random-model control, the mark's Clever-Hans
effect and the assess stage's summary (all from ``assess/``) and, when ``scripts/seed_effects.py`` has run, the
feature effects beside retrained seeds; the same measurements go into the ``post-run`` section of the data card
(``data_cards/synthetic_cohort.md`` and the run's ``cohort/data_card.md``), since synth runs before any model exists.

Usage: python scripts/readme_results.py [--run runs/demo] [--readme README.md] [--seeds runs/demo-seeds]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

from gestalt_xai.config import PipelineConfig
from gestalt_xai.study import plan_study


def _replace(text: str, name: str, body: str, where: Path | str = "README") -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{where} has no <!-- {name}:start --> … <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def demo_section(run: Path) -> str:
    manifest = json.loads((run / "manifest.json").read_text())
    lines = ["| stage | items | errors | seconds |", "|---|---|---|---|"]
    total = 0.0
    # pipeline order (the manifest's JSON keys are sorted): the study runner's own instance ids
    order = [step.id for step in plan_study(PipelineConfig.model_validate(manifest["study"]["config"]))] \
        if "study" in manifest else []
    names = [n for n in order if n in manifest["stages"]] + sorted(set(manifest["stages"]) - set(order))
    for name in names:
        st = manifest["stages"][name]
        secs = st.get("timing", {}).get("seconds", 0.0)
        total += secs
        lines.append(f"| {name} | {st.get('n_items', '')} | {st.get('n_errors', '')} | {secs:.1f} |")
    lines.append(f"| **total** | | | **{total:.1f}** |")
    out = [f"Run `{run}` (gestalt-xai {manifest.get('gestalt_xai_version')}, torch "
           f"{manifest['packages'].get('torch')}, {manifest.get('platform')}):", "", *lines, ""]
    meas = manifest.get("measurements_ran") or manifest.get("measurements")
    if meas:
        wall = meas["wall_seconds"]
        out += [f"`study run` measured (manifest `measurements`): {int(wall // 60)}:{int(wall % 60):02d} wall, peak "
                f"memory {meas['peak_memory_mb'] / 1024:.2f} GiB for the whole process tree (summed resident memory "
                f"of the runner and its child processes, an upper bound: pages they share count once per process; "
                f"getrusage peak of the runner alone {meas['ru_maxrss_mb']['self'] / 1024:.2f} GiB), run folder "
                f"{meas['run_folder_mb']:.0f} MiB.", ""]
    al = run / "aligned" / "alignment.parquet"
    if al.exists():
        t = pd.read_parquet(al)
        out += [f"Alignment: {int(t['ok'].sum())} of {len(t)} synthetic photos detected and aligned by MTCNN.", ""]
    summary = run / "matching" / "summary.parquet"
    if summary.exists():
        s = pd.read_parquet(summary)
        ks = [int(c[3:]) for c in s.columns if re.fullmatch(r"top\d+", c)]
        out += ["| test set | gallery | gallery images | test images | " + " | ".join(f"top-{k}" for k in ks) + " |",
                "|---|---|---|---|" + "---|" * len(ks)]
        for r in s.itertuples():
            cells = [f"{getattr(r, f'top{k}'):.1f}" for k in ks]
            out.append(f"| {r.test_set} | {r.gallery_set} | {r.n_gallery:.0f} | {r.n_test:.0f} | " + " | ".join(cells)
                       + " |")
        cohort = pd.read_parquet(run / "cohort" / "splits.parquet")
        images = pd.read_parquet(run / "cohort" / "images.parquet").set_index("image_id")
        test = cohort.loc[cohort["set"] == "frequent_test", "image_id"]
        n_classes = images.loc[images.index.intersection(test), "syndrome_id"].nunique()
        chance = f"1/{n_classes} = {100 / n_classes:.1f} %"
        out += ["", f"Macro top-k in %. Chance top-1 on the frequent test set: {chance}."]
    agg = manifest["stages"].get("aggregate", {}).get("results", {})
    hits_path = run / "assess" / "planted_hits_summary.parquet"
    if hits_path.exists():
        hits = pd.read_parquet(hits_path).to_dict("records")
        out += ["", "Syndromes whose highest-enrichment region (aggregate stage's region scores) is one of their "
                "planted features' regions (assess stage; chance = top region drawn uniformly from the face "
                "regions):", "",
                "| model | method | target | hits | share | chance |", "|---|---|---|---|---|---|"]
        for h in sorted(hits, key=lambda h: (h.get("model_id", "") in _controls(run), h["method"])):
            method = h["method"] + (f" [{h['layer']}]" if h["layer"] else "")
            out.append(f"| {_model(run, h.get('model_id', ''))} | {method} | {h['target_group']} | "
                       f"{h['n_hits']}/{h['n_syndromes']} | {h['share']:.0%} | {h['chance']:.0%} |")
    rate = _confounder_rate(manifest)
    if agg.get("spray"):
        beside = "; the random-model control beside" if any(sp.get("model_id") in _controls(run)
                                                            for sp in agg["spray"]) else ""
        out += ["", f"SpRAy on the confounded syndrome {agg.get('confounded_syndrome')} (cheek mark on {rate} of its "
                f"photos{beside}; a split needs a cluster whose cue enrichment is ≥ 2 and ≥ 1.5× every other "
                "cluster's):", "",
                "| model | method | clusters | sizes | splits on the cue |", "|---|---|---|---|---|"]
        for sp in sorted(agg["spray"], key=lambda sp: (sp.get("model_id", "") in _controls(run), sp["method"])):
            out.append(f"| {_model(run, sp.get('model_id', ''))} | {sp['method']} | {sp['n_clusters']} | "
                       f"{sp['cluster_sizes']} | {'yes' if sp['splits_on_cue'] else 'no'} |")
    out += localisation_section(run, agg.get("confounded_syndrome"))
    out += assess_section(run)
    out += eyetracking_section(run)
    out += imbalance_section(run)
    return "\n".join(out)


def assess_section(run: Path) -> list[str]:
    """The assess stage's per-method tables (``assess/summary.md``, written by the stage from the run)."""
    path = run / "assess" / "summary.md"
    if not path.exists():
        return []
    text = path.read_text().split("\n", 2)[-1].replace("\n## ", "\n#### ")
    return ["", "The assess stage's summary (`assess/summary.md`: faithfulness curves beside a random map, "
            "localisation beside chance and the random-weight control, cascading randomisation, landmark jitter):",
            text.rstrip()]


def eyetracking_section(run: Path) -> list[str]:
    """A compact view of the eye-tracking stage's results (``experiments/eyetracking/``): per observer group the mean
    over observers of four metrics per map, and the summary's planted-features vs eyes statements."""
    import pandas as pd

    from gestalt_xai.experiments.eyetracking.report import LABELS, map_order

    folder = run / "experiments" / "eyetracking"
    if not (folder / "summary_table.parquet").exists():
        return []
    table = pd.read_parquet(folder / "summary_table.parquet")
    simulated = bool(table["simulated"].all())
    tag = " (SIMULATED observers)" if simulated else ""
    table = table[table["breakdown"] == "group"]
    kinds = dict(zip(table["map"], table["kind"], strict=False))
    metrics = ["nss", "auc_judd", "auc_shuffled", "cc", "information_gain"]
    out = ["", f"Eye tracking{tag} (`experiments/eyetracking/summary.md`): mean over observers of each observer's "
               "mean over images; `face_prior` = the other images' fixations in aligned space, `ceiling` = the other "
               "observers of the group on the same image." + (" Every observer, fixation and answer is simulated "
               "(data_cards/eyetracking.md)." if simulated else ""), ""]
    out += ["| group | map | kind | " + " | ".join(LABELS[m] for m in metrics) + " |",
            "|---|---|---|" + "---|" * len(metrics)]
    for group, part in table.groupby("group", sort=True):
        if group == "all observers":
            continue
        cells = part.set_index(["map", "metric"])["mean"]
        for m in map_order(sorted(set(part["map"])), kinds):
            out.append(f"| {group} | {m} | {kinds.get(m, '')} | "
                       + " | ".join(f"{cells.get((m, k), float('nan')):.3f}" for k in metrics) + " |")
    summary = (folder / "summary.md").read_text()
    statements = [line for line in summary.splitlines() if line.startswith("- **")]
    if statements:
        out += ["", "Planted features vs eyes only, on the syndromes whose planted features lie away from the eyes:",
                *statements]
    return out


def imbalance_section(run: Path) -> list[str]:
    """The class-imbalance experiment's summary (``experiments/imbalance/summary.md``, its statements computed by the
    stage from the run's numbers)."""
    path = run / "experiments" / "imbalance" / "summary.md"
    if not path.exists():
        return []
    text = path.read_text().split("\n", 2)[-1].replace("\n## ", "\n#### ")
    return ["", "The class-imbalance experiment's summary (`experiments/imbalance/summary.md`; the demo's small "
                "version: two seeds, one fine-tuning epoch per variant):", text.rstrip()]


def _confounder_rate(manifest: dict) -> str:
    conf = manifest["stages"].get("synth", {}).get("config", {}).get("confounder") or {}
    return f"{conf.get('rate', 0):.0%}".replace("%", " %")


def _controls(run: Path) -> dict[str, str | None]:
    from gestalt_xai.models.declaration import random_controls
    from gestalt_xai.runs import Run

    return random_controls(Run(run))


def _model(run: Path, model_id: str) -> str:
    return f"{model_id} (random control)" if model_id in _controls(run) else model_id


def _x(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:.2f}×"


def localisation_section(run: Path, confounded: str | None) -> list[str]:
    """The change-mask localisation (trained model beside its random control) and the mark's Clever-Hans effect."""
    out: list[str] = []
    summary = run / "assess" / "localisation_summary.parquet"
    if summary.exists():
        t = pd.read_parquet(summary)
        t = t[(t["target_group"] == "centroid:own") & (t["mask_kind"] == "change")]
        trained, control = t[~t["random_control"]], t[t["random_control"]]
        out += ["", "Localisation against the counterfactual change masks (test photos; own-syndrome centroid "
                "target): positive relevance inside the pixels a planted feature changes, divided by their share of "
                "the face (a uniform map scores 1×), averaged over (photo, feature) pairs; the same on the mark in "
                f"marked {confounded} photos; ρ = per-patient Spearman correlation of per-feature relevance mass "
                "with the score drop when the feature is removed (patients with ≥ 3 in-crop features). Beside each, "
                "the same architecture with random weights:", "",
                "| method | features: trained | random | trained ÷ random | mark: trained | random | ρ trained (n) | "
                "ρ random |", "|---|---|---|---|---|---|---|---|"]
        for r in trained.sort_values(["method", "layer"]).to_dict("records"):
            c = control[(control["control_of"] == r["model_id"]) & (control["method"] == r["method"])
                        & (control["layer"] == r["layer"])]
            c = c.iloc[0] if len(c) else pd.Series(dtype=object)
            ratio = r["ratio_mean"] / c["ratio_mean"] if len(c) and c["ratio_mean"] > 0 else float("nan")
            method = r["method"] + (f" [{r['layer'].split('.')[-1]}]" if r["layer"] else "")
            rho = "–" if pd.isna(r["rho_mean"]) else f"{r['rho_mean']:+.2f} ({r['n_patients']})"
            rho_c = "–" if not len(c) or pd.isna(c["rho_mean"]) else f"{c['rho_mean']:+.2f}"
            out.append(f"| {method} | {_x(r['ratio_mean'])} | {_x(c.get('ratio_mean', float('nan')))} | "
                       f"{'–' if pd.isna(ratio) else f'{ratio:.1f}'} | {_x(r['mark_ratio_mean'])} | "
                       f"{_x(c.get('mark_ratio_mean', float('nan')))} | {rho} | {rho_c} |")
    marks = run / "assess" / "mark_effects.parquet"
    if marks.exists():
        m = pd.read_parquet(marks)
        m = m[m["set"].isin(["train", "test"])]
        out += ["", f"The mark as a Clever-Hans cue: the {confounded} centroid score of a photo minus that of the same "
                f"photo with the mark removed (marked {confounded} photos) or added (photos of other syndromes); "
                "share of photos moved the cue's way, with its Wilson 95 % interval:", "",
                "| model | set | edit | photos moved | share (95 % CI) | mean Δ |", "|---|---|---|---|---|---|"]
        for r in m.sort_values(["model_id", "set", "change"], ascending=[True, False, False]).to_dict("records"):
            edit = "mark removed: score drops" if r["change"] == "remove" else "mark added: score rises"
            out.append(f"| {_model(run, r['model_id'])} | {r['set']} | {edit} | {r['n_expected']}/{r['n']} | "
                       f"{r['share']:.0%} ({r['ci_low']:.0%}–{r['ci_high']:.0%}) | {r['mean_delta']:+.3f} |")
        controls = _controls(run)
        ctrl = m[m["model_id"].isin(list(controls))]
        if len(ctrl):
            key = ["set", "change"]
            both = m[~m["model_id"].isin(list(controls))].merge(ctrl, on=key, suffixes=("", "_control"))
            ratio = (both["mean_delta"].abs() / both["mean_delta_control"].abs().clip(lower=1e-12)).median()
            out += ["", "The random-weight twin moves the score the cue's way on many photos too (a dark spot shifts "
                    "any embedding; the S01 centroid of random embeddings carries the mark), but by a median "
                    f"{ratio:.0f}× less: the share alone is not the evidence, the effect size beside the control is."]
    return out


def seed_section(seeds: Path) -> list[str]:
    """The feature effects beside retrained seeds (``scripts/seed_effects.py``), when that script has run."""
    md = seeds / "seed_effects.md"
    return ["", md.read_text().rstrip()] if md.exists() else []


def data_card_section(run: Path, seeds: Path) -> str:
    """The post-run section of the synthetic cohort's data card: the measured Clever-Hans effect of the mark and the
    feature effects, from the run's own tables."""
    manifest = json.loads((run / "manifest.json").read_text())
    agg = manifest["stages"].get("aggregate", {}).get("results", {})
    confounded = agg.get("confounded_syndrome")
    train = manifest["stages"].get("train", {}).get("config", {})
    lines = [f"Measured on `{run}` (pipeline `{manifest.get('study', {}).get('config', {}).get('name', '?')}`, model "
             f"trained with `preset: {train.get('preset', '?')}`, seed {train.get('seed', 0)}; gestalt-xai "
             f"{manifest.get('gestalt_xai_version')}):"]
    lines += localisation_section(run, confounded)
    lines += seed_section(seeds)
    return "\n".join(lines)


def bench_section(folder: Path) -> str:
    parts = []
    for p in sorted(folder.glob("*.txt")):
        parts += [f"`{p.stem}`:", "```", p.read_text().rstrip(), "```", ""]
    return "\n".join(parts) or "(run `make bench`)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--readme", type=Path, default=Path("README.md"))
    ap.add_argument("--bench", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--seeds", type=Path, default=None, help="scripts/seed_effects.py's folder (default: <run>-seeds)")
    ap.add_argument("--data-card", type=Path, default=Path("data_cards/synthetic_cohort.md"))
    args = ap.parse_args()
    seeds = args.seeds or args.run.with_name(args.run.name + "-seeds")
    text = args.readme.read_text()
    if (args.run / "manifest.json").exists():
        text = _replace(text, "demo-results", demo_section(args.run) + "\n" + "\n".join(seed_section(seeds)))
        for card in (args.data_card, args.run / "cohort" / "data_card.md"):
            if card.exists():
                card.write_text(_replace(card.read_text(), "post-run", data_card_section(args.run, seeds), card))
    if args.bench.is_dir():
        text = _replace(text, "benchmarks", bench_section(args.bench))
    args.readme.write_text(text)


if __name__ == "__main__":
    main()
