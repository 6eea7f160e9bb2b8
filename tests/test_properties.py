"""Property-based tests (hypothesis) of everything that reads user files: any bytes, any table, any pipeline gives
a result or a :class:`~gestalt_xai.errors.GestaltXAIError` naming the file or field — never another exception.

Covered: the image loader (:func:`~gestalt_xai.data.images.load_image`), the cohort readers (plain CSV
:func:`~gestalt_xai.data.cohort.load_table` and GMDB folders :func:`~gestalt_xai.data.cohort.load_gmdb`), the
landmark table (:func:`~gestalt_xai.faces.stage.read_landmark_table`), checkpoint format detection
(:func:`~gestalt_xai.models.checkpoints.detect_format`) and the pipeline parser
(:func:`~gestalt_xai.config.load_pipeline`, :func:`~gestalt_xai.config.validate_config`,
:func:`~gestalt_xai.study.plan_study`). The examples are derandomised
(the ``gestalt-xai`` profile in ``conftest.py``) and sized so the file runs in well under a minute; ``scripts/fuzz.py``
runs the same readers on many more mutations.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gestalt_xai.errors import CheckpointError, ConfigError, GestaltXAIError, InputError

#: examples per test (×2 for the cheapest readers); GX_PROPERTY_EXAMPLES=1000 with HYPOTHESIS_PROFILE=explore looks
#: harder than the suite's fixed examples
EXAMPLES = int(os.environ.get("GX_PROPERTY_EXAMPLES", "60"))


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per example (hypothesis runs many examples inside one test function)."""
    folder = Path(tempfile.mkdtemp(prefix="gx-prop-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def names_file(exc: GestaltXAIError, *paths: Path | str) -> bool:
    """Whether the error message names one of ``paths`` (file or folder)."""
    return any(str(p) in str(exc) for p in paths)


# ----------------------------------------------------------------------------------------------- strategies
#: cell values people do put into tables: ids, paths, numbers, blanks and hostile strings
CELLS = st.one_of(
    st.sampled_from(["", " ", "nan", "NaN", "None", "unknown", "0", "1", "1.0", "-1", "1e309", "inf", "x", "A", "S01",
                     "a/b.jpg", "../escape.jpg", "/etc/passwd", "img.jpg", "..", ".", "a\\b", "é", "\x00", "🙂",
                     '"quoted, comma"', "line\nbreak", "{image_id}", "[1, 2]"]),
    st.text(max_size=12),
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


def table_text(columns: list[str], rows: list[list[str]], sep: str = ",") -> str:
    """A CSV/TSV text written with the csv module (quoting as spreadsheets do)."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=sep, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


@st.composite
def tables(draw: st.DrawFn, wanted: list[str], extra: list[str] = ()) -> tuple[list[str], list[list[str]]]:
    """A table whose columns are a random subset (usually all) of ``wanted`` plus a few others, in any order."""
    keep = draw(st.lists(st.sampled_from(wanted), unique=True, min_size=len(wanted) - 1, max_size=len(wanted)))
    others = draw(st.lists(st.sampled_from([*extra, "junk", " image_id", "IMAGE_ID", ""]), max_size=2))
    columns = draw(st.permutations(keep + others))
    n = draw(st.integers(0, 8))
    # ids are drawn from a small pool so duplicates, clashes and shared subjects happen
    pool = draw(st.lists(CELLS, min_size=1, max_size=4))
    rows = [[draw(st.one_of(st.sampled_from(pool), CELLS)) for _ in columns] for _ in range(n)]
    return list(columns), rows


# ---------------------------------------------------------------------------------------------- image loader
def _encoded_examples() -> dict[str, bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    out = {}
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg"), ("GIF", ".gif"), ("BMP", ".bmp"), ("TIFF", ".tif"),
                        ("WEBP", ".webp")):
        buf = io.BytesIO()
        img.save(buf, fmt)
        out[suffix] = buf.getvalue()
    return out


ENCODED = _encoded_examples()


def _load_image_property(data: bytes, suffix: str) -> None:
    from gestalt_xai.data.images import load_image

    with scratch() as d:
        path = d / f"photo{suffix}"
        path.write_bytes(data)
        try:
            rgb = load_image(path, max_pixels=4_000_000)
        except InputError as exc:
            assert names_file(exc, path), exc
            return
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and min(rgb.shape[:2]) >= 1


@settings(max_examples=EXAMPLES)
@given(data=st.binary(max_size=300), suffix=st.sampled_from(list(ENCODED) + [".jpeg", ".heic", ""]))
def test_image_loader_any_bytes(data: bytes, suffix: str) -> None:
    _load_image_property(data, suffix)


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few byte edits: overwrite, insert, delete, truncate (headers are where it hurts)."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "set_head", "insert", "delete", "truncate"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "set_head":
            at = draw(st.integers(0, min(64, len(data) - 1)))
        if kind in ("set", "set_head"):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at: at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


@settings(max_examples=2 * EXAMPLES)
@given(data=st.data(), suffix=st.sampled_from(list(ENCODED)))
def test_image_loader_mutated_images(data: st.DataObject, suffix: str) -> None:
    _load_image_property(data.draw(mutated(ENCODED[suffix])), suffix)


# -------------------------------------------------------------------------------------------- cohort readers
def _column(columns: list[str], rows: list[list[str]], name: str) -> set[str] | None:
    """The values of every column the readers take for ``name`` (header cells are stripped); ``None`` when a cell
    holds a carriage return, which pandas' parser may take for a line end even inside quotes (more rows)."""
    if any("\r" in cell for row in [columns, *rows] for cell in row):
        return None
    return {r[i].strip() for i, c in enumerate(columns) if c.strip() == name for r in rows}


def _check_cohort(cohort, root: Path, ids_given: set[str] | None) -> None:  # noqa: ANN001
    images = cohort.images
    assert images["image_id"].is_unique
    if ids_given is not None:  # the reader invents no image
        assert set(images["image_id"]) | set(cohort.rejected["image_id"]) <= ids_given | {""}
    for p in images["path"]:
        assert Path(p).is_relative_to(root.resolve())


@settings(max_examples=EXAMPLES)
@given(table=tables(["image_id", "path", "subject_id", "syndrome_id"], ["sex", "age", "ancestry"]))
def test_plain_cohort_table_any_table(table: tuple[list[str], list[list[str]]]) -> None:
    from gestalt_xai.data.cohort import load_table

    columns, rows = table
    with scratch() as d:
        path = d / "cohort.csv"
        path.write_text(table_text(columns, rows), encoding="utf-8")
        try:
            cohort = load_table(path)
        except GestaltXAIError as exc:
            assert names_file(exc, path), exc
            return
        _check_cohort(cohort, d, _column(columns, rows, "image_id"))


@settings(max_examples=EXAMPLES)
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8"))))
def test_plain_cohort_table_any_bytes(data: bytes) -> None:
    from gestalt_xai.data.cohort import load_table

    with scratch() as d:
        path = d / "cohort.csv"
        path.write_bytes(b"image_id,path,subject_id,syndrome_id\n" + data if data[:1] == b"\x01" else data)
        try:
            load_table(path)
        except GestaltXAIError as exc:
            assert names_file(exc, path), exc


SETS = ["train", "val", "test", "frequent_gallery", "frequent_test", "rare_gallery", "rare_test"]


@settings(max_examples=EXAMPLES)
@given(sets=st.lists(st.sampled_from(SETS), min_size=1, max_size=3, unique=True),
       data=st.data(),
       syndromes=st.one_of(st.none(), tables(["syndrome_id", "syndrome_name"], ["OMIM"])),
       metadata=st.one_of(st.none(), tables(["image_id"], ["sex", "age", "ancestry", "Sex"])),
       lookup=st.one_of(st.none(), st.text(max_size=40),
                        st.lists(st.one_of(CELLS, st.integers(), st.floats())).map(lambda v: "h\n" + json.dumps(v)),
                        st.binary(max_size=40)),
       pattern=st.sampled_from(["{image_id}.jpg", "{image_id}", "sub/{image_id}.png", "../{image_id}.jpg"]))
def test_gmdb_folder_any_tables(sets, data, syndromes, metadata, lookup, pattern) -> None:  # noqa: ANN001
    from gestalt_xai.data.cohort import load_gmdb

    with scratch() as d:
        ids: set[str] | None = set()
        for set_name in sets:
            columns, rows = data.draw(tables(["image_id", "subject", "label"], ["split"]))
            found = _column(columns, rows, "image_id")
            ids = None if ids is None or found is None else ids | found
            (d / f"gmdb_{set_name}_images_v1.csv").write_text(table_text(columns, rows), encoding="utf-8")
        if syndromes is not None:
            (d / "gmdb_syndromes_v1.tsv").write_text(table_text(*syndromes, sep="\t"), encoding="utf-8")
        if metadata is not None:
            (d / "image_metadata_v1.tsv").write_text(table_text(*metadata, sep="\t"), encoding="utf-8")
        if lookup is not None:
            target = d / "lookup_table_gmdb_v1.txt"
            target.write_bytes(lookup) if isinstance(lookup, bytes) else target.write_text(lookup, encoding="utf-8")
        try:
            cohort = load_gmdb(d, pattern=pattern)
        except GestaltXAIError as exc:
            assert names_file(exc, d), exc
            return
        _check_cohort(cohort, d / "images", ids)
        assert ids is None or set(cohort.splits["image_id"]) <= ids
        assert cohort.lookup is None or all(isinstance(v, str) for v in cohort.lookup)


@settings(max_examples=EXAMPLES // 2)
@given(pattern=st.one_of(st.text(max_size=12), st.sampled_from(["{}", "{0}", "{x}", "{image_id!z}", "{image_id:>"])))
def test_gmdb_image_pattern_is_a_config_error_naming_it(pattern: str) -> None:
    from gestalt_xai.data.cohort import load_gmdb

    with scratch() as d:
        (d / "gmdb_train_images_v1.csv").write_text("image_id,subject,label\n1,2,3\n", encoding="utf-8")
        try:
            load_gmdb(d, pattern=pattern)
        except ConfigError as exc:
            assert "pattern" in str(exc), exc
        except InputError as exc:
            assert names_file(exc, d), exc


# ------------------------------------------------------------------------------------------- landmark tables
KP = [f"kp{i}_{a}" for i in range(1, 6) for a in "xy"]
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**6, 10**6).map(str),
                    CELLS)


@st.composite
def landmark_tables(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    key = draw(st.sampled_from(["img", "image_id", "IMG"]))
    columns = [key, *draw(st.lists(st.sampled_from(KP), min_size=8, max_size=10, unique=True))]
    columns += draw(st.sampled_from([[], [f"p{j}_{a}" for j in range(68) for a in "xy"], ["bbox_x1", "p0_x"]]))
    n = draw(st.integers(0, 6))
    rows = [[draw(CELLS)] + [draw(NUMBERS) for _ in columns[1:]] for _ in range(n)]
    return columns, rows


@settings(max_examples=EXAMPLES)
@given(table=st.one_of(landmark_tables(), st.binary(max_size=200)))
def test_landmark_table_any_table(table) -> None:  # noqa: ANN001
    from gestalt_xai.faces.stage import read_landmark_table

    with scratch() as d:
        path = d / "face_coords.csv"
        if isinstance(table, bytes):
            path.write_bytes(table)
        else:
            path.write_text(table_text(*table), encoding="utf-8")
        try:
            out = read_landmark_table(path)
        except InputError as exc:
            assert names_file(exc, path), exc
            return
        for image_id, entry in out.items():
            assert isinstance(image_id, str)
            assert entry["lm5"].shape == (5, 2) and entry["lm5"].dtype == np.float64
            assert "lm68" not in entry or entry["lm68"].shape == (68, 2)


# ------------------------------------------------------------------------------------ checkpoint detection
@settings(max_examples=EXAMPLES)
@given(data=st.one_of(st.binary(max_size=64), st.sampled_from([b"PK\x03\x04", b"\x80\x02", b"\x08\x07\x12", b""])),
       name=st.one_of(st.sampled_from(["m.pt", "m.pth", "m.onnx", "m.bin", "m.ckpt", "m.safetensors", "m.json", "m",
                                       "m.PT", ".pt", "m.zip"]),
                      st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="/\\"), min_size=1,
                              max_size=12)),
       kind=st.sampled_from(["file", "folder", "missing"]))
def test_checkpoint_format_detection_any_file(data: bytes, name: str, kind: str) -> None:
    from gestalt_xai.models.checkpoints import CHECKPOINT_FORMATS, detect_format

    with scratch() as d:
        path = d / name
        try:
            if kind == "file":
                path.write_bytes(data)
            elif kind == "folder":
                path.mkdir()
        except (OSError, ValueError):  # a name this file system cannot hold: the path alone is still detected
            pass
        try:
            assert detect_format(path) in CHECKPOINT_FORMATS
        except CheckpointError as exc:
            assert names_file(exc, path) or repr(str(path)) in str(exc), exc


# ---------------------------------------------------------------------------------------------- pipelines
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True), CELLS),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(CELLS, inner, max_size=3)),
    max_leaves=8,
)
WORDS = st.sampled_from(["label", "topk:3", "topk:0", "topk:-2", "nearest:2", "nearest:x", "centroid", "logit", "pair",
                         "gradcam", "occlusion", "saliency", "max-abs", "run", "test", "all", "protocol", "{run}",
                         "cuda", "cpu", "r18", "mtcnn", "retinaface", "train", "A,B", "S01"])


def _stage_names() -> list[str]:
    from gestalt_xai.stages import load_stages

    return list(load_stages())


@st.composite
def stage_items(draw: st.DrawFn) -> dict:
    from gestalt_xai.stages import load_stages

    stages = load_stages()
    name = draw(st.one_of(st.sampled_from(list(stages)), CELLS))
    fields = list(stages[name].options.model_fields) if name in stages else []
    keys = draw(st.lists(st.one_of(st.sampled_from(fields or ["x"]), st.just("id"), CELLS), max_size=4, unique=True))
    value = st.one_of(WORDS, st.lists(WORDS, max_size=3), JSONISH)
    options = {k: draw(value) for k in keys}
    return {name: draw(st.one_of(st.just(options), st.none(), JSONISH))}


@st.composite
def pipelines(draw: st.DrawFn) -> object:
    doc = {"name": draw(st.one_of(st.just("study"), JSONISH)),
           "stages": draw(st.one_of(st.lists(stage_items(), max_size=4), JSONISH))}
    if draw(st.booleans()):
        doc["seed"] = draw(st.one_of(st.integers(-10**30, 10**30), JSONISH))
    if draw(st.booleans()):
        doc[draw(CELLS)] = draw(JSONISH)
    return draw(st.one_of(st.just(doc), JSONISH))


def _pipeline_property(path: Path) -> None:
    from gestalt_xai.config import load_pipeline
    from gestalt_xai.study import plan_study

    try:
        pipeline = load_pipeline(path)
        plan = plan_study(pipeline, where=str(path))
    except ConfigError as exc:
        assert names_file(exc, path), exc
        return
    assert len(plan) == len(pipeline.stages) and len({step.id for step in plan}) == len(plan)


@settings(max_examples=2 * EXAMPLES)
@given(doc=pipelines())
def test_pipeline_any_structure(doc: object) -> None:
    with scratch() as d:
        path = d / "study.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        _pipeline_property(path)


@settings(max_examples=EXAMPLES)
@given(data=st.one_of(st.binary(max_size=120), st.text(max_size=120).map(lambda t: t.encode("utf-8")),
                      st.sampled_from([b"[" * 2000, b"a: &x [1]\nb: *y\n", b"\xff\xfe",
                                       b"stages: !!python/object:os.system x",
                                       b"name: x\nstages:\n  - align: {images: x, cohort: y}\n"])))
def test_pipeline_any_bytes(data: bytes) -> None:
    with scratch() as d:
        path = d / "study.yaml"
        path.write_bytes(data)
        _pipeline_property(path)


@settings(max_examples=EXAMPLES)
@given(name=st.sampled_from(_stage_names()), options=st.one_of(JSONISH, st.dictionaries(CELLS, JSONISH, max_size=3)))
def test_stage_options_any_values(name: str, options: object) -> None:
    from gestalt_xai.stages import get_stage

    try:
        get_stage(name).validate(options, where=f"stages[0].{name}")
    except ConfigError as exc:
        assert f"stages[0].{name}" in str(exc) or name in str(exc), exc


@pytest.mark.parametrize("bad", ["name: [", "- a\n- b\n", "name: x\nstages: []\n"])
def test_pipeline_errors_name_the_file(tmp_path: Path, bad: str) -> None:
    from gestalt_xai.config import load_pipeline

    path = tmp_path / "study.yaml"
    path.write_text(bad, encoding="utf-8")
    with pytest.raises(ConfigError, match="study.yaml"):
        load_pipeline(path)
