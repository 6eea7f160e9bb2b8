"""Command line: one thin subcommand per stage (parse options → call the stage function), plus ``study run``.

Every stage command takes ``--run RUN_DIR`` (the study folder it reads from and writes to), ``--config FILE`` (a YAML
file of the stage's options) and its own options, which override the file. Options are validated before any work.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gestalt_xai.config import load_yaml, validate_config
from gestalt_xai.errors import ConfigError, GestaltXAIError
from gestalt_xai.runs import Run, set_quiet

app = typer.Typer(
    name="gestalt-xai",
    help="Explain facial syndrome classifiers (GestaltMatcher-style): align → embed/match → explain → aggregate.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)
study_app = typer.Typer(help="Run study definitions (pipelines/*.yaml).", no_args_is_help=True)
app.add_typer(study_app, name="study")

console = Console()
err_console = Console(stderr=True)

RunOpt = Annotated[Path, typer.Option("--run", help="Run (study) folder to read from and write to.",
                                      file_okay=False)]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of this stage's options "
                                                "(command-line options override it).", dir_okay=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Any other option as KEY=VALUE (YAML value; dotted "
                                                 "keys for nested options), repeatable.")]


@app.callback()
def _main(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; warnings and errors only.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    set_quiet(quiet)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def _options(config: Path | None, sets: list[str] | None = None, **given: Any) -> dict[str, Any]:
    """Options from ``--config``, then ``--set KEY=VALUE`` pairs, then the named command-line options (None = not
    given), each overriding the one before."""
    import yaml

    opts = load_yaml(config) if config else {}
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = opts
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a group of options")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    opts.update({k: (str(v) if isinstance(v, Path) else [str(x) if isinstance(x, Path) else x for x in v]
                     if isinstance(v, list) else v) for k, v in given.items() if v is not None})
    return opts


def _print_errors(run: Run, stage: str) -> None:
    errors = run.errors()
    errors = errors[errors["stage"] == stage]
    if errors.empty:
        return
    table = Table(title=f"{len(errors)} item(s) failed in {stage} (all in {run.path / 'errors.parquet'})")
    for col in ("item_id", "error_kind", "message"):
        table.add_column(col, overflow="fold")
    for row in errors.head(20).itertuples():
        table.add_row(row.item_id, row.error_kind, row.message)
    err_console.print(table)


# ------------------------------------------------------------------------------------------------------- study
@study_app.command("run")
def study_run(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline file (YAML).", exists=True, dir_okay=False)],
    run: Annotated[Path | None, typer.Option("--run", help="Run folder (default: runs/<pipeline name>).")] = None,
) -> None:
    """Run the stages a pipeline file declares, in order, into one run folder.

    Example: `gestalt-xai study run pipelines/demo.yaml --run runs/demo`
    """
    from gestalt_xai.study import run_study

    result = run_study(pipeline, run)
    manifest = result.manifest
    table = Table(title=f"Study {manifest['study']['name']} → {result.path}")
    for col in ("stage", "status", "items", "errors", "seconds"):
        table.add_column(col)
    for name, st in manifest["stages"].items():
        table.add_row(name, st["status"], str(st.get("n_items", "")), str(st.get("n_errors", "")),
                      f"{st['timing'].get('seconds', 0):.1f}")
    console.print(table)
    for line in _study_outputs(result):
        console.print(line)


def _study_outputs(run: Run) -> list[str]:
    out = [f"manifest:   {run.path / 'manifest.json'}", f"errors:     {run.path / 'errors.parquet'}"]
    for label, rel in (("aligned:", "aligned"), ("alignments:", "aligned/alignment.parquet"),
                       ("atlas:", "aligned/atlas.png"), ("cohort:", "cohort"), ("models:", "models"),
                       ("embeddings:", "embeddings.parquet"), ("matching:", "matching"), ("maps:", "maps"),
                       ("aggregate:", "aggregate")):
        if (run.path / rel).exists():
            out.append(f"{label:<11} {run.path / rel}")
    return out


@study_app.command("check")
def study_check(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline file (YAML).", exists=True, dir_okay=False)],
) -> None:
    """Validate a pipeline file without running it.

    Example: `gestalt-xai study check pipelines/demo.yaml`
    """
    from gestalt_xai.config import load_pipeline
    from gestalt_xai.study import validate_study

    stages = validate_study(load_pipeline(pipeline), where=str(pipeline))
    console.print(f"{pipeline}: valid; stages: {', '.join(name for name, _, _ in stages)}")


# ------------------------------------------------------------------------------------------------------- align
@app.command()
def align(
    run: RunOpt,
    images: Annotated[Path | None, typer.Option(help="Folder of photos (image id = file name stem).")] = None,
    cohort: Annotated[Path | None, typer.Option(
        help="GMDB metadata folder, a gmdb_*.csv, or a plain cohort CSV "
             "(image_id, path, subject_id, syndrome_id[, sex, age, ancestry]).")] = None,
    image_root: Annotated[Path | None, typer.Option(help="Folder the cohort's images live in.")] = None,
    version: Annotated[str | None, typer.Option(help="GMDB version suffix (when several are present).")] = None,
    pattern: Annotated[str | None, typer.Option(help="Image file name pattern, default '{image_id}.jpg'.")] = None,
    detector: Annotated[str | None, typer.Option(help="mtcnn (default) or retinaface.")] = None,
    detector_weights: Annotated[Path | None, typer.Option(help="RetinaFace state dict (Resnet50_Final.pth).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Minimum face confidence (default 0.95).")] = None,
    aligned_input: Annotated[bool | None, typer.Option("--aligned-input", help="Inputs are already aligned "
                                                       "112×112 crops: identity transform.")] = None,
    landmarks: Annotated[Path | None, typer.Option(help="External landmarks (GM-Arc face_coords.csv layout).")] = None,
    two_pass: Annotated[bool | None, typer.Option("--two-pass", help="Level the eyes and detect again.")] = None,
    workers: Annotated[int | None, typer.Option(help="Parallel worker processes.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Detect and align faces onto the ArcFace 112×112 template.

    Writes `aligned/<image_id>.png` and `aligned/alignment.parquet`; bad photos become error rows; reruns skip
    finished photos.

    Example: `gestalt-xai align --run runs/try --images photos/`
    """
    from gestalt_xai.faces.stage import AlignConfig, align_stage

    opts = _options(config, images=images, cohort=cohort, image_root=image_root, version=version, pattern=pattern,
                    detector=detector, detector_weights=detector_weights, threshold=threshold,
                    aligned_input=aligned_input, landmarks=landmarks, two_pass=two_pass, workers=workers)
    cfg = validate_config(AlignConfig, opts, where="align")
    r = Run(run)
    result = align_stage(r, cfg)
    _print_errors(r, "align")
    console.print(f"aligned {result.n_aligned} of {result.n_images} photos → {result.crops} "
                  f"(table: {result.table}; {result.n_errors} error(s))")


@app.command()
def atlas(
    run: RunOpt,
    image_id: Annotated[str | None, typer.Option(help="Aligned image to draw on (default: the first).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Draw the facial region atlas (template space, with HPO anchors) over an aligned face.

    Example: `gestalt-xai atlas --run runs/demo`
    """
    from gestalt_xai.faces.atlas_stage import AtlasConfig, atlas_stage

    cfg = validate_config(AtlasConfig, _options(config, image_id=image_id), where="atlas")
    result = atlas_stage(Run(run), cfg)
    console.print(f"atlas figure: {result.figure}\nregion table: {result.table}")


# ----------------------------------------------------------------------------------------------- synth
@app.command()
def synth(
    run: RunOpt,
    n_syndromes: Annotated[int | None, typer.Option(help="Number of synthetic syndromes.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (same seed → byte-identical cohort).")] = None,
    preview: Annotated[Path | None, typer.Option(help="Only draw a montage (one face per syndrome, features "
                                                 "outlined) to this PNG; write no cohort.", dir_okay=False)] = None,
    data_card: Annotated[Path | None, typer.Option(help="Also write the cohort's data card (Markdown) here.",
                                                   dir_okay=False)] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Render the synthetic cohort: procedural faces with planted, HPO-coded phenotypes and ground truth.

    Writes GMDB-format tables and raw photos to `cohort/` and the ground truth to `cohort/truth/`.

    Example: `gestalt-xai synth --run runs/demo --seed 0` or `gestalt-xai synth --run runs/demo --preview preview.png`
    """
    from gestalt_xai.data.synthetic.cohort import SynthConfig, synth_stage

    cfg = validate_config(SynthConfig, _options(config, sets, n_syndromes=n_syndromes, seed=seed), where="synth")
    if preview is not None:
        from gestalt_xai.data.synthetic.preview import render_preview

        console.print(f"preview: {render_preview(cfg, preview)}")
        return
    r = Run(run)
    synth_stage(r, cfg)
    console.print(f"synthetic cohort → {r.path / 'cohort'}")
    if data_card is not None:
        from gestalt_xai.data.synthetic.data_card import write_data_card

        console.print(f"data card → {write_data_card(r.path, data_card)}")


# ----------------------------------------------------------------------------------------------- models
@app.command()
def train(
    run: RunOpt,
    preset: Annotated[str | None, typer.Option(help="gmarc (GM-Arc's recipe) or demo (small model).")] = None,
    init: Annotated[Path | None, typer.Option(help="Checkpoint to fine-tune (any format embed reads).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    model_id: Annotated[str | None, typer.Option(help="Name of the model in run/models.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (same seed → same weights on CPU).")] = None,
    trust_pickle: Annotated[bool | None, typer.Option("--trust-pickle", help="Allow a whole-module pickle as "
                                                      "--init (executes code from the file).")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Train or fine-tune a GestaltMatcher-style model on the run's cohort (train split; val for the scheduler).

    Example: `gestalt-xai train --run runs/demo --preset demo`
    """
    from gestalt_xai.models.train import TrainConfig, train_stage

    cfg = validate_config(TrainConfig, _options(config, sets, preset=preset, init=init, epochs=epochs,
                                                model_id=model_id, seed=seed, trust_pickle=trust_pickle),
                          where="train")
    console.print(f"model → {train_stage(Run(run), cfg)}")


@app.command()
def embed(
    run: RunOpt,
    model: Annotated[list[Path] | None, typer.Option("--model", help="Checkpoint (repeat for an ensemble); "
                                                     "default: every model in run/models.")] = None,
    no_tta: Annotated[bool | None, typer.Option("--no-tta", help="One slot instead of GM-Arc's 4 TTA "
                                                "slots.")] = None,
    trust_pickle: Annotated[bool | None, typer.Option("--trust-pickle", help="Allow GM-Arc whole-module .pth "
                                                      "pickles (executes code from the file).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per forward pass.")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Embed every aligned face with one model or an ensemble (GM-Arc TTA slots) into `embeddings.parquet`.

    Example: `gestalt-xai embed --run runs/demo --model s1_r50.pth --model glint360k_r100.onnx`
    """
    from gestalt_xai.models.embed import EmbedConfig, embed_stage

    cfg = validate_config(EmbedConfig, _options(config, sets, models=model or None,
                                                tta=False if no_tta else None, trust_pickle=trust_pickle,
                                                batch_size=batch_size), where="embed")
    console.print(f"embeddings → {embed_stage(Run(run), cfg)}")


@app.command()
def match(
    run: RunOpt,
    model: Annotated[list[str] | None, typer.Option("--model", help="Model id to ensemble (repeat); default: "
                                                    "every embedded model.")] = None,
    no_tta: Annotated[bool | None, typer.Option("--no-tta", help="Use only the original slot.")] = None,
    gallery_encodings: Annotated[Path | None, typer.Option(help="GM-Arc gallery encodings to use as the "
                                                           "gallery.")] = None,
    trust_pickle: Annotated[bool | None, typer.Option("--trust-pickle", help="Allow a pickled encodings "
                                                      "file.")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Rank syndromes in the Clinical Face Phenotype Space: GMDB frequent / rare / unified protocols, macro top-k.

    Example: `gestalt-xai match --run runs/demo`
    """
    from gestalt_xai.matching import MatchConfig, match_stage

    cfg = validate_config(MatchConfig, _options(config, sets, models=model or None, tta=False if no_tta else None,
                                                gallery_encodings=gallery_encodings, trust_pickle=trust_pickle),
                          where="match")
    match_stage(Run(run), cfg)


# ----------------------------------------------------------------------------------------------- explain
@app.command()
def explain(
    run: RunOpt,
    methods: Annotated[str | None, typer.Option(help="Comma-separated: gradcam,hirescam,fullgrad,saliency,"
                                                "input_x_gradient,occlusion,integrated_gradients,smoothgrad,"
                                                "smoothgrad_ig,deeplift,guided_backprop,deconvolution,lrp")] = None,
    target: Annotated[str | None, typer.Option(help="centroid | logit | pair")] = None,
    syndromes: Annotated[str | None, typer.Option(help="label | topk:K | ID,ID,…")] = None,
    pairs: Annotated[str | None, typer.Option(help="nearest:K, or a CSV/Parquet table image_id,partner_id")] = None,
    layer: Annotated[list[str] | None, typer.Option("--layer", help="Layer for Grad-CAM/HiResCAM (repeat); "
                                                    "default backbone.layer4.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch.")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Per-patient maps (one shared gradient pass, occlusion, IG, LRP, …) into the map store `maps/`, with overlays.

    Example: `gestalt-xai explain --run runs/demo --methods gradcam,hirescam,fullgrad,occlusion --target centroid`
    """
    from gestalt_xai.attribution.explain import ExplainConfig, explain_stage

    cfg = validate_config(ExplainConfig, _options(config, sets, methods=methods.split(",") if methods else None,
                                                  target=target, syndromes=syndromes, pairs=pairs,
                                                  layers=layer or None, batch_size=batch_size), where="explain")
    r = Run(run)
    store = explain_stage(r, cfg)
    _print_errors(r, "explain")
    console.print(f"maps → {store.root} ({len(store)} maps)")


# ----------------------------------------------------------------------------------------------- aggregate
@app.command()
def aggregate(
    run: RunOpt,
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods (default: all in the store).")] = None,
    normalisation: Annotated[str | None, typer.Option(help="Comma-separated per-map normalisations: none, "
                                                      "max-abs, zscore, positive (the first drives the figures).")
                             ] = None,
    min_subjects: Annotated[int | None, typer.Option(help="Privacy guard: fewest subjects a composite face is "
                                                     "rendered from (default 10).")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Syndrome-level composites, composite faces, similarity maps, generic maps, region (HPO) scores and SpRAy.

    Example: `gestalt-xai aggregate --run runs/demo --methods hirescam,occlusion --normalisation max-abs`
    """
    from gestalt_xai.aggregate.stage import AggregateConfig, aggregate_stage

    cfg = validate_config(AggregateConfig, _options(config, sets, methods=methods.split(",") if methods else None,
                                                    normalisations=normalisation.split(",") if normalisation
                                                    else None, min_subjects=min_subjects), where="aggregate")
    r = Run(run)
    aggregate_stage(r, cfg)
    _print_errors(r, "aggregate")
    console.print(f"aggregate → {r.path / 'aggregate'}")


def main() -> None:
    """Console entry point: known errors print one clear message (exit 2 for configuration, 1 otherwise)."""
    try:
        app()
    except ConfigError as exc:
        err_console.print(f"[bold red]configuration error:[/] {exc}")
        sys.exit(2)
    except GestaltXAIError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
