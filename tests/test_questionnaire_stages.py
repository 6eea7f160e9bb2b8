"""The questionnaire and questionnaire-analysis stages on a hand-built aggregated run (composites + faces)."""

from __future__ import annotations

import pandas as pd
import pytest

from gestalt_xai.data.images import save_png
from gestalt_xai.errors import ConfigError
from gestalt_xai.export.questionnaire_stage import questionnaire_analysis_stage, questionnaire_stage
from gestalt_xai.export.simulate_responses import simulate_redcap_export
from gestalt_xai.runs import Run, write_parquet
from tests.test_questionnaire_export import _face, _tables


def _run(path) -> Run:
    run = Run(path)
    comp, faces = _tables()
    write_parquet(comp, run.dir("aggregate") / "composites.parquet")
    write_parquet(faces, run.path / "aggregate" / "faces.parquet")
    for syn in faces.loc[faces["rendered"], "group"]:
        save_png(run.dir("aggregate/faces") / f"{syn}__all.png", _face(syn))
    return run


def _bytes(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_stage_is_reproducible_keeps_the_key_private_and_follows_the_seed(tmp_path) -> None:
    runs = [_run(tmp_path / n) for n in ("a", "b", "c")]
    for run, seed in zip(runs, (1, 1, 2), strict=True):
        res = questionnaire_stage(run, {"seed": seed, "formats": ["redcap", "limesurvey"]})
        assert res.items == 4
    a, b, c = (_bytes(r.path / "questionnaire") for r in runs)
    assert a == b and a != c
    assert not any(k.startswith("booklet/") for k in a) and "redcap/data_dictionary.csv" in a
    keys = [(r.path / "private/questionnaire/blinding_key.csv").read_bytes() for r in runs]
    assert keys[0] == keys[1] != keys[2]
    assert not any(b"OMIM_" in v for v in a.values()), "a syndrome id leaked into the rater files"
    assert b"OMIM_" in (runs[0].path / "private/questionnaire/cases_key.csv").read_bytes()


def test_a_wrong_definition_fails_before_any_work_naming_the_field(tmp_path) -> None:
    run = _run(tmp_path / "r")
    with pytest.raises(ConfigError, match=r"maps\.per_case"):
        questionnaire_stage(run, {"overrides": {"maps": {"per_case": 9}}})
    with pytest.raises(ConfigError, match="not found"):
        questionnaire_stage(run, {"definition": str(tmp_path / "nope.yaml")})
    assert not (run.path / "questionnaire").exists() and not (run.path / "private" / "questionnaire").exists()


def test_simulated_analysis_is_labelled_and_reproducible(tmp_path) -> None:
    runs = [_run(tmp_path / n) for n in ("a", "b")]
    for run in runs:
        questionnaire_stage(run, {"formats": ["redcap"]})
        res = questionnaire_analysis_stage(run, {"simulate": {"raters": 5, "method_quality": {"gradcam": 1.5}},
                                                 "n_resamples": 200})
        assert res.extra == {"simulated": True, "raters": 5} and res.errors == 0
    a, b = (_bytes(r.path / "questionnaire/analysis") for r in runs)
    assert a == b
    assert {"ratings.parquet", "preference.parquet", "agreement.parquet", "summary.md", "ratings.png",
            "preference.png"} <= set(a)
    summary = a["summary.md"].decode()
    assert "SIMULATED" in summary and "[" in summary and "0.50" in summary
    ratings = pd.read_parquet(runs[0].path / "questionnaire/analysis/ratings.parquet")
    assert ratings["simulated"].all()
    top = ratings[ratings["item"] == "plaus"].set_index("method")["mean"]
    assert top.idxmax() == "gradcam", "the simulated quality shift must show in the ratings"


def test_a_bad_response_file_is_one_error_row_and_the_rest_is_analysed(tmp_path) -> None:
    from gestalt_xai.export.questionnaire_responses import load_analyst_key

    run = _run(tmp_path / "r")
    questionnaire_stage(run, {"formats": ["redcap"]})
    q_key = load_analyst_key(run.path / "private/questionnaire")
    from gestalt_xai.export.questionnaire_stage import QuestionnaireConfig

    q = QuestionnaireConfig().resolved()
    good = tmp_path / "site1.csv"
    simulate_redcap_export(q, q_key.blinding, 3, seed=4, path=good)
    text = good.read_text().replace("SIMULATED-", "R-")
    good.write_text(text)
    bad = tmp_path / "site2.csv"
    bad.write_text(text.replace("c01_pref", "c01_preference"))
    res = questionnaire_analysis_stage(run, {"responses": [str(good), str(bad)], "n_resamples": 200})
    assert res.errors == 1 and res.extra == {"simulated": False, "raters": 3}
    err = run.errors()
    row = err[err["stage"] == "questionnaire-analysis"].iloc[0]
    assert row["item_id"] == "site2.csv" and "c01_pref" in row["message"] and str(tmp_path) not in row["message"]
    assert "SIMULATED" not in (run.path / "questionnaire/analysis/summary.md").read_text()
    with pytest.raises(ConfigError, match="either"):
        questionnaire_analysis_stage(run, {"responses": [str(good)], "simulate": {"raters": 3}})


def test_on_an_aggregated_run_clinicians_ticking_the_planted_regions_agree_with_the_model(tmp_path) -> None:
    """Raters who tick each syndrome's planted region group agree with the saliency composites (planted blobs)."""
    from gestalt_xai.aggregate.stage import aggregate_stage
    from gestalt_xai.export.questionnaire_responses import load_analyst_key
    from gestalt_xai.export.questionnaire_stage import QuestionnaireConfig
    from tests.test_aggregate_stage import PLAN, build_run

    run = build_run(tmp_path / "run")
    aggregate_stage(run, {"min_subjects": 5, "normalisations": ["max-abs"], "figure_formats": ["png"],
                          "pair_figures": 1, "patient_figures": 1})
    cfg = QuestionnaireConfig(overrides={"cases": {"n": 3, "min_subjects": 5},
                                         "maps": {"methods": ["saliency", "hirescam"], "per_case": 2,
                                                  "preference": ["saliency", "hirescam"]}})
    questionnaire_stage(run, cfg)
    key = load_analyst_key(run.path / "private/questionnaire")
    planted = {p: [PLAN[s][1]] for p, s in zip(key.cases["pseudonym"], key.cases["raw_id"], strict=True)
               if PLAN[s][1]}
    assert len(planted) >= 2, "the selection must include planted syndromes"

    def saliency_agreement(true_regions: dict[str, list[str]]) -> pd.DataFrame:
        responses = tmp_path / "redcap_export.csv"
        simulate_redcap_export(cfg.resolved(), key.blinding, 8, seed=1, path=responses, true_regions=true_regions)
        responses.write_text(responses.read_text().replace("SIMULATED-", "R-"))
        res = questionnaire_analysis_stage(run, {"responses": [str(responses)], "n_resamples": 200})
        assert res.errors == 0
        agree = pd.read_parquet(run.path / "questionnaire/analysis/region_agreement.parquet")
        return agree[(agree["method"] == "saliency") & agree["pseudonym"].isin(planted)]

    sal = saliency_agreement(planted)
    assert len(sal) == len(planted)
    assert (sal["jaccard"] == 1.0).all() and sal["spearman"].mean() > 0, sal
    # raters ticking a region the maps do not highlight disagree with the model
    wrong = saliency_agreement({p: ["forehead"] for p in planted})
    assert (wrong["jaccard"] == 0.0).all() and wrong["spearman"].mean() < sal["spearman"].mean(), wrong
    assert "Clinicians' regions vs. the model's" in (run.path / "questionnaire/analysis/summary.md").read_text()


def test_the_analysis_pools_a_redcap_and_a_limesurvey_export(tmp_path) -> None:
    from gestalt_xai.export.questionnaire_responses import load_analyst_key
    from gestalt_xai.export.questionnaire_stage import QuestionnaireConfig
    from tests.test_limesurvey_responses import _as_limesurvey

    run = _run(tmp_path / "r")
    questionnaire_stage(run, {"formats": ["redcap", "limesurvey"]})
    key = load_analyst_key(run.path / "private/questionnaire")
    q = QuestionnaireConfig().resolved()
    site1, site2 = tmp_path / "site1.csv", tmp_path / "site2_redcap.csv"
    simulate_redcap_export(q, key.blinding, 3, seed=4, path=site1)
    site1.write_text(site1.read_text().replace("SIMULATED-", "R-"))
    simulate_redcap_export(q, key.blinding, 2, seed=5, path=site2)
    site2.write_text(site2.read_text().replace("SIMULATED-", "LS-"))
    lime = _as_limesurvey(q, site2, tmp_path / "site2_limesurvey.csv")
    res = questionnaire_analysis_stage(run, {"responses": [str(site1), str(lime)], "n_resamples": 200})
    assert res.errors == 0 and res.extra == {"simulated": False, "raters": 5}
    ratings = pd.read_parquet(run.path / "questionnaire/analysis/ratings.parquet")
    assert set(ratings["n_raters"]) == {5}


def test_patient_cases_show_one_photo_per_subject_under_pseudonyms_and_their_own_regions(tmp_path) -> None:
    """unit: patient — test photos with their own maps, one per subject, largest syndromes first in turn; the key
    names image ids, the rater files name nothing of the cohort; checklists compare with the subject's regions."""
    from gestalt_xai.aggregate.stage import aggregate_stage
    from gestalt_xai.export.questionnaire_responses import load_analyst_key
    from gestalt_xai.export.questionnaire_stage import QuestionnaireConfig
    from tests.test_aggregate_stage import PLAN, build_run

    run = build_run(tmp_path / "run")
    images = run.image_table()
    # every subject's photos are test photos of the protocol (build_run writes no splits)
    write_parquet(pd.DataFrame({"image_id": images["image_id"], "set": "frequent_test"}),
                  run.path / "cohort" / "splits.parquet")
    aggregate_stage(run, {"min_subjects": 5, "normalisations": ["max-abs"], "figure_formats": ["png"],
                          "pair_figures": 1, "patient_figures": 1})
    cfg = QuestionnaireConfig(overrides={"cases": {"unit": "patient", "n": 6}, "introduction": "One patient per page.",
                                         "maps": {"methods": ["saliency", "hirescam"], "per_case": 2,
                                                  "preference": ["saliency", "hirescam"]}},
                              formats=["redcap", "limesurvey", "booklet"], pdf="never")
    res = questionnaire_stage(run, cfg)
    assert res.items == 6
    key = load_analyst_key(run.path / "private/questionnaire")
    shown = list(key.cases.sort_values("pseudonym")["raw_id"])
    meta = images.set_index("image_id")
    assert len({meta.at[i, "subject_id"] for i in shown}) == 6, "one photo per subject"
    # largest first in turn: S00 and S01 (12 subjects) twice, S02 and S03 once each
    assert sorted(meta.loc[shown, "syndrome_id"]) == ["S00", "S00", "S01", "S01", "S02", "S03"]
    assert all(p.startswith("C") for p in key.cases["pseudonym"])
    booklet = next((run.path / "questionnaire" / "booklet").glob("*.html")).read_text(encoding="utf-8")
    assert booklet.count("the patient&#39;s aligned face") == 2 * 6 and "average aligned face" not in booklet
    rater_files = b"".join(p.read_bytes() for p in (run.path / "questionnaire").rglob("*") if p.is_file())
    for raw in shown + [meta.at[i, "subject_id"] for i in shown]:
        assert raw.encode() not in rater_files
    planted = {p: [PLAN[meta.at[i, "syndrome_id"]][1]] for p, i in zip(key.cases["pseudonym"], key.cases["raw_id"],
                                                                        strict=True)
               if PLAN[meta.at[i, "syndrome_id"]][1]}
    responses = tmp_path / "redcap_export.csv"
    simulate_redcap_export(cfg.resolved(), key.blinding, 8, seed=1, path=responses, true_regions=planted)
    responses.write_text(responses.read_text().replace("SIMULATED-", "R-"))
    assert questionnaire_analysis_stage(run, {"responses": [str(responses)], "n_resamples": 200}).errors == 0
    agree = pd.read_parquet(run.path / "questionnaire/analysis/region_agreement.parquet")
    sal = agree[(agree["method"] == "saliency") & agree["pseudonym"].isin(planted)]
    assert len(sal) == len(planted) >= 3 and (sal["jaccard"] == 1.0).all(), sal
