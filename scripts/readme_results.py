"""Write the numbers a run produced into README.md, between ``<!-- NAME:start -->`` / ``<!-- NAME:end -->`` markers.

Sections filled (each only when its source exists):

* ``demo-results``: the demo run's stage timings (manifest), alignment success, and the matching summary in
  GM-Arc's table layout (``matching/summary.parquet``), with the chance level of the frequent test set;
* ``benchmarks``: the text the benchmark scripts wrote to ``benchmarks/results/*.txt`` (``make bench``).

Usage: python scripts/readme_results.py [--run runs/demo] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

from gestalt_xai.config import PipelineConfig
from gestalt_xai.study import plan_study


def _replace(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no <!-- {name}:start --> … <!-- {name}:end --> markers")
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
    if agg.get("planted_hits"):
        out += ["", "Syndromes whose highest-enrichment region is one of their planted features' regions (aggregate "
                "stage; chance = top region drawn uniformly from the 14 face regions):", "",
                "| method | target | hits | share | chance |", "|---|---|---|---|---|"]
        for h in agg["planted_hits"]:
            method = h["method"] + (f" [{h['layer']}]" if h["layer"] else "")
            out.append(f"| {method} | {h['target_group']} | {h['n_hits']}/{h['n_syndromes']} | {h['share']:.0%} | "
                       f"{h['chance']:.0%} |")
    if agg.get("spray"):
        out += ["", f"SpRAy on the confounded syndrome {agg.get('confounded_syndrome')} (cheek mark on 80 % of its "
                "photos):", "", "| method | clusters | sizes | splits on the cue |", "|---|---|---|---|"]
        for sp in agg["spray"]:
            out.append(f"| {sp['method']} | {sp['n_clusters']} | {sp['cluster_sizes']} | "
                       f"{'yes' if sp['splits_on_cue'] else 'no'} |")
    return "\n".join(out)


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
    args = ap.parse_args()
    text = args.readme.read_text()
    if (args.run / "manifest.json").exists():
        text = _replace(text, "demo-results", demo_section(args.run))
    if args.bench.is_dir():
        text = _replace(text, "benchmarks", bench_section(args.bench))
    args.readme.write_text(text)


if __name__ == "__main__":
    main()
