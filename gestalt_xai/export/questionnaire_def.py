"""Clinician questionnaire definitions (``questionnaires/*.yaml``): which cases, which maps, which items, which seed.

A definition is validated like every configuration (:func:`~gestalt_xai.config.validate_config`: unknown keys and
wrong values fail before any export, the field named). It says

* ``cases``: patients (per-patient maps over the patient's aligned face) or syndromes (composite maps over the
  syndrome's mean aligned face, only for syndromes with at least ``min_subjects`` subjects, so no single patient's
  face can be recognised in the average), and the selection rule;
* ``maps``: the explanation methods compared, how many blinded maps a case shows (2–4, labelled A, B, …, order drawn
  per case from ``seed``) and the pair of methods of the blinded A/B preference;
* ``background``: the rater's specialty and years of experience, asked first;
* ``case_items``: what is asked per case, in order: a Likert block over every shown map (a REDCap matrix), the A/B
  preference, the region checklist (the atlas's anatomical groups with their HPO anchors,
  :data:`gestalt_xai.faces.regions.REGION_GROUP`), the rater's own top syndromes, free text;
* ``scs``: the System Causability Scale at the end (Holzinger, Carrington & Müller 2020, *KI - Künstliche
  Intelligenz* 34:193–198: ten statements on a five-point agreement scale, score = sum / 50).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gestalt_xai.config import load_yaml, validate_config

__all__ = [
    "AGREEMENT",
    "BackgroundDef",
    "CaseSelection",
    "DiagnosisItem",
    "FreeTextItem",
    "LikertItem",
    "LikertStatement",
    "MapSelection",
    "PreferenceItem",
    "QuestionnaireDef",
    "RegionChecklistItem",
    "ScsDef",
    "load_questionnaire",
]

#: the five-point agreement scale of the Likert block and the SCS (Holzinger et al. 2020 rate on five points)
AGREEMENT = ("Strongly disagree", "Disagree", "Neither agree nor disagree", "Agree", "Strongly agree")
#: item ids become parts of REDCap variable names (lowercase letters, digits, underscores; short)
_ID = re.compile(r"^[a-z][a-z0-9]{0,7}$")


class _Def(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_id(value: str) -> str:
    if not _ID.match(value):
        raise ValueError("ids are 1-8 lowercase letters or digits, starting with a letter (they become parts of "
                         "REDCap variable names, which are limited to 26 characters)")
    return value


class CaseSelection(_Def):
    """Which cases the raters see."""

    unit: Literal["patient", "syndrome"] = Field(
        "syndrome", description="patient: one photo with its per-patient maps; syndrome: composite maps over the "
                                "syndrome's mean aligned face")
    select: Literal["largest", "random", "listed", "all"] = Field(
        "largest", description="largest: the n syndromes with most subjects (patients: n test photos of the largest "
                               "syndromes); random: n drawn with the seed; listed: exactly `ids`; all")
    n: int = Field(8, ge=1, le=60, description="cases to show (not for listed/all)")
    ids: list[str] = Field(default_factory=list, description="syndrome ids (unit syndrome) or image ids (patient) for "
                                                             "select: listed; they never appear in an export")
    min_subjects: int = Field(5, ge=3, description="a syndrome case needs this many subjects in its composite")
    only_correct: bool = Field(False, description="patients: only those the model ranked first correctly")

    @model_validator(mode="after")
    def _ids_for_listed(self) -> CaseSelection:
        if (self.select == "listed") != bool(self.ids):
            raise ValueError("give `ids` exactly when select is 'listed'")
        return self


class MapSelection(_Def):
    """The explanation maps shown per case, blinded."""

    methods: list[str] = Field(min_length=2, description="attribution methods (explain stage names) compared")
    per_case: int = Field(3, ge=2, le=4, description="blinded maps per case (A, B, …)")
    preference: tuple[str, str] | None = Field(
        None, description="the two methods of the A/B preference (default: the first two methods); always shown")
    model: str | None = Field(None, description="model id (default: the run's first model)")
    normalisation: str = Field("max-abs", description="composite normalisation (aggregate stage)")

    @field_validator("methods")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"methods listed twice: {sorted({m for m in v if v.count(m) > 1})}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MapSelection:
        if self.per_case > len(self.methods):
            raise ValueError(f"per_case {self.per_case} exceeds the {len(self.methods)} methods listed")
        pair = self.preference_pair
        if pair[0] == pair[1] or not set(pair) <= set(self.methods):
            raise ValueError(f"preference {list(pair)} must name two different methods of `methods`")
        return self

    @property
    def preference_pair(self) -> tuple[str, str]:
        """The two methods compared by the A/B preference."""
        return self.preference or (self.methods[0], self.methods[1])


class BackgroundDef(_Def):
    """The rater's background, asked before the cases."""

    specialties: list[str] = Field(
        default_factory=lambda: ["Clinical genetics", "Paediatrics", "Dysmorphology research", "Genetic counselling",
                                 "Other"], min_length=2)
    experience_years: bool = True
    dysmorphology_cases_per_year: bool = True


class LikertStatement(_Def):
    """One statement rated per shown map."""

    id: str
    text: str = Field(min_length=3)

    @field_validator("id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        return _check_id(v)


class LikertItem(_Def):
    """A Likert block: every statement rated for every shown map (a matrix of one row per map and statement)."""

    type: Literal["likert"]
    statements: list[LikertStatement] = Field(min_length=1, max_length=6)
    scale: list[str] = Field(default_factory=lambda: list(AGREEMENT), min_length=3, max_length=7)
    required: bool = True

    @field_validator("statements")
    @classmethod
    def _unique(cls, v: list[LikertStatement]) -> list[LikertStatement]:
        ids = [s.id for s in v]
        if len(set(ids)) != len(ids):
            raise ValueError(f"statement ids repeat: {ids}")
        return v


class PreferenceItem(_Def):
    """The blinded A/B preference between the two preference methods' maps."""

    type: Literal["preference"]
    question: str = "Which map better shows the facial features you would use for this diagnosis?"
    allow_no_preference: bool = True
    required: bool = True


class RegionChecklistItem(_Def):
    """The facial regions the rater would examine (the atlas's anatomical groups, with their HPO anchors)."""

    type: Literal["regions"]
    question: str = "Which facial regions would you examine for this diagnosis? (tick all that apply)"
    show_hpo: bool = Field(True, description="list each group's HPO anchor terms beside it")


class DiagnosisItem(_Def):
    """The rater's own diagnosis: up to ``n`` syndromes, free text (asked before the maps influence the rater when
    ``before_maps``)."""

    type: Literal["diagnosis"]
    n: int = Field(3, ge=1, le=5)
    question: str = "Your own differential diagnosis (most likely first)"
    before_maps: bool = True


class FreeTextItem(_Def):
    """A free-text comment."""

    type: Literal["free_text"]
    question: str = "Anything else about these maps?"


CaseItem = Annotated[LikertItem | PreferenceItem | RegionChecklistItem | DiagnosisItem | FreeTextItem,
                     Field(discriminator="type")]


class ScsDef(_Def):
    """The System Causability Scale (Holzinger, Carrington & Müller 2020), asked once at the end."""

    statements: list[str] = Field(min_length=10, max_length=10)
    scale: list[str] = Field(default_factory=lambda: list(AGREEMENT), min_length=5, max_length=5)


class QuestionnaireDef(_Def):
    """A clinician questionnaire (see the module docstring)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,19}$", description="short name: REDCap form-name prefix")
    title: str = Field(min_length=3)
    introduction: str = ""
    seed: int = Field(0, description="draws the cases (select: random) and each case's map order and labels")
    cases: CaseSelection = Field(default_factory=CaseSelection)
    maps: MapSelection
    background: BackgroundDef | None = Field(default_factory=BackgroundDef)
    case_items: list[CaseItem] = Field(min_length=1)
    scs: ScsDef | None = None

    @field_validator("case_items")
    @classmethod
    def _one_of_each(cls, v: list[CaseItem]) -> list[CaseItem]:
        kinds = [i.type for i in v]
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        if twice:
            raise ValueError(f"each item type at most once per case, repeated: {twice}")
        return v

    @property
    def face_caption(self) -> str:
        """What the face of a case is, as the raters read it."""
        return "The average aligned face" if self.cases.unit == "syndrome" else "The patient's aligned face"

    def item(self, kind: str) -> CaseItem | None:
        """The case item of type ``kind``, if the questionnaire asks it."""
        return next((i for i in self.case_items if i.type == kind), None)


def load_questionnaire(path: str | Path) -> QuestionnaireDef:
    """Read and validate a questionnaire definition (a :class:`~gestalt_xai.errors.ConfigError` names the file
    and every bad field)."""
    return validate_config(QuestionnaireDef, load_yaml(path), where=str(path))
