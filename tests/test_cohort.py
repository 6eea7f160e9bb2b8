"""Cohort tables: GMDB format round trip, subject-level splits, frequent/rare protocol, path safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from gestalt_xai.data.cohort import (
    N_RARE_SPLITS,
    frequency_class,
    gmdb_splits,
    load_cohort,
    load_gmdb,
    load_table,
    write_gmdb,
)
from gestalt_xai.errors import ConfigError, InputError


def _cohort_frame() -> pd.DataFrame:
    """3 frequent syndromes (10, 8, 7 subjects), 2 rare (4, 2 subjects), 1 single; 2 images per subject."""
    rows = []
    sizes = {"101": 10, "102": 8, "103": 7, "201": 4, "202": 2, "301": 1}
    for syn, n in sizes.items():
        for s in range(n):
            for k in range(2):
                rows.append({"image_id": f"{syn}{s:02d}{k}", "subject_id": f"s{syn}_{s}", "syndrome_id": syn,
                             "sex": "F" if s % 2 else "M", "age": str(s)})
    return pd.DataFrame(rows)


def test_frequency_classes() -> None:
    assert [frequency_class(n) for n in (1, 2, 6, 7, 30)] == ["single", "rare", "rare", "frequent", "frequent"]


def test_splits_are_subject_level_and_follow_protocol() -> None:
    images = _cohort_frame()
    splits = gmdb_splits(images, seed=3)
    subj = images.set_index("image_id")["subject_id"]
    syn = images.set_index("image_id")["syndrome_id"]
    sets = {s: set(subj[splits.loc[splits["set"] == s, "image_id"]]) for s in ("train", "val", "test")}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"]) and not (sets["val"] & sets["test"])
    # every frequent syndrome is in train and test; rare and single ones are not
    train_syn = set(syn[splits.loc[splits["set"] == "train", "image_id"]])
    assert train_syn == {"101", "102", "103"}
    test_syn = set(syn[splits.loc[splits["set"] == "test", "image_id"]])
    assert test_syn == {"101", "102", "103"}
    fg = set(splits.loc[splits["set"] == "frequent_gallery", "image_id"])
    tv = set(splits.loc[splits["set"].isin(["train", "val"]), "image_id"])
    assert fg == tv
    # rare: 10 splits, exactly one test subject per rare disorder per split, never also in that split's gallery
    rare = splits[splits["set"].str.startswith("rare")]
    assert sorted(rare["split"].unique()) == list(range(N_RARE_SPLITS))
    for k in range(N_RARE_SPLITS):
        test = rare[(rare["split"] == k) & (rare["set"] == "rare_test")]
        gal = rare[(rare["split"] == k) & (rare["set"] == "rare_gallery")]
        per_syn = test.assign(s=subj[test["image_id"]].to_numpy(), y=syn[test["image_id"]].to_numpy())
        assert per_syn.groupby("y")["s"].nunique().to_dict() == {"201": 1, "202": 1}
        assert not set(subj[test["image_id"]]) & set(subj[gal["image_id"]])
    assert "301" not in set(syn[splits["image_id"]])  # single-subject disorders are in no protocol set
    # the 2-subject disorder alternates its test subject over splits
    held = {int(k): set(subj[g["image_id"]]) for k, g in rare[(rare["set"] == "rare_test")].groupby("split")}
    assert len({frozenset(v) for v in held.values()}) >= 2
    pd.testing.assert_frame_equal(splits, gmdb_splits(images, seed=3))
    assert not splits.equals(gmdb_splits(images, seed=4))


def test_gmdb_round_trip(tmp_path: Path) -> None:
    images = _cohort_frame()
    (tmp_path / "images").mkdir()
    for i in images["image_id"]:
        (tmp_path / "images" / f"{i}.jpg").write_bytes(b"x")
    syndromes = pd.DataFrame({"syndrome_id": ["101", "102", "103", "201", "202", "301"],
                              "syndrome_name": ["A", "B", "C", "D", "E", "F"], "omim": ["1", "2", "3", "", "", ""]})
    cohort = write_gmdb(tmp_path, images, syndromes, version="v9.9", seed=0)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert "gmdb_rare_test_images_v9.9.csv" in names and "lookup_table_gmdb_v9.9.txt" in names
    assert "image_metadata_v9.9.tsv" in names and "gmdb_syndromes_v9.9.tsv" in names
    rare_csv = pd.read_csv(tmp_path / "gmdb_rare_gallery_images_v9.9.csv")
    assert list(rare_csv.columns) == ["image_id", "subject", "label", "split"]
    assert list(pd.read_csv(tmp_path / "gmdb_train_images_v9.9.csv").columns) == ["image_id", "subject", "label"]
    syn = pd.read_csv(tmp_path / "gmdb_syndromes_v9.9.tsv", sep="\t")
    assert list(syn.columns) == ["syndrome_id", "syndrome_name", "image_ids", "subject_ids", "num_of_images",
                                 "num_of_subjects", "train", "OMIM"]
    assert syn.set_index("syndrome_id").loc[201, "num_of_subjects"] == 4
    lines = (tmp_path / "lookup_table_gmdb_v9.9.txt").read_text().splitlines()
    assert json.loads(lines[1]) == ["101", "102", "103"]
    assert cohort.lookup == ["101", "102", "103"]
    # the single-subject disorder is in no GMDB file, so it is not part of the cohort read back
    assert set(cohort.images["syndrome_id"]) == {"101", "102", "103", "201", "202"}
    assert {"sex", "age"} <= set(cohort.images.columns)
    again = load_cohort(tmp_path / "gmdb_train_images_v9.9.csv")  # one file names the folder and the version
    pd.testing.assert_frame_equal(again.images, cohort.images)
    assert all(Path(p).is_file() for p in cohort.images["path"])


def test_gmdb_integer_ids_and_versions(tmp_path: Path) -> None:
    for v in ("v1.0.3", "v1.1.0"):
        pd.DataFrame({"image_id": [1, 2], "subject": [10, 11], "label": [5, 5]}).to_csv(
            tmp_path / f"gmdb_train_images_{v}.csv", index=False)
    with pytest.raises(ConfigError, match="several GMDB versions"):
        load_gmdb(tmp_path, tmp_path)
    c = load_gmdb(tmp_path, tmp_path, version="v1.1.0")
    assert c.images["image_id"].tolist() == ["1", "2"] and c.images["syndrome_id"].tolist() == ["5", "5"]
    assert c.version == "v1.1.0"
    with pytest.raises(ConfigError, match="v2"):
        load_gmdb(tmp_path, tmp_path, version="v2")


def test_path_escapes_rejected_per_row(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.jpg").write_bytes(b"x")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "link.jpg")
    table = pd.DataFrame({
        "image_id": ["ok", "dots", "abs", "link"],
        "path": ["ok.jpg", "../secret.jpg", str(outside), "link.jpg"],
        "subject_id": ["a", "b", "c", "d"], "syndrome_id": ["1", "1", "1", "1"],
    })
    table.to_csv(root / "cohort.csv", index=False)
    c = load_table(root / "cohort.csv")
    assert c.images["image_id"].tolist() == ["ok"]
    assert sorted(c.rejected["image_id"]) == ["abs", "dots", "link"]
    assert all("outside the image root" in m for m in c.rejected["message"])


def test_plain_table_errors(tmp_path: Path) -> None:
    pd.DataFrame({"image_id": ["a"], "path": ["a.jpg"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match="missing column.*subject_id"):
        load_table(tmp_path / "t.csv")
    pd.DataFrame({"image_id": ["a", "a"], "path": ["a.jpg", "b.jpg"], "subject_id": ["s", "t"],
                  "syndrome_id": ["1", "1"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match="duplicate image_id"):
        load_table(tmp_path / "t.csv")
    with pytest.raises(InputError, match="not found"):
        load_cohort(tmp_path / "nope.csv")


def test_subject_with_two_syndromes_is_refused() -> None:
    df = pd.DataFrame({"image_id": ["a", "b"], "subject_id": ["s", "s"], "syndrome_id": ["1", "2"]})
    with pytest.raises(InputError, match="several syndromes"):
        gmdb_splits(df)


# --------------------------------------------------------------------- bad tables (tests/test_properties.py finds)
def test_unusable_rows_are_rejected_one_message_each(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.jpg").write_bytes(b"x")
    os.symlink("loop.jpg", root / "loop.jpg")
    text = ("image_id,path,subject_id,syndrome_id\n"
            "ok,ok.jpg,a,1\nloop,loop.jpg,b,1\nnopath,,c,1\nshort,\n../up,x.jpg,d,1\n..,y.jpg,e,1\n")
    (root / "cohort.csv").write_text(text, encoding="utf-8")
    c = load_table(root / "cohort.csv")
    assert c.images["image_id"].tolist() == ["ok"]
    msg = c.rejected.set_index("image_id")["message"]
    assert sorted(msg.index) == ["..", "../up", "loop", "nopath", "short"]
    assert "'loop.jpg'" in msg["loop"] and "symbolic link loop" in msg["loop"]
    assert msg["nopath"] == "image 'nopath' has no path" and msg["short"] == "image 'short' has no path"
    assert "path separator" in msg["../up"] and "cannot name a file" in msg[".."]


@pytest.mark.parametrize("text,match", [
    ("", "cannot read table"),
    ("image_id,path,subject_id,syndrome_id, image_id\na,a.jpg,s,1,b\n", "column.*'image_id' appear more than once"),
    ('image_id,path,subject_id,syndrome_id\n"a,a.jpg,s,1\n', "cannot read table"),
])
def test_unreadable_plain_tables_name_the_file(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "t.csv").write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=match) as info:
        load_table(tmp_path / "t.csv")
    assert str(tmp_path / "t.csv") in str(info.value)
    (tmp_path / "b.csv").write_bytes(b"image_id,path,subject_id,syndrome_id\n\xff\xfe,a,b,c\n")
    with pytest.raises(InputError, match="b.csv: cannot read table"):
        load_table(tmp_path / "b.csv")


def test_unreadable_gmdb_files_name_the_file(tmp_path: Path) -> None:
    train = tmp_path / "gmdb_rare_gallery_images_v1.csv"
    train.write_text("image_id,subject,label,split\n1,10,5,0\n2,11,5,x\n", encoding="utf-8")
    with pytest.raises(InputError, match=f"{train}: column split: 'x' is not a split number"):
        load_gmdb(tmp_path)
    train.write_text("image_id,subject,label,split\n1,10,5,0\n2,11,5,1.0\n", encoding="utf-8")
    assert load_gmdb(tmp_path).splits["split"].tolist() == [0, 1]
    meta = tmp_path / "image_metadata_v1.tsv"
    meta.write_text("image_id\tsex\n1\tF\n1\tM\n", encoding="utf-8")
    with pytest.raises(InputError, match=f"{meta}: image.*1 have several rows"):
        load_gmdb(tmp_path)
    meta.write_text("image_id\tSex\tsex\n1\tF\tM\n", encoding="utf-8")
    with pytest.raises(InputError, match="'sex' appear more than once"):
        load_gmdb(tmp_path)
    meta.unlink()
    lookup = tmp_path / "lookup_table_gmdb_v1.txt"
    for data in (b"header\n\xff\xfe[1]", b"header\n" + b"[" * 5000 + b"]" * 5000, b"header\n{\"a\": 1}"):
        lookup.write_bytes(data)
        with pytest.raises(InputError, match=str(lookup)):
            load_gmdb(tmp_path)


@pytest.mark.parametrize("pattern", ["{id}.jpg", "{0}.jpg", "{image_id", "{image_id.x}"])
def test_broken_image_pattern_is_a_config_error(tmp_path: Path, pattern: str) -> None:
    (tmp_path / "gmdb_train_images_v1.csv").write_text("image_id,subject,label\n1,10,5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="pattern: .* is not an image file name pattern"):
        load_gmdb(tmp_path, pattern=pattern)


def test_consent_to_publish_is_read_and_defaults_to_not_showable(tmp_path: Path) -> None:
    from gestalt_xai.data.cohort import load_run_cohort, save_run_cohort
    from gestalt_xai.runs import Run

    images = _cohort_frame()
    syndromes = pd.DataFrame({"syndrome_id": sorted(images["syndrome_id"].unique())}).assign(
        syndrome_name=lambda d: d["syndrome_id"])
    # no consent column anywhere: nothing is showable
    plain = write_gmdb(tmp_path / "none", images, syndromes, version="v1", seed=0)
    assert plain.images["consent_to_publish"].dtype == bool and not plain.images["consent_to_publish"].any()
    # written by write_gmdb, read back through image_metadata_<version>.tsv
    given = images.assign(consent_to_publish=[i.endswith("0") for i in images["image_id"]])
    back = write_gmdb(tmp_path / "given", given, syndromes, version="v1", seed=0)
    expected = back.images["image_id"].str.endswith("0")
    assert back.images["consent_to_publish"].tolist() == expected.tolist() and expected.any() and not expected.all()
    meta = pd.read_csv(tmp_path / "given" / "image_metadata_v1.tsv", sep="\t", dtype=str)
    assert "consent_to_publish" in meta.columns
    # another accepted name, any case; only an explicit yes counts; an image without a metadata row is not showable
    ids = back.images["image_id"].tolist()
    pd.DataFrame({"image_id": ids[:4], "Publishable": ["yes", "1", "no", "maybe"]}).to_csv(
        tmp_path / "given" / "image_metadata_v1.tsv", sep="\t", index=False)
    flags = load_gmdb(tmp_path / "given").images.set_index("image_id")["consent_to_publish"]
    assert flags[ids[:4]].tolist() == [True, True, False, False] and not flags[ids[4:]].any()
    # two consent columns are ambiguous: refused, naming the file
    pd.DataFrame({"image_id": ids[:1], "publishable": ["yes"], "consent_to_publish": ["no"]}).to_csv(
        tmp_path / "given" / "image_metadata_v1.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="image_metadata_v1.tsv: several consent columns"):
        load_gmdb(tmp_path / "given")
    # a plain cohort CSV, and the run's stored cohort keeps the flags
    (tmp_path / "plain" / "img").mkdir(parents=True)
    table = pd.DataFrame({"image_id": ["a", "b"], "path": ["img/a.jpg", "img/b.jpg"], "subject_id": ["s", "t"],
                          "syndrome_id": ["1", "1"], "CONSENT_TO_PUBLISH": ["True", ""]})
    table.to_csv(tmp_path / "plain" / "c.csv", index=False)
    cohort = load_table(tmp_path / "plain" / "c.csv")
    assert cohort.images["consent_to_publish"].tolist() == [True, False]
    run = Run(tmp_path / "run")
    save_run_cohort(run, cohort)
    assert load_run_cohort(run).images["consent_to_publish"].tolist() == [True, False]
    # a run stored before the column existed reads as not showable
    from dataclasses import replace

    save_run_cohort(run, replace(cohort, images=cohort.images.drop(columns="consent_to_publish")))
    assert load_run_cohort(run).images["consent_to_publish"].tolist() == [False, False]
