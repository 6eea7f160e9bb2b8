"""LimeSurvey response exports: translated into the REDCap layout and un-blinded to the same answers."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from gestalt_xai.errors import InputError
from gestalt_xai.export.blinding import blinding_key
from gestalt_xai.export.limesurvey_responses import limesurvey_column, read_limesurvey_export
from gestalt_xai.export.questionnaire_def import load_questionnaire
from gestalt_xai.export.questionnaire_responses import AnalystKey, read_redcap_export
from gestalt_xai.export.redcap import REGION_GROUPS
from gestalt_xai.export.simulate_responses import simulate_redcap_export

ROOT = Path(__file__).resolve().parents[1]


def _setup(tmp_path):
    q = load_questionnaire(ROOT / "questionnaires" / "default.yaml")
    blinding = blinding_key(q, ["D-AAAA", "D-BBBB", "D-CCCC"])
    key = AnalystKey(blinding, pd.DataFrame({"pseudonym": ["D-AAAA", "D-BBBB", "D-CCCC"], "raw_id": ["x", "y", "z"]}),
                     pd.DataFrame({"code": [str(i) for i in range(1, len(REGION_GROUPS) + 1)],
                                   "region_group": list(REGION_GROUPS)}), tmp_path)
    redcap = tmp_path / "redcap.csv"
    simulate_redcap_export(q, blinding, 4, seed=2, path=redcap)
    return q, key, redcap


def _as_limesurvey(q, redcap: Path, out: Path, ticked: str = "Y") -> Path:
    """What LimeSurvey would export for the same answers (question-code headings, answer codes)."""
    table = pd.read_csv(redcap, dtype=str, keep_default_na=False)
    ls = {"id": table["record_id"], "submitdate": "2026-01-01 10:00:00", "lastpage": "5", "startlanguage": "en",
          "seed": "123"}
    for col in table.columns[1:]:
        name = limesurvey_column(col, q)
        if name is None:
            continue
        v = table[col]
        if "___" in col:
            v = v.map({"1": ticked, "0": ""})
        elif any(name.startswith(p) for p in ("scs[", "specialty")) or "lik" in name or name.endswith("pref"):
            v = v.map(lambda x: f"A{x}" if x else "")
        ls[name] = v
    pd.DataFrame(ls).to_csv(out, index=False, quoting=csv.QUOTE_ALL)
    return out


@pytest.mark.parametrize("ticked", ["Y", "1"])
def test_a_limesurvey_export_gives_the_same_answers_as_the_redcap_export(tmp_path, ticked) -> None:
    q, key, redcap = _setup(tmp_path)
    a = read_redcap_export(redcap, q, key)
    b = read_limesurvey_export(_as_limesurvey(q, redcap, tmp_path / "ls.csv", ticked), q, key)
    for name in ("likert", "preference", "regions", "diagnosis", "comments", "scs"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_dtype=False, obj=name)
    assert not b.regions.empty and not b.preference.empty
    assert (b.preference["preferred"].isin(list(q.maps.methods) + ["none"])).all()


def test_bad_limesurvey_exports_fail_naming_the_file_and_problem(tmp_path) -> None:
    q, key, redcap = _setup(tmp_path)
    good = _as_limesurvey(q, redcap, tmp_path / "ls.csv")
    t = pd.read_csv(good, dtype=str, keep_default_na=False)
    t.drop(columns=["c02pref"]).to_csv(tmp_path / "missing.csv", index=False)
    with pytest.raises(InputError, match=r"missing\.csv: column 'c02pref' missing"):
        read_limesurvey_export(tmp_path / "missing.csv", q, key)
    t.assign(c01pref="Map A").to_csv(tmp_path / "fulltext.csv", index=False)
    with pytest.raises(InputError, match=r"fulltext\.csv: column 'c01_pref' holds unknown choice codes"):
        read_limesurvey_export(tmp_path / "fulltext.csv", q, key)
    t.assign(**{"c01regions[R2]": "Yes"}).to_csv(tmp_path / "ticks.csv", index=False)
    with pytest.raises(InputError, match=r"ticks\.csv: multiple-choice column 'c01regions\[R2\]'"):
        read_limesurvey_export(tmp_path / "ticks.csv", q, key)
    redcap.rename(tmp_path / "redcap_as_ls.csv")
    with pytest.raises(InputError, match="not a LimeSurvey response export"):
        read_limesurvey_export(tmp_path / "redcap_as_ls.csv", q, key)
