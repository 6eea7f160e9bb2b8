"""Questionnaire definitions: the shipped default validates and says what the issue asks; wrong definitions fail
with the file and the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gestalt_xai.errors import ConfigError
from gestalt_xai.export.questionnaire_def import QuestionnaireDef, load_questionnaire

DEFAULT = Path(__file__).resolve().parents[1] / "questionnaires" / "default.yaml"


def test_default_questionnaire_asks_what_the_clinical_evaluation_needs() -> None:
    q = load_questionnaire(DEFAULT)
    assert q.background is not None and q.cases.unit == "syndrome"
    assert 2 <= q.maps.per_case <= 4 and q.maps.preference_pair == ("gradcam", "lrp")
    assert [i.type for i in q.case_items] == ["diagnosis", "likert", "preference", "regions", "free_text"]
    assert {s.id for s in q.item("likert").statements} == {"plaus", "regions", "trust"}
    assert q.scs is not None and len(q.scs.statements) == 10


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("change", "field"), [
    (lambda d: d["maps"].update(per_case=5), "maps.per_case"),
    (lambda d: d["maps"].update(preference=["gradcam", "ig"]), "maps"),
    (lambda d: d["maps"].update(methods=["gradcam", "gradcam"]), "maps.methods"),
    (lambda d: d["case_items"][1]["statements"][0].update(id="Plausible!"), "case_items.1.likert.statements.0.id"),
    (lambda d: d["case_items"].append({"type": "likert", "statements": [{"id": "x", "text": "abc"}]}), "case_items"),
    (lambda d: d["case_items"].append({"type": "vas"}), "case_items.5"),
    (lambda d: d["cases"].update(select="listed"), "cases"),
    (lambda d: d.update(seeed=1), "seeed"),
    (lambda d: d["scs"]["statements"].pop(), "scs.statements"),
])
def test_a_wrong_definition_names_the_file_and_field(tmp_path, change, field) -> None:
    data = yaml.safe_load(DEFAULT.read_text())
    change(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_questionnaire(path)
    assert str(path) in str(info.value) and f"{path}.{field}" in str(info.value)


def test_the_default_round_trips_through_the_model() -> None:
    q = load_questionnaire(DEFAULT)
    assert QuestionnaireDef.model_validate(q.model_dump()) == q
