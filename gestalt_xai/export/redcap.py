"""REDCap data dictionary of a questionnaire, and a validator written from REDCap's documented rules.

The dictionary is the CSV a REDCap project's *Data Dictionary* page uploads (REDCap Help & FAQ, "Data Dictionary"
and the data-dictionary instructions of the upload page, Vanderbilt University): 18 columns in a fixed order
(:data:`COLUMNS`), one row per field, the project's record id field first; variable and form names lowercase letters,
digits and underscores starting with a letter (variable names at most 26 characters, REDCap's recommended limit);
choices of radio, dropdown and checkbox fields written ``1, Label | 2, Label``; fields of one matrix group (REDCap's
"matrix of fields") consecutive, of one type (radio or checkbox) and with the same choices. Uploading a dictionary
replaces every instrument of the project, so the coordinator uploads it into a new project.

Rows carry no image id, subject id, file name or path: cases appear as "Case n" with their run pseudonym, and
methods as letters (:mod:`gestalt_xai.export.blinding`).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence

import pandas as pd

from gestalt_xai.export.blinding import case_form
from gestalt_xai.export.questionnaire_def import QuestionnaireDef
from gestalt_xai.faces.regions import REGION_GROUP, hpo_anchors

__all__ = ["COLUMNS", "FIELD_TYPES", "REGION_GROUPS", "RECORD_ID", "data_dictionary", "dictionary_csv",
           "validate_data_dictionary"]

#: the 18 data-dictionary columns, in REDCap's order
COLUMNS = [
    "Variable / Field Name", "Form Name", "Section Header", "Field Type", "Field Label",
    "Choices, Calculations, OR Slider Labels", "Field Note", "Text Validation Type OR Show Slider Number",
    "Text Validation Min", "Text Validation Max", "Identifier?", "Branching Logic (Show field only if...)",
    "Required Field?", "Custom Alignment", "Question Number (surveys only)", "Matrix Group Name", "Matrix Ranking?",
    "Field Annotation",
]
FIELD_TYPES = {"text", "notes", "dropdown", "radio", "checkbox", "yesno", "truefalse", "descriptive", "slider",
               "calc", "file"}
_CHOICE_TYPES = {"dropdown", "radio", "checkbox"}
_VALIDATIONS = {"", "integer", "number", "date_ymd", "date_dmy", "date_mdy", "datetime_ymd", "email", "phone",
                "time", "zipcode", "alpha_only"}
_ALIGN = {"", "LV", "LH", "RV", "RH"}
RECORD_ID = "record_id"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_CODE = re.compile(r"^[A-Za-z0-9_.\-]+$")
#: the anatomical groups of the region checklist (atlas image-left/right regions merged), in atlas order
REGION_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(g for g in REGION_GROUP.values() if g))


def _choices(labels: Sequence[str]) -> str:
    return " | ".join(f"{i}, {label}" for i, label in enumerate(labels, start=1))


def _row(name: str, form: str, ftype: str, label: str, **extra: str) -> dict[str, str]:
    row = dict.fromkeys(COLUMNS, "")
    row.update({"Variable / Field Name": name, "Form Name": form, "Field Type": ftype, "Field Label": label})
    keys = {"header": "Section Header", "choices": "Choices, Calculations, OR Slider Labels", "note": "Field Note",
            "validation": "Text Validation Type OR Show Slider Number", "vmin": "Text Validation Min",
            "vmax": "Text Validation Max", "required": "Required Field?", "matrix": "Matrix Group Name",
            "align": "Custom Alignment"}
    row.update({keys[k]: v for k, v in extra.items()})
    return row


def _region_label(group: str, show_hpo: bool) -> str:
    text = group.replace("_", " ").capitalize()
    if show_hpo:
        text += " (" + "; ".join(f"{name} {hpo}" for hpo, name in hpo_anchors(group)) + ")"
    return text


def data_dictionary(q: QuestionnaireDef, key: pd.DataFrame) -> pd.DataFrame:
    """The data dictionary of ``q`` for the cases and letters of ``key`` (:func:`~gestalt_xai.export.blinding.
    blinding_key`), as a frame with :data:`COLUMNS`.

    Forms: ``<name>_rater`` (record id, background), one ``case_nn`` per case, ``<name>_scs`` at the end.
    """
    rows = [_row(RECORD_ID, f"{q.name}_rater", "text", "Rater code (given by the study coordinator)")]
    form = f"{q.name}_rater"
    if q.background is not None:
        b = q.background
        rows.append(_row("specialty", form, "radio", "Your specialty", choices=_choices(b.specialties),
                         header="About you", required="y"))
        if b.experience_years:
            rows.append(_row("experience_years", form, "text", "Years of clinical experience with syndromic "
                             "patients", validation="integer", vmin="0", vmax="70", required="y"))
        if b.dysmorphology_cases_per_year:
            rows.append(_row("cases_per_year", form, "text", "Patients with suspected syndromes you see per year "
                             "(estimate)", validation="integer", vmin="0", vmax="100000"))
    for case_no, maps in key.groupby("case_no", sort=True):
        form, p = case_form(int(case_no)), f"c{int(case_no):02d}"
        pseudonym = str(maps["pseudonym"].iloc[0])
        labels = list(maps["label"])
        rows.append(_row(f"{p}_face", form, "descriptive", f"Case {int(case_no)} ({pseudonym}): "
                         f"{q.face_caption[0].lower()}{q.face_caption[1:]}", header=f"Case {int(case_no)}"))
        dx = q.item("diagnosis")
        if dx is not None and dx.before_maps:
            rows += _diagnosis_rows(p, form, dx)
        rows += [_row(f"{p}_map_{lab.lower()}", form, "descriptive", f"Map {lab}") for lab in labels]
        for item in q.case_items:
            if item.type == "likert":
                choices = _choices(item.scale)
                for lab in labels:
                    for j, s in enumerate(item.statements):
                        rows.append(_row(f"{p}_{lab.lower()}_{s.id}", form, "radio", s.text, choices=choices,
                                         matrix=f"{p}_lik_{lab.lower()}", required="y" if item.required else "",
                                         header=f"Map {lab}" if j == 0 else ""))
            elif item.type == "preference":
                options = ["Map A", "Map B"] + (["No preference"] if item.allow_no_preference else [])
                rows.append(_row(f"{p}_pref", form, "radio", item.question, choices=_choices(options),
                                 required="y" if item.required else ""))
            elif item.type == "regions":
                rows.append(_row(f"{p}_regions", form, "checkbox", item.question,
                                 choices=_choices([_region_label(g, item.show_hpo) for g in REGION_GROUPS])))
            elif item.type == "diagnosis" and not item.before_maps:
                rows += _diagnosis_rows(p, form, item)
            elif item.type == "free_text":
                rows.append(_row(f"{p}_comment", form, "notes", item.question))
    if q.scs is not None:
        form = f"{q.name}_scs"
        choices = _choices(q.scs.scale)
        for j, text in enumerate(q.scs.statements, start=1):
            rows.append(_row(f"scs_{j:02d}", form, "radio", text, choices=choices, matrix="scs", required="y",
                             header="System Causability Scale: the explanations you saw, as a whole" if j == 1
                             else ""))
    return pd.DataFrame(rows, columns=COLUMNS)


def _diagnosis_rows(p: str, form: str, item: object) -> list[dict[str, str]]:
    n, question = item.n, item.question  # type: ignore[attr-defined]
    return [_row(f"{p}_dx{k}", form, "text", f"{question}: {k}." if n > 1 else question) for k in range(1, n + 1)]


def dictionary_csv(table: pd.DataFrame) -> bytes:
    """The dictionary as REDCap reads it: UTF-8 with a byte-order mark, every field quoted, CRLF line ends."""
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    writer.writerows(table[COLUMNS].itertuples(index=False, name=None))
    return b"\xef\xbb\xbf" + buf.getvalue().encode("utf-8")


def _parse_choices(text: str) -> list[tuple[str, str]] | None:
    out = []
    for part in text.split("|"):
        code, sep, label = part.strip().partition(",")
        if not sep or not _CODE.match(code.strip()) or not label.strip():
            return None
        out.append((code.strip(), label.strip()))
    return out


def validate_data_dictionary(data: bytes | str | pd.DataFrame) -> list[str]:
    """Problems of a data dictionary by REDCap's documented rules (empty list: none); ``data`` the CSV or a frame.

    Checks the 18 columns and their order, the record id first, variable and form names (syntax, length, unique
    variables, each form's fields together), field types, choice syntax and unique codes, text validation only on
    text fields, the y/blank flags, and matrix groups (consecutive, radio or checkbox, the same choices).
    """
    if isinstance(data, pd.DataFrame):
        header, rows = list(data.columns), [list(map(str, r)) for r in data.itertuples(index=False, name=None)]
    else:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data.lstrip("\ufeff")
        table = list(csv.reader(io.StringIO(text)))
        if not table:
            return ["the file is empty"]
        header, rows = table[0], table[1:]
    if header != COLUMNS:
        return [f"columns must be the 18 REDCap columns in order; got {header}"]
    problems: list[str] = []
    df = pd.DataFrame(rows, columns=COLUMNS)
    names = df["Variable / Field Name"]
    if not len(df):
        return ["no fields"]
    if names.iloc[0] != RECORD_ID:
        problems.append(f"row 2: the first field must be the record id {RECORD_ID!r}, got {names.iloc[0]!r}")
    for n in sorted(set(names[names.duplicated()])):
        problems.append(f"variable {n!r} is defined more than once")
    seen_forms: list[str] = []
    for i, r in df.iterrows():
        where = f"row {i + 2} ({r['Variable / Field Name']})"
        name, form, ftype = r["Variable / Field Name"], r["Form Name"], r["Field Type"]
        if not _NAME.match(name) or len(name) > 26:
            problems.append(f"{where}: variable names are lowercase letters, digits and '_', start with a letter, "
                            "at most 26 characters")
        if not _NAME.match(form):
            problems.append(f"{where}: form name {form!r} is not lowercase letters, digits and '_'")
        if form in seen_forms and seen_forms[-1] != form:
            problems.append(f"{where}: the fields of form {form!r} are not together")
        if not seen_forms or seen_forms[-1] != form:
            seen_forms.append(form)
        if ftype not in FIELD_TYPES:
            problems.append(f"{where}: unknown field type {ftype!r}")
        choices = r["Choices, Calculations, OR Slider Labels"]
        if ftype in _CHOICE_TYPES:
            parsed = _parse_choices(choices)
            if parsed is None:
                problems.append(f"{where}: choices must read 'code, label | code, label', got {choices!r}")
            elif len({c for c, _ in parsed}) != len(parsed):
                problems.append(f"{where}: choice codes repeat")
            elif ftype == "checkbox" and not all(re.fullmatch(r"[A-Za-z0-9_]+", c) for c, _ in parsed):
                problems.append(f"{where}: checkbox codes must be letters, digits or '_'")
        elif choices and ftype not in {"calc", "slider"}:
            problems.append(f"{where}: a {ftype} field takes no choices")
        if ftype == "calc" and not choices:
            problems.append(f"{where}: a calc field needs its calculation")
        validation = r["Text Validation Type OR Show Slider Number"]
        if ftype == "text" and validation not in _VALIDATIONS:
            problems.append(f"{where}: unknown text validation {validation!r}")
        if ftype not in {"text", "slider"} and (validation or r["Text Validation Min"] or r["Text Validation Max"]):
            problems.append(f"{where}: validation only applies to text fields")
        for col in ("Identifier?", "Required Field?", "Matrix Ranking?"):
            if r[col] not in {"", "y"}:
                problems.append(f"{where}: {col} must be 'y' or blank, got {r[col]!r}")
        if r["Custom Alignment"] not in _ALIGN:
            problems.append(f"{where}: custom alignment must be one of LV, LH, RV, RH or blank")
        if r["Matrix Ranking?"] and not r["Matrix Group Name"]:
            problems.append(f"{where}: matrix ranking outside a matrix group")
    problems += _matrix_problems(df)
    return problems


def _matrix_problems(df: pd.DataFrame) -> list[str]:
    problems: list[str] = []
    group = df["Matrix Group Name"]
    for name, rows in df[group != ""].groupby(group[group != ""], sort=False):
        idx = list(rows.index)
        if not _NAME.match(name):
            problems.append(f"matrix group {name!r}: names are lowercase letters, digits and '_'")
        if idx != list(range(idx[0], idx[0] + len(idx))):
            problems.append(f"matrix group {name!r}: its fields are not consecutive")
        if not set(rows["Field Type"]) <= {"radio", "checkbox"} or rows["Field Type"].nunique() != 1:
            problems.append(f"matrix group {name!r}: fields must all be radio or all checkbox")
        if rows["Choices, Calculations, OR Slider Labels"].nunique() != 1:
            problems.append(f"matrix group {name!r}: fields must share the same choices")
        if rows["Form Name"].nunique() != 1:
            problems.append(f"matrix group {name!r}: fields span several forms")
    return problems
