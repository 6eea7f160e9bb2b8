"""``pipelines/gmdb_thesis.yaml`` end to end on a GMDB-format folder with GM-Arc's checkpoint formats.

The synthetic cohort of the session fixture is written as a GMDB release (``write_gmdb``: every ``gmdb_*`` table,
the syndrome table, the lookup table, ``image_metadata_<version>.tsv`` with a consent column; the photos in their own
folder) and three tiny ensemble members are written as GM-Arc's files (``write_example`` of the checkpoint format
registry, as ``tests/test_gmarc_pipeline.py`` does): model A as the whole pickled ``…_last_model.pth``, model B as a
per-epoch ``…_e50.pt`` state dict, model C as the Glint360K ``.onnx``. The pipeline file itself runs on them, with
its variables set to these paths and its steps shrunk (fewer patients, steps, seeds) in a copy of the file: every
step of the file, with every option it sets that the shrinking does not, validated by the real stages.

Variables: once the runner takes them (``run_study(path, run_dir, variables=…)``) the test hands them over;
until then :func:`resolve_variables` does what the runner will (substitute ``{name}``, drop an ``optional`` step whose
variables are not given).
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("onnx")
pytest.importorskip("onnx2torch")

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "gmdb_thesis.yaml"
VERSION = "v0.9.9"
MODEL_A = f"s1_glint360k_r50_512d_gmdb__{VERSION}_bs64_size112_channels3_last_model.pth"
MODEL_B = f"s2_glint360k_r100_512d_gmdb__{VERSION}_bs128_size112_channels3_e50.pt"
MODEL_C = "glint360k_r100.onnx"
IDS = {"gmarc_a_r50": MODEL_A, "gmarc_b_r100": MODEL_B, "glint360k_r100": MODEL_C}
METHODS = ["gradcam", "hirescam", "fullgrad", "occlusion"]
#: the pipeline's steps, shrunk (merged into the step's options; the step ids are the file's)
SHRINK: dict[str, dict[str, Any]] = {
    "align": {"workers": 1},
    "embed": {"threads": 2, "batch_size": 32, "tta": False},
    "centroid": {"threads": 2, "overlay": 1, "batch_size": 16, "occlusion_patch": 28, "occlusion_stride": 28},
    "logit": {"threads": 2, "batch_size": 16, "occlusion_patch": 28, "occlusion_stride": 28},
    "composites": {"threads": 2, "batch_size": 16},
    "aggregate": {"min_subjects": 3, "normalisations": ["max-abs"], "figures": False, "spray_min_subjects": 100},
    # randomisation and landmark jitter (tests/test_assess_*.py) off: ~55 s here
    "assess": {"max_patients": 3, "faithfulness": {"baselines": ["black"], "steps": 4, "curves": ["deletion"]},
               "randomisation": {"enabled": False}, "robustness": {"enabled": False}, "figure_formats": ["png"]},
    "train": {"epochs": 1, "batch_size": 16, "threads": 2},
    "imbalance": {"train": {"preset": "gmarc", "epochs": 1, "batch_size": 16, "freeze_backbone": True},
                  "variants": {"full": {}}, "subsample": {"syndrome": "largest", "sizes": [2]}, "seeds": [0, 1],
                  "probe": {"per_syndrome": 1}, "methods": ["gradcam"], "targets": ["centroid"],
                  "comparisons": ["spearman"], "faithfulness": {"steps": 4, "images": "focus"}},
    "eyetrack": {"figure_formats": ["png"], "borji_splits": 5},
    # the one composite syndrome of the shrunk run, two of its methods; PDFs are the browser tests'
    "questionnaire": {"overrides": {"cases": {"select": "all", "min_subjects": 3},
                                    "maps": {"methods": ["gradcam", "hirescam"], "per_case": 2,
                                             "preference": ["gradcam", "hirescam"]}}, "pdf": "never"},
    "report": {"pdf": "never"},
}
_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ------------------------------------------------------------------------------------------- the pipeline file
def _step_id(name: str, options: dict[str, Any], seen: dict[str, int]) -> str:
    seen[name] = seen.get(name, 0) + 1
    return str(options.get("id") or (name if seen[name] == 1 else f"{name}#{seen[name]}"))


def shrunk_pipeline(out: Path, keep: set[str] | None = None, extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """The pipeline file with :data:`SHRINK` and ``extra`` merged into its steps (only the steps in ``keep``)."""
    data = yaml.safe_load(PIPELINE.read_text(encoding="utf-8"))
    stages, seen = [], {}
    for item in data["stages"]:
        (name, options), = item.items()
        options = dict(options or {})
        sid = _step_id(name, options, seen)
        if keep is None or sid in keep:
            stages.append({name: {**options, **copy.deepcopy(SHRINK.get(sid, {})), **(extra or {}).get(sid, {})}})
    out.write_text(yaml.safe_dump({**data, "stages": stages}, sort_keys=False), encoding="utf-8")
    return out


def _substitute(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _VAR.sub(lambda m: variables.get(m[1], m[0]), value)  # {run} is the stages' own
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    return value


def _referenced(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(_VAR.findall(value))
    if isinstance(value, list | dict):
        return set().union(*(_referenced(v) for v in (value.values() if isinstance(value, dict) else value)))
    return set()


def resolve_variables(path: Path, given: dict[str, str], out: Path) -> Path:
    """What the runner does with ``variables:`` (its defaults, ``null`` = required, ``""`` = not given) and
    ``optional: true`` steps (kept only when every variable they reference is given), as a plain pipeline file."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    values = {**data.pop("variables"), **given}
    missing = sorted(k for k, v in values.items() if v is None)
    assert not missing, f"required variables not given: {missing}"
    stages = []
    for item in data["stages"]:
        (name, options), = item.items()
        options = dict(options or {})
        if options.pop("optional", False) and any(values.get(v) == "" for v in _referenced(options)):
            continue
        stages.append({name: options})
    out.write_text(yaml.safe_dump(_substitute({**data, "stages": stages}, values), sort_keys=False), encoding="utf-8")
    return out


def run_pipeline(path: Path, run_dir: Path, variables: dict[str, str]):  # noqa: ANN201
    """``run_study`` with ``variables`` (resolved here while the runner does not take them)."""
    from gestalt_xai.study import run_study

    if "variables" in inspect.signature(run_study).parameters:
        return run_study(path, run_dir, variables=variables)
    return run_study(resolve_variables(path, variables, path.with_suffix(".resolved.yaml")), run_dir)


# ------------------------------------------------------------------------------------- GMDB folder and weights
def _write_gmdb(source: Path, root: Path) -> tuple[Path, Path]:
    """The synthetic cohort as a GMDB release: ``root/gmdb_metadata`` (tables) and ``root/photos`` (photos)."""
    from gestalt_xai.data.cohort import load_gmdb, write_gmdb

    cohort = load_gmdb(source / "cohort")
    photos = root / "photos"
    photos.mkdir(parents=True)
    for image_id, path in zip(cohort.images["image_id"], cohort.images["path"], strict=True):
        shutil.copyfile(path, photos / f"{image_id}.jpg")
    images = cohort.images.drop(columns=["path"]).assign(
        consent_to_publish=[i % 2 == 0 for i in range(len(cohort.images))])
    write_gmdb(root / "gmdb_metadata", images, cohort.syndromes, VERSION, splits=cohort.splits)
    return root / "gmdb_metadata", photos


def _write_weights(folder: Path, classes: list[str]) -> None:
    """GM-Arc's three ensemble members (tiny r18s with random weights) in GM-Arc's formats and file names, and the
    lookup table of A and B as GM-Arc's training writes it (a header line, then the list)."""
    from model_helpers import randomise_model

    from gestalt_xai.models.checkpoints import CHECKPOINT_FORMATS
    from gestalt_xai.models.checkpoints.onnx_graph import export_onnx
    from gestalt_xai.models.gestaltmatcher import build_gestaltmatcher

    folder.mkdir(parents=True)
    for i, (fmt, name) in enumerate((("gm-arc-pickle", MODEL_A), ("gm-arc-pt", MODEL_B))):
        torch.manual_seed(30 + i)
        model = randomise_model(build_gestaltmatcher("r18", width=0.125, num_classes=len(classes),
                                                     syndrome_ids=classes), seed=40 + i)
        (folder / fmt).mkdir()
        shutil.move(CHECKPOINT_FORMATS[fmt].write_example(model, folder / fmt), folder / name)
        shutil.rmtree(folder / fmt)
    torch.manual_seed(32)
    glint = randomise_model(build_gestaltmatcher("r18", width=0.125), seed=42)
    export_onnx(glint.backbone, folder / MODEL_C)
    (folder / f"lookup_table_gmdb_{VERSION}.txt").write_text("index_id to disorder_id\n" + json.dumps(classes) + "\n")


def _explained(cohort) -> tuple[list[str], list[str]]:  # noqa: ANN001
    """The shrunk run's patients (frequent-protocol test photos of two syndromes, one rare-protocol one) and the
    photos of the syndrome whose composites it makes (eight of the one with most subjects)."""
    label = cohort.images.set_index("image_id")["syndrome_id"]
    first = cohort.splits.sort_values("image_id").drop_duplicates("set").set_index("set")["image_id"]
    frequent = cohort.splits.loc[cohort.splits["set"] == "frequent_test", "image_id"].sort_values()
    patients = frequent.groupby(frequent.map(label)).first().tolist()[:2] + [first["rare_test"]]
    largest = cohort.images.groupby("syndrome_id")["subject_id"].nunique().sort_index().idxmax()
    return patients, sorted(cohort.images.loc[cohort.images["syndrome_id"] == largest, "image_id"])[:8]


@pytest.fixture(scope="module")
def gmdb_study(synthetic_run, tmp_path_factory) -> dict[str, Any]:
    """The GMDB folder, the weights, the variables and the finished run (eye tracking not given: skipped).

    Landmarks come from a GM-Arc ``face_coords.csv`` (the pipeline's ``landmarks`` variable; the synthetic truth);
    detection, which real GMDB photos need, is :func:`test_gmdb_alignment_detects_faces_in_the_photos`'s."""
    from gestalt_xai.data.cohort import load_gmdb
    from gestalt_xai.runs import Run

    root = tmp_path_factory.mktemp("gmdb")
    source = root / "synthetic"
    shutil.copytree(synthetic_run.path, source)
    metadata, photos = _write_gmdb(source, root / "GestaltMatcherDB")
    cohort = load_gmdb(metadata)
    _write_weights(root / "saved_models", cohort.lookup)
    patients, composite_images = _explained(cohort)
    largest = str(cohort.images.set_index("image_id").loc[composite_images[0], "syndrome_id"])
    variables = {"gmdb": str(metadata), "gmdb_images": str(photos), "gmdb_version": VERSION,
                 "models": str(root / "saved_models"), "model_a": MODEL_A, "model_b": MODEL_B, "model_c": MODEL_C,
                 "lookup_table": f"lookup_table_gmdb_{VERSION}.txt", "composite_syndromes": largest,
                 "landmarks": str(source / "face_coords.csv")}
    extra = {"centroid": {"images": patients}, "logit": {"images": patients},
             "composites": {"images": composite_images}, "assess": {"images": patients}}
    t0 = time.perf_counter()
    run = run_pipeline(shrunk_pipeline(root / "gmdb_small.yaml", extra=extra), root / "run", variables)
    seconds = time.perf_counter() - t0
    return {"root": root, "source": source, "cohort": cohort, "variables": variables, "largest": largest,
            "patients": patients, "composite_images": composite_images, "run": Run(run.path), "seconds": seconds}


# ------------------------------------------------------------------------------------------------------ tests
def test_every_step_of_the_file_validates_with_the_real_stages(gmdb_study, tmp_path) -> None:
    """The file as shipped (not shrunk), variables set: every option of every step is accepted before any work."""
    from gestalt_xai.config import load_pipeline
    from gestalt_xai.study import plan_study

    given = {**gmdb_study["variables"], "eyetracking": str(tmp_path)}
    plan = plan_study(load_pipeline(resolve_variables(PIPELINE, given, tmp_path / "full.yaml")))
    assert [s.id for s in plan] == ["align", "atlas", "embed", "match", "centroid", "logit", "composites",
                                    "aggregate", "assess", "train", "imbalance", "eyetrack", "questionnaire",
                                    "report"]
    steps = {s.id: s.options for s in plan}
    assert [m.id for m in steps["embed"].models] == list(IDS) == [m.id for m in steps["logit"].models]
    assert [Path(m.path).name for m in steps["centroid"].models] == list(IDS.values())
    for sid in ("centroid", "logit"):
        assert steps[sid].methods == METHODS and steps[sid].images == "test"
    assert (steps["centroid"].occlusion_patch, steps["centroid"].occlusion_stride) == (10, 5)  # the thesis' grid
    assert steps["align"].two_pass and steps["align"].face_selection == "confidence"
    assert steps["align"].version == VERSION
    assert steps["match"].protocols == ["frequent", "rare", "frequent_unified", "rare_unified"]
    assert steps["imbalance"].init_model == steps["train"].model_id
    # without the eye-tracking variable the step is dropped, and a required variable left out is refused
    without = yaml.safe_load(resolve_variables(PIPELINE, gmdb_study["variables"], tmp_path / "no_et.yaml").read_text())
    assert "eyetrack" not in [next(iter(item)) for item in without["stages"]]
    with pytest.raises(AssertionError, match="composite_syndromes"):
        resolve_variables(PIPELINE, {k: v for k, v in gmdb_study["variables"].items() if k != "composite_syndromes"},
                          tmp_path / "bad.yaml")


def test_gmdb_thesis_pipeline_runs_end_to_end(gmdb_study) -> None:
    run, cohort = gmdb_study["run"], gmdb_study["cohort"]
    print(f"gmdb_thesis (shrunk) ran in {gmdb_study['seconds']:.1f} s")
    stages = run.manifest["stages"]
    done = ["align", "atlas", "embed", "match", "centroid", "logit", "composites", "aggregate", "assess", "train",
            "imbalance", "questionnaire", "report"]
    assert {s: stages[s]["status"] for s in done} == dict.fromkeys(done, "done")
    # eye tracking not given: the optional step did nothing
    assert stages["eyetrack"]["status"] == "skipped (input variable eyetracking='' missing)"
    assert not (run.path / "experiments" / "eyetracking").exists()
    # the questionnaire over the composite syndrome, the reports of the explained patients, pseudonyms only
    assert (run.path / "questionnaire" / "redcap" / "data_dictionary.csv").exists()
    assert (run.path / "private" / "questionnaire" / "cases_key.csv").read_text().count("\n") >= 2
    pages = sorted((run.path / "reports").glob("*.html"))
    assert len(pages) >= len(gmdb_study["patients"]) + 1 and (run.path / "reports" / "index.html") in pages
    for page in pages:
        assert not any(f">{p}<" in page.read_text(encoding="utf-8") for p in gmdb_study["patients"])

    # every photo of the GMDB tables aligned from the photo folder (landmark table), with the cohort's consent flags
    alignment = pd.read_parquet(run.path / "aligned" / "alignment.parquet")
    assert alignment["ok"].all() and set(alignment["image_id"]) == set(cohort.images["image_id"])
    assert (alignment["detector"] == "landmark_table").all()
    table = run.image_table().set_index("image_id")
    assert table["consent_to_publish"].to_dict() == cohort.images.set_index("image_id")["consent_to_publish"].to_dict()
    assert table["consent_to_publish"].any() and not table["consent_to_publish"].all()

    # the manifest records the GM-Arc files and their hashes; no gestalt-xai copy of them is made
    from gestalt_xai.models.checkpoints import model_sha256

    weights = gmdb_study["root"] / "saved_models"
    for mid, name in IDS.items():
        entry = run.manifest["models"][mid]
        assert Path(run.resolve(entry["path"])) == weights / name
        assert entry["sha256"] == model_sha256(weights / name)
    assert sorted(p.name for p in (run.path / "models").glob("*.safetensors")) == ["gmarc_r100_ft.safetensors"]
    embeddings = run.embeddings()
    assert sorted(set(embeddings["model_id"])) == sorted(IDS)

    # the protocols' test sets and splits are the GMDB files'
    meta = gmdb_study["variables"]["gmdb"]
    ranks = run.ranks()
    frequent = pd.read_csv(Path(meta) / f"gmdb_frequent_test_images_{VERSION}.csv", dtype=str)
    assert set(ranks.loc[ranks["protocol"] == "frequent", "image_id"]) == set(frequent["image_id"])
    rare = pd.read_csv(Path(meta) / f"gmdb_rare_test_images_{VERSION}.csv", dtype={"image_id": str})
    got = ranks[ranks["protocol"] == "rare"].groupby("split")["image_id"].apply(set).to_dict()
    assert got == rare.groupby("split")["image_id"].apply(set).to_dict() and len(got) == 10
    summary = pd.read_parquet(run.path / "matching" / "summary.parquet")
    assert set(summary["protocol"]) == {"frequent", "rare", "frequent_unified", "rare_unified"}

    # maps for every method × target kind × member towards each patient's own syndrome; logit maps only from
    # members with a classifier, of the syndromes in its lookup table (the frequent ones: a rare patient has none)
    index = run.map_store().index()
    patients = gmdb_study["patients"]
    label = table["syndrome_id"]
    classes = [i for i in patients if label[i] in cohort.lookup]
    assert 0 < len(classes) < len(patients)
    for kind, members, ids in (("centroid", set(IDS), patients), ("logit", {"gmarc_a_r50", "gmarc_b_r100"}, classes)):
        own = index[index["target"] == kind + ":" + index["image_id"].map(label)]
        for method in METHODS:
            rows = own[own["method"] == method]  # gradient family: the composites' photos too
            assert set(rows["model_id"]) == members and set(zip(rows["image_id"], rows["model_id"], strict=True)) >= {
                (i, m) for i in ids for m in members}, (kind, method)
    hashes = index.drop_duplicates("model_id").set_index("model_id")["model_hash"]
    assert all(hashes[m] == model_sha256(weights / n) for m, n in IDS.items())
    # composites: every photo of the chosen syndrome, towards it
    largest = gmdb_study["largest"]
    chosen = index[index["target"] == f"centroid:{largest}"]
    assert set(gmdb_study["composite_images"]) <= set(chosen["image_id"])
    composites = pd.read_parquet(run.path / "aggregate" / "composites.parquet",
                                 columns=["group", "stratum", "target_group", "method", "n_subjects"])
    own = composites[(composites["group"] == largest) & (composites["target_group"] == "centroid:own")
                     & (composites["stratum"] == "all") & (composites["method"] != "occlusion")]
    subjects = cohort.images.set_index("image_id").loc[gmdb_study["composite_images"], "subject_id"].nunique()
    assert set(own["method"]) == {"gradcam", "hirescam", "fullgrad"} and (own["n_subjects"] >= subjects).all()

    # assessment: occlusion agreement of the gradient family on both targets
    agreement = pd.read_parquet(run.path / "assess" / "occlusion_agreement.parquet")
    assert set(agreement["method"]) == {"gradcam", "hirescam", "fullgrad"}
    assert {t.split(":")[0] for t in agreement["target"]} == {"centroid", "logit"}
    assert np.isfinite(agreement["spearman"]).all()
    for name in ("faithfulness.parquet", "faithfulness_curves.parquet", "summary.md"):
        assert (run.path / "assess" / name).is_file(), name
    assert (run.path / "experiments" / "imbalance" / "summary.md").is_file()
    training = pd.read_parquet(run.path / "experiments" / "imbalance" / "training.parquet")
    assert set(zip(training["variant"], training["seed"], strict=True)) == {(v, s) for v in ("full", "sub2")
                                                                           for s in (0, 1)}

    # no error rows but the expected ones: a logit is skipped where a member has no such class (model C has no
    # classifier; the rare syndrome is in no lookup table)
    errors = run.errors()
    unexpected = errors[~((errors["stage"] == "logit") & (errors["error_kind"] == "skipped"))]
    assert unexpected.empty, unexpected[["stage", "item_id", "message"]].to_string()
    skipped = {(r.item_id, json.loads(r.key)["model_id"]) for r in errors.itertuples()}
    assert skipped == {(i, "glint360k_r100") for i in patients} | {
        (i, m) for i in set(patients) - set(classes) for m in ("gmarc_a_r50", "gmarc_b_r100")}


def test_eye_tracking_step_runs_when_a_study_is_given(gmdb_study) -> None:
    """A simulated study (EyeLink ASC + Tobii TSV) of the same photos given as ``--var eyetracking=DIR``."""
    from gestalt_xai.experiments.eyetracking.simulate import SimulationConfig, simulate_study

    root, run = gmdb_study["root"], gmdb_study["run"]
    study = root / "eyetracking-study"
    simulate_study(gmdb_study["source"], study, SimulationConfig(
        observers={"expert": 2, "non_clinician": 2}, images_per_syndrome=1, fixations_per_trial=6.0))
    assert list(study.glob("*.asc")) and list(study.glob("*.tsv"))
    path = shrunk_pipeline(root / "gmdb_eyetrack.yaml", keep={"eyetrack"})
    run = run_pipeline(path, run.path, {**gmdb_study["variables"], "eyetracking": str(study)})
    assert run.manifest["stages"]["eyetrack"]["status"] == "done"
    out = run.path / "experiments" / "eyetracking"
    assert out.is_dir() and any(out.rglob("*.parquet"))
    assert run.errors()[lambda e: e["stage"] == "eyetrack"].empty


def test_gmdb_alignment_detects_faces_in_the_photos(gmdb_study) -> None:
    """The align step as the file runs it on real GMDB photos (MTCNN, GM-Arc's two passes, most confident face), on
    a handful of photos: GMDB tables that list three of them."""
    from gestalt_xai.data.cohort import load_gmdb, write_gmdb

    root, cohort = gmdb_study["root"], gmdb_study["cohort"]
    few = cohort.images[cohort.images["image_id"].isin(gmdb_study["patients"])]
    metadata = root / "few" / "gmdb_metadata"
    write_gmdb(metadata, few.drop(columns=["path"]), cohort.syndromes, VERSION,
               splits=cohort.splits[cohort.splits["image_id"].isin(few["image_id"])])
    assert len(load_gmdb(metadata, gmdb_study["variables"]["gmdb_images"]).images) == 3
    path = shrunk_pipeline(root / "gmdb_align.yaml", keep={"align"})
    variables = {**gmdb_study["variables"], "gmdb": str(metadata), "landmarks": ""}
    run = run_pipeline(path, root / "run_align", variables)
    alignment = pd.read_parquet(run.path / "aligned" / "alignment.parquet")
    assert alignment["ok"].all() and sorted(alignment["image_id"]) == sorted(gmdb_study["patients"])
    assert (alignment["detector"] == "mtcnn").all() and alignment["two_pass_angle"].notna().all()
    # the detected landmarks lie near the true ones (the landmark table of the main run): within 0.2 eye distances
    truth = pd.read_parquet(gmdb_study["run"].path / "aligned" / "alignment.parquet").set_index("image_id")
    for rec in alignment.itertuples():
        found, true = (np.reshape(v, (5, 2)) for v in (rec.landmarks, truth.loc[rec.image_id, "landmarks"]))
        assert np.linalg.norm(found - true, axis=1).max() < 0.2 * np.linalg.norm(true[0] - true[1]), rec.image_id
