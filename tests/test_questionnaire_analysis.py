"""Questionnaire responses: a hand-made REDCap raw-data export with a known answer pattern gives the known preference
rates, Krippendorff alphas and region agreement; bad files fail naming the file and the problem; the simulator is
seeded, REDCap-shaped and labelled simulated."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gestalt_xai.errors import InputError
from gestalt_xai.export import questionnaire_analysis as qa
from gestalt_xai.export.blinding import blinding_key, write_analyst_key
from gestalt_xai.export.questionnaire_def import MapSelection, QuestionnaireDef, load_questionnaire
from gestalt_xai.export.questionnaire_responses import expected_columns, load_analyst_key, read_redcap_export
from gestalt_xai.export.redcap import REGION_GROUPS, data_dictionary, dictionary_csv
from gestalt_xai.export.simulate_responses import simulate_redcap_export
from gestalt_xai.faces.regions import REGIONS

DEFAULT = Path(__file__).resolve().parents[1] / "questionnaires" / "default.yaml"
CASES = ["P-1", "P-2", "P-3", "P-4"]
# the known pattern, un-blinded: per rater, per case (gradcam, lrp) plausibility and the preferred method
LIKERT = {"R1": [(5, 5), (5, 5), (4, 4), (4, 5)], "R2": [(5, 5), (5, 5), (4, 4), (5, 4)]}
PREFERRED = {"R1": ["gradcam", "gradcam", "lrp", "none"], "R2": ["gradcam", "gradcam", "gradcam", "lrp"]}
TICKS = {"R1": {1: {"nose", "philtrum", "chin_mandible"}}, "R2": {}}  # otherwise nose + philtrum on every case


def _q(seed: int = 0, per_case: int = 2) -> QuestionnaireDef:
    return QuestionnaireDef(
        name="t", title="test", seed=seed, background=None,
        maps=MapSelection(methods=["gradcam", "lrp", "occlusion"], per_case=per_case),
        case_items=[{"type": "likert", "statements": [{"id": "plaus", "text": "Plausible."}]},
                    {"type": "preference"}, {"type": "regions"}])


def _key_folder(tmp_path: Path, q: QuestionnaireDef, name: str = "private") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    key = blinding_key(q, CASES)
    write_analyst_key(folder, key, pd.DataFrame({"pseudonym": CASES, "raw_id": [f"OMIM:{i}" for i in range(1, 5)]}),
                      REGION_GROUPS)
    (folder / "dictionary.csv").write_bytes(dictionary_csv(data_dictionary(q, key)))
    return folder


def _export(q: QuestionnaireDef, key: pd.DataFrame, change=None) -> bytes:
    """The pattern as REDCap's raw-data CSV export writes it (byte-order mark, header of variable names)."""
    cols = expected_columns(q, key)
    rows = []
    for rater in ("R1", "R2"):
        row = dict.fromkeys(cols, "")
        row["record_id"] = rater
        for case_no, maps in key.groupby("case_no"):
            p, letter = f"c{case_no:02d}", dict(zip(maps["method"], maps["label"], strict=True))
            g, lrp = LIKERT[rater][case_no - 1]
            row[f"{p}_{letter['gradcam'].lower()}_plaus"], row[f"{p}_{letter['lrp'].lower()}_plaus"] = str(g), str(lrp)
            pref = PREFERRED[rater][case_no - 1]
            row[f"{p}_pref"] = "3" if pref == "none" else {"A": "1", "B": "2"}[letter[pref]]
            ticked = TICKS[rater].get(case_no, {"nose", "philtrum"})
            for code, group in enumerate(REGION_GROUPS, start=1):
                row[f"{p}_regions___{code}"] = str(int(group in ticked))
        row.update({c: "2" for c in cols if c.endswith("_complete")})
        rows.append(row)
    if change:
        change(cols, rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return b"\xef\xbb\xbf" + buf.getvalue().encode("utf-8")


@pytest.fixture
def study(tmp_path: Path):
    q = _q()
    folder = _key_folder(tmp_path, q)
    key = load_analyst_key(folder)
    path = tmp_path / "export.csv"
    path.write_bytes(_export(q, key.blinding))
    return q, key, path, folder


def test_the_known_pattern_gives_the_known_rates_and_alphas(study) -> None:
    q, key, path, folder = study
    r = read_redcap_export(path, q, key, dictionary=folder / "dictionary.csv")
    assert not r.simulated and sorted(r.likert["method"].unique()) == ["gradcam", "lrp"]
    pref = qa.preference_rates(r).iloc[0]
    assert (pref["method_first"], pref["n_first"], pref["n_second"], pref["n_none"]) == ("gradcam", 5, 2, 1)
    z, k, n = stats.norm.ppf(0.975), 5, 7  # Wilson (1927) score interval by its formula
    centre, half = (k + z * z / 2) / (n + z * z), z / (n + z * z) * np.sqrt(k * (n - k) / n + z * z / 4)
    assert pref["rate_first"] == pytest.approx(5 / 7)
    assert (pref["ci_low"], pref["ci_high"]) == pytest.approx((centre - half, centre + half))
    alpha = qa.agreement(r).set_index("what")["alpha"]
    # coincidence matrices by hand (Krippendorff 2011): two categories, so ordinal alpha = nominal alpha
    assert alpha["likert:plaus"] == pytest.approx(1 - 15 * 4 / (2 * 10 * 6))  # 0.5
    assert alpha["preference"] == pytest.approx(1 - 7 * 4 / 34)
    assert alpha["regions"] == pytest.approx(1 - 63 * 2 / (2 * 17 * 47))
    ratings = qa.method_ratings(r).set_index("method")
    assert ratings.loc["gradcam", "mean"] == pytest.approx((4.5 + 4.75) / 2)
    assert ratings.loc["gradcam", "ci_low"] <= 4.5 and ratings.loc["gradcam", "ci_high"] >= 4.75
    assert (ratings["n_raters"] == 2).all() and (ratings["n_ratings"] == 8).all()


def _region_syndromes() -> pd.DataFrame:
    rows = []
    face = [g for g in REGIONS if g != "background"]
    for syn in [f"OMIM:{i}" for i in range(1, 5)]:
        for method, hot in (("gradcam", {"nose", "philtrum"}), ("lrp", {"forehead_visible", "chin"})):
            for region in REGIONS:
                share = (0.3 if region in hot else 0.4 / (len(face) - 2)) if region != "background" else 0.0
                rows.append({"syndrome_id": syn, "model_id": "m", "method": method, "layer": "", "atlas": "template",
                             "target_group": "centroid:own", "region": region, "share": share,
                             "area_share": 1 / len(REGIONS)})
    return pd.DataFrame(rows)


def test_checklists_are_compared_with_the_models_region_groups(study) -> None:
    q, key, path, _ = study
    r = read_redcap_export(path, q, key)
    groups = qa.model_group_scores(_region_syndromes()).set_index(["unit_id", "method", "region_group"])
    # nasal_bridge + nose make the group "nose": shares and areas are summed before dividing
    other = 0.4 / (len(REGIONS) - 3)
    assert groups.loc[("OMIM:1", "gradcam", "nose"), "enrichment"] == pytest.approx(
        (0.3 + other) / (2 / len(REGIONS)))
    agree = qa.region_agreement(r, key, _region_syndromes()).set_index(["case_no", "method"])
    assert (agree.xs("gradcam", level="method")["jaccard"] == 1.0).all()
    assert (agree.xs("lrp", level="method")["jaccard"] == 0.0).all()
    assert (agree.xs("gradcam", level="method")["spearman"] > 0).all()
    with pytest.raises(InputError, match="several layers"):
        qa.model_group_scores(pd.concat([_region_syndromes(), _region_syndromes().assign(layer="x")]))
    # a second model (e.g. the random-weight control) is left out: the cases' model is the first id, or the given one
    control = _region_syndromes().assign(model_id="zz_random", share=lambda d: d["share"][::-1].to_numpy())
    both = pd.concat([_region_syndromes(), control])
    pd.testing.assert_frame_equal(qa.model_group_scores(both), qa.model_group_scores(_region_syndromes()))
    assert not qa.model_group_scores(both, model="zz_random").equals(qa.model_group_scores(_region_syndromes()))


@pytest.mark.parametrize(("change", "problem"), [
    (lambda cols, rows: cols.remove("c01_pref"), "missing ['c01_pref']"),
    (lambda cols, rows: rows[0].update(c02_pref="4"), "'c02_pref' holds unknown choice codes ['4']"),
    (lambda cols, rows: rows[1].update(c01_regions___2="2"), "checkbox column 'c01_regions___2'"),
    (lambda cols, rows: rows[1].update(record_id="R1"), "record ids must be present and unique"),
])
def test_a_bad_export_names_the_file_and_the_problem(study, change, problem) -> None:
    q, key, path, _ = study
    path.write_bytes(_export(q, key.blinding, change))
    with pytest.raises(InputError) as info:
        read_redcap_export(path, q, key)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_a_key_from_another_export_is_refused(study, tmp_path: Path) -> None:
    q, _, path, folder = study
    other = load_analyst_key(_key_folder(tmp_path, _q(seed=5), "other"))
    with pytest.raises(InputError, match="the key belongs to another export") as info:
        read_redcap_export(path, q, other, dictionary=folder / "dictionary.csv")
    assert str(folder / "dictionary.csv") in str(info.value)
    wider = load_analyst_key(_key_folder(tmp_path, _q(per_case=3), "wider"))
    with pytest.raises(InputError, match="the key may belong to another export") as info:
        read_redcap_export(path, _q(per_case=3), wider)
    assert str(path) in str(info.value)
    (folder / "regions_key.csv").write_text("code,region_group\n1,nose\n")
    with pytest.raises(InputError, match="regions_key.csv: the region codes"):
        load_analyst_key(folder)


def test_simulated_responses_are_seeded_redcap_shaped_and_labelled(tmp_path: Path) -> None:
    q = load_questionnaire(DEFAULT)
    cases = [f"S-{i}" for i in range(8)]
    folder = tmp_path / "private"
    folder.mkdir()
    key = blinding_key(q, cases)
    write_analyst_key(folder, key, pd.DataFrame({"pseudonym": cases, "raw_id": cases}), REGION_GROUPS)
    quality = {"gradcam": 1.5}
    one = simulate_redcap_export(q, key, 12, seed=3, path=tmp_path / "sim.csv", method_quality=quality)
    assert one == simulate_redcap_export(q, key, 12, seed=3, method_quality=quality)
    assert one != simulate_redcap_export(q, key, 12, seed=4, method_quality=quality)
    r = read_redcap_export(tmp_path / "sim.csv", q, load_analyst_key(folder))
    assert r.simulated and r.likert["record_id"].str.startswith("SIMULATED-").all()
    for table in (qa.method_ratings(r), qa.preference_rates(r), qa.agreement(r), qa.scs_scores(r)):
        assert table["simulated"].all()
    means = qa.method_ratings(r).groupby("method")["mean"].mean()
    assert means["gradcam"] > means["lrp"] + 0.8
    assert qa.preference_rates(r).iloc[0]["rate_first"] > 0.6
