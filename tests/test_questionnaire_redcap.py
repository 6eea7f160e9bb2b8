"""REDCap data dictionary of the default questionnaire: valid by REDCap's documented rules, the same bytes for the
same seed, another order and blinding for another seed; the validator catches each rule broken on purpose."""

from __future__ import annotations

from pathlib import Path

import pytest

from gestalt_xai.export.blinding import blinding_key
from gestalt_xai.export.questionnaire_def import load_questionnaire
from gestalt_xai.export.redcap import COLUMNS, data_dictionary, dictionary_csv, validate_data_dictionary

DEFAULT = Path(__file__).resolve().parents[1] / "questionnaires" / "default.yaml"
CASES = [f"C-CASE{i:06d}" for i in range(8)]


def _export(seed: int = 0) -> tuple[bytes, object]:
    q = load_questionnaire(DEFAULT).model_copy(update={"seed": seed})
    key = blinding_key(q, CASES)
    return dictionary_csv(data_dictionary(q, key)), key


def test_default_dictionary_is_valid_and_laid_out_for_redcap() -> None:
    raw, key = _export()
    assert raw.startswith(b"\xef\xbb\xbf") and validate_data_dictionary(raw) == []
    table = data_dictionary(load_questionnaire(DEFAULT), key)
    assert list(table.columns) == COLUMNS and len(COLUMNS) == 18
    assert table["Variable / Field Name"].iloc[0] == "record_id"
    forms = list(dict.fromkeys(table["Form Name"]))
    assert forms[0] == "gxai_eval_rater" and forms[-1] == "gxai_eval_scs" and len(forms) == 2 + len(CASES)
    # one Likert matrix per shown map: three statements sharing the five agreement choices
    lik = table[table["Matrix Group Name"] == "c01_lik_a"]
    assert len(lik) == 3 and lik["Choices, Calculations, OR Slider Labels"].nunique() == 1
    assert (table["Matrix Group Name"] == "scs").sum() == 10
    regions = table.loc[table["Variable / Field Name"] == "c01_regions"].iloc[0]
    assert regions["Field Type"] == "checkbox" and "HP:0000288" in regions["Choices, Calculations, OR Slider Labels"]
    # the rater sees pseudonyms and letters only
    text = raw.decode("utf-8-sig")
    assert all(c in text for c in CASES)
    assert not any(m in text.lower() for m in ("gradcam", "lrp", "occlusion", "saliency"))


def test_same_seed_same_bytes_other_seed_other_order_and_blinding() -> None:
    a, key_a = _export(0)
    b, key_b = _export(0)
    c, key_c = _export(1)
    assert a == b and key_a.equals(key_b)
    assert a != c
    order = lambda k: list(k.drop_duplicates("case_no")["pseudonym"])  # noqa: E731
    assert order(key_a) != order(key_c) or not key_a[["pseudonym", "label", "method"]].equals(
        key_c[["pseudonym", "label", "method"]])
    # the preference pair holds A and B in every case; three maps per case; each case appears once
    assert all(labels == ["A", "B", "C"] for labels in key_a.groupby("case_no")["label"].apply(list))
    assert set(key_a.loc[key_a["label"].isin(["A", "B"]), "method"]) == {"gradcam", "lrp"}
    assert key_a.loc[key_a["label"] == "C", "method"].isin(["occlusion", "saliency"]).all()
    assert sorted(order(key_a)) == sorted(CASES)


def test_blinding_varies_across_cases_and_seeds() -> None:
    # over several seeds, which method is A varies (a fixed A = gradcam would unblind the study)
    firsts = {tuple(_export(s)[1].loc[lambda k: k["label"] == "A", "method"]) for s in range(4)}
    assert len(firsts) > 1 and any(len(set(f)) == 2 for f in firsts)


@pytest.mark.parametrize(("column", "row", "value", "message"), [
    ("Variable / Field Name", 0, "participant_id", "first field must be the record id"),
    ("Variable / Field Name", 3, "Experience", "variable names are lowercase"),
    ("Variable / Field Name", 3, "x" * 27, "at most 26 characters"),
    ("Variable / Field Name", 3, "specialty", "defined more than once"),
    ("Field Type", 3, "textbox", "unknown field type"),
    ("Choices, Calculations, OR Slider Labels", 1, "1 Clinical genetics | 2, Other", "choices must read"),
    ("Choices, Calculations, OR Slider Labels", 1, "1, A | 1, B", "choice codes repeat"),
    ("Text Validation Type OR Show Slider Number", 2, "integr", "unknown text validation"),
    ("Required Field?", 1, "yes", "must be 'y' or blank"),
    ("Form Name", 3, "Case 1", "form name"),
])
def test_validator_catches_each_broken_rule(column, row, value, message) -> None:
    table = data_dictionary(load_questionnaire(DEFAULT), blinding_key(load_questionnaire(DEFAULT), CASES))
    table.loc[row, column] = value
    problems = validate_data_dictionary(table)
    assert any(message in p for p in problems), problems


def test_validator_catches_broken_matrix_groups_and_columns() -> None:
    q = load_questionnaire(DEFAULT)
    table = data_dictionary(q, blinding_key(q, CASES))
    rows = table.index[table["Matrix Group Name"] == "c01_lik_a"]
    broken = table.copy()
    broken.loc[rows[1], "Choices, Calculations, OR Slider Labels"] = "1, No | 2, Yes"
    assert any("share the same choices" in p for p in validate_data_dictionary(broken))
    moved = table.copy()
    moved.loc[rows[-1] + 3, "Matrix Group Name"] = "c01_lik_a"  # the last row of map B's matrix: a gap of two
    assert any("not consecutive" in p for p in validate_data_dictionary(moved))
    assert "columns must be the 18" in validate_data_dictionary(table.iloc[:, ::-1])[0]
    forms = table.copy()
    forms.loc[len(forms)] = {**forms.iloc[1].to_dict(), "Variable / Field Name": "late", "Form Name": "gxai_eval_rater"}
    assert any("not together" in p for p in validate_data_dictionary(forms))


def test_analyst_key_is_written_apart_and_complete(tmp_path) -> None:
    import pandas as pd

    from gestalt_xai.export.blinding import write_analyst_key
    from gestalt_xai.export.redcap import REGION_GROUPS
    from gestalt_xai.runs import Run

    run = Run(tmp_path / "run")
    table = run.pseudonyms(seed=0).table("syndrome", [f"S{i:02d}" for i in range(10)])
    cases = table
    q = load_questionnaire(DEFAULT)
    key = blinding_key(q, list(cases["pseudonym"])[:8])
    paths = write_analyst_key(run.path / "private" / "questionnaire", key, cases, REGION_GROUPS)
    back = pd.read_csv(paths["cases_key"])
    assert len(back) == 8 and set(back["pseudonym"]) == set(key["pseudonym"])  # only the exported cases
    assert pd.read_csv(paths["blinding_key"]).equals(key)
    assert list(pd.read_csv(paths["regions_key"])["region_group"]) == list(REGION_GROUPS)
    raw = dictionary_csv(data_dictionary(q, key)).decode("utf-8-sig")
    assert not any(r in raw for r in back["raw_id"])  # the dictionary names no raw id
    with pytest.raises(ValueError, match="no entry in the pseudonym table"):
        write_analyst_key(tmp_path, key, cases.iloc[:3], REGION_GROUPS)
