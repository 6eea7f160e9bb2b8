"""Export a clinician questionnaire: REDCap (dictionary + one instrument ZIP per form), LimeSurvey, printable HTML.

Layout of an export folder (everything a rater or a survey platform receives; the analyst's key is written apart by
:func:`~gestalt_xai.export.blinding.write_analyst_key` into the run's ``private/`` folder)::

    images/<pseudonym>_face.png, images/<pseudonym>_map_<letter>.png
    redcap/data_dictionary.csv               the whole project (uploading it replaces every instrument)
    redcap/instruments/<form>.zip            OriginID.txt, instrument.csv, attachments/<field>/<file>
    limesurvey/<name>.txt                    LimeSurvey tab-separated survey structure
    booklet/<name>.html                      printable, self-contained (images as data URIs)

**REDCap instrument ZIP** (REDCap's "Upload instrument ZIP" of the Online Designer, as REDCap writes it when an
instrument is downloaded): ``OriginID.txt`` (the server the ZIP comes from), ``instrument.csv`` (the data-dictionary
rows of the one instrument, UTF-8 with BOM) and ``attachments/<field_name>/<file>`` for the images of descriptive
fields. Entries are written in a fixed order with a fixed timestamp (1980-01-01, the ZIP epoch), so the same seed
gives byte-identical ZIPs.

**LimeSurvey** (LimeSurvey Manual, "Tab Separated Value survey structure"): a UTF-8 ``.txt`` with a BOM, one row per
survey setting (class ``S``), language setting (``SL``), group (``G``), question (``Q``), subquestion (``SQ``) and
answer (``A``); relations follow from row order (questions belong to the group above them, subquestions and answers
to the question above them). See ``data_cards/questionnaire.md`` for the facts relied on.
"""

from __future__ import annotations

import base64
import csv
import io
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from gestalt_xai.export.blinding import case_form
from gestalt_xai.export.cases import Case, case_image_names, render_case_images
from gestalt_xai.export.questionnaire_def import QuestionnaireDef
from gestalt_xai.export.redcap import (
    COLUMNS,
    REGION_GROUPS,
    _region_label,
    data_dictionary,
    dictionary_csv,
    validate_data_dictionary,
)
from gestalt_xai.runs import Run, atomic_write_bytes

__all__ = ["FORMATS", "LIMESURVEY_COLUMNS", "ORIGIN_ID", "ZIP_DATE", "booklet_html", "deterministic_zip",
           "export_questionnaire", "export_run_questionnaire", "limesurvey_tsv", "redcap_instrument_zip"]

#: the export formats: REDCap dictionary + instrument ZIPs, LimeSurvey TSV, printable HTML booklet
FORMATS = ("redcap", "limesurvey", "booklet")
#: the fixed timestamp of every ZIP entry (the earliest a ZIP can store)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
#: what ``OriginID.txt`` says: not a REDCap server, the toolkit
ORIGIN_ID = "gestalt-xai questionnaire export"
#: the columns of LimeSurvey's tab-separated survey structure used here, in LimeSurvey's order
LIMESURVEY_COLUMNS = ["id", "related_id", "class", "type/scale", "name", "relevance", "text", "help", "language",
                      "validation", "mandatory", "other", "default", "same_default"]


def deterministic_zip(files: Mapping[str, bytes]) -> bytes:
    """A ZIP of ``name → bytes``, entries sorted by name, fixed timestamps and permissions: same input, same bytes.

    >>> deterministic_zip({"b.txt": b"1", "a.txt": b"2"}) == deterministic_zip({"a.txt": b"2", "b.txt": b"1"})
    True
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            z.writestr(info, files[name], compresslevel=9)
    return buf.getvalue()


def _image_fields(key: pd.DataFrame) -> dict[str, dict[str, str]]:
    """form → descriptive field name → image file name (the fields :func:`~gestalt_xai.export.redcap.
    data_dictionary` writes: ``cNN_face`` and ``cNN_map_<letter>``)."""
    out: dict[str, dict[str, str]] = {}
    for case_no, rows in key.groupby("case_no", sort=True):
        p = f"c{int(case_no):02d}"
        names = case_image_names(str(rows["pseudonym"].iloc[0]), list(rows["label"]))
        fields = {f"{p}_face": names["face"]}
        fields.update({f"{p}_map_{lab.lower()}": names[lab] for lab in rows["label"]})
        out[case_form(int(case_no))] = fields
    return out


def redcap_instrument_zip(dictionary: pd.DataFrame, form: str, images: Mapping[str, bytes],
                          fields: Mapping[str, str] | None = None) -> bytes:
    """The instrument ZIP of ``form``: ``OriginID.txt``, the form's dictionary rows as ``instrument.csv`` and each
    descriptive field's image (``fields``: field name → file name in ``images``) as ``attachments/<field>/<file>``.

    The record id field (the dictionary's first row) stays out: the project the instrument is uploaded into has its
    own, and a second field of that name would be renamed on upload (the REDCap Shared Library's instruments and
    REDCapCAST's ``export_redcap_instrument`` leave it out too); the data dictionary CSV keeps it."""
    record_id = dictionary["Variable / Field Name"].iloc[0]
    rows = dictionary[(dictionary["Form Name"] == form) & (dictionary["Variable / Field Name"] != record_id)]
    if not len(rows):
        raise ValueError(f"form {form!r} has no fields in the dictionary")
    files = {"OriginID.txt": ORIGIN_ID.encode("utf-8"), "instrument.csv": dictionary_csv(rows)}
    for name, file in (fields or {}).items():
        if name not in set(rows["Variable / Field Name"]):
            raise ValueError(f"attachment field {name!r} is not a field of form {form!r}")
        files[f"attachments/{name}/{file}"] = images[file]
    return deterministic_zip(files)


def _tsv(rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(LIMESURVEY_COLUMNS)
    for r in rows:
        w.writerow([str(r.get(c, "")).replace("\t", " ").replace("\n", " ") for c in LIMESURVEY_COLUMNS])
    return b"\xef\xbb\xbf" + buf.getvalue().encode("utf-8")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def limesurvey_tsv(q: QuestionnaireDef, key: pd.DataFrame, images: Mapping[str, bytes],
                   language: str = "en") -> bytes:
    """LimeSurvey's tab-separated survey structure of ``q`` (module docstring), one group per case.

    Question types (LimeSurvey Manual, "Question types"): ``L`` list (radio) for the specialty and the preference,
    ``N`` numerical input for years and cases per year, ``X`` text display for each image (the image inline as a data
    URI: the HTML of a text display question), ``F`` array for each map's Likert block and the SCS, ``M`` multiple
    choice for the region checklist, ``S`` short free text for each suspected syndrome, ``T`` long free text for the
    comment. Question codes are letters and digits (the REDCap variable names without ``_``).
    """
    rows: list[dict[str, str]] = [
        {"class": "S", "name": "language", "text": language},
        {"class": "S", "name": "format", "text": "G"},
        {"class": "S", "name": "anonymized", "text": "Y"},
        {"class": "SL", "name": "surveyls_title", "text": q.title, "language": language},
        {"class": "SL", "name": "surveyls_description", "text": q.introduction.strip(), "language": language},
    ]
    qid = 0

    def question(qtype: str, code: str, text: str, mandatory: bool = False, **extra: str) -> int:
        nonlocal qid
        qid += 1
        rows.append({"id": str(qid), "class": "Q", "type/scale": qtype, "name": code, "relevance": "1", "text": text,
                     "language": language, "mandatory": "Y" if mandatory else "N", **extra})
        return qid

    def answers(labels: list[str], owner: int) -> None:
        rows.extend({"id": str(owner), "class": "A", "type/scale": "0", "name": f"A{i}", "text": lab,
                     "language": language} for i, lab in enumerate(labels, start=1))

    def sub(code: str, text: str) -> None:
        nonlocal qid
        qid += 1
        rows.append({"id": str(qid), "class": "SQ", "type/scale": "0", "name": code, "text": text,
                     "language": language, "relevance": "1"})

    group = 0

    def new_group(name: str, text: str = "") -> None:
        nonlocal group
        group += 1
        rows.append({"id": str(group), "class": "G", "name": name, "relevance": "1", "text": text,
                     "language": language})

    if q.background is not None:
        b = q.background
        new_group("About you")
        answers(b.specialties, question("L", "specialty", "Your specialty", True))
        if b.experience_years:
            question("N", "experienceyears", "Years of clinical experience with syndromic patients", True)
        if b.dysmorphology_cases_per_year:
            question("N", "casesperyear", "Patients with suspected syndromes you see per year (estimate)")
    for case_no, maps in key.groupby("case_no", sort=True):
        p, pseudonym, labels = f"c{int(case_no):02d}", str(maps["pseudonym"].iloc[0]), list(maps["label"])
        names = case_image_names(pseudonym, labels)
        new_group(f"Case {int(case_no)}", f"Case {int(case_no)} ({pseudonym})")
        question("X", f"{p}face", f'<p>{q.face_caption}</p><img alt="Case {int(case_no)} face" '
                 f'src="{_data_uri(images[names["face"]])}" />')
        dx = q.item("diagnosis")
        if dx is not None and dx.before_maps:
            for k in range(1, dx.n + 1):
                question("S", f"{p}dx{k}", f"{dx.question}: {k}." if dx.n > 1 else dx.question)
        for lab in labels:
            question("X", f"{p}map{lab.lower()}", f'<p>Map {lab}</p><img alt="Map {lab}" '
                     f'src="{_data_uri(images[names[lab]])}" />')
        for item in q.case_items:
            if item.type == "likert":
                for lab in labels:
                    owner = question("F", f"{p}lik{lab.lower()}", f"Map {lab}", item.required)
                    for s in item.statements:
                        sub(s.id, s.text)
                    answers(list(item.scale), owner)
            elif item.type == "preference":
                options = ["Map A", "Map B"] + (["No preference"] if item.allow_no_preference else [])
                answers(options, question("L", f"{p}pref", item.question, item.required))
            elif item.type == "regions":
                question("M", f"{p}regions", item.question)
                for i, g in enumerate(REGION_GROUPS, start=1):
                    sub(f"R{i}", _region_label(g, item.show_hpo))
            elif item.type == "diagnosis" and not item.before_maps:
                for k in range(1, item.n + 1):
                    question("S", f"{p}dx{k}", f"{item.question}: {k}." if item.n > 1 else item.question)
            elif item.type == "free_text":
                question("T", f"{p}comment", item.question)
    if q.scs is not None:
        new_group("System Causability Scale", "The explanations you saw, as a whole")
        owner = question("F", "scs", "How far do you agree?", True)
        for j, text in enumerate(q.scs.statements, start=1):
            sub(f"SCS{j:02d}", text)
        answers(list(q.scs.scale), owner)
    return _tsv(rows)


def booklet_html(q: QuestionnaireDef, dictionary: pd.DataFrame, images: Mapping[str, bytes],
                 key: pd.DataFrame) -> str:
    """The printable booklet: one self-contained HTML page (images as data URIs, no external resource), a page per
    case when printed, each field of the dictionary as a paper item (tick boxes for choices, lines for text)."""
    from jinja2 import Environment, PackageLoader

    env = Environment(loader=PackageLoader("gestalt_xai.export", "templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    attachments = {f: _data_uri(images[file]) for fields in _image_fields(key).values() for f, file in fields.items()}
    forms = []
    for form, rows in dictionary.groupby("Form Name", sort=False):
        items = []
        for r in rows.to_dict("records"):
            if r["Variable / Field Name"] == "record_id":
                continue
            choices = [c.split(",", 1)[1].strip() for c in r[COLUMNS[5]].split("|")] if r[COLUMNS[5]] else []
            name = r["Variable / Field Name"]
            items.append({"name": name, "type": r["Field Type"], "label": r["Field Label"],
                          "header": r["Section Header"], "choices": choices, "matrix": r["Matrix Group Name"],
                          "required": r["Required Field?"] == "y", "image": attachments.get(name)})
        forms.append({"name": form, "items": items})
    return env.get_template("booklet.html.j2").render(q=q, forms=forms)


def export_questionnaire(q: QuestionnaireDef, cases: list[Case], key: pd.DataFrame, out: str | Path,
                         formats: tuple[str, ...] | list[str] = FORMATS, pdf: str | None = None) -> dict[str, Path]:
    """Write the rater-facing files of the questionnaire into ``out`` (module docstring); returns label → path.

    ``key`` is the blinding key of exactly these cases; the dictionary is validated before anything is written.
    ``formats``: a subset of :data:`FORMATS` (the images are always written). ``pdf``: the Chromium executable that
    prints the booklet to ``booklet/<name>.pdf`` (:mod:`~gestalt_xai.export.browser`; needs ``booklet`` in
    ``formats``); the booklet must load in it with every image and no console error, or nothing is reported done.
    The PDF's dates are fixed (:func:`~gestalt_xai.export.browser.fixed_pdf_dates`): two exports, same bytes.
    """
    out = Path(out)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; known: {list(FORMATS)}")
    if set(key["pseudonym"]) != {c.pseudonym for c in cases}:
        raise ValueError("the blinding key and the cases do not match")
    dictionary = data_dictionary(q, key)
    problems = validate_data_dictionary(dictionary)
    if problems:
        raise ValueError("the data dictionary breaks REDCap's rules: " + "; ".join(problems[:5]))
    images: dict[str, bytes] = {}
    for case in cases:
        images.update(render_case_images(case, key))
    written: dict[str, Path] = {}
    for name, data in sorted(images.items()):
        written[f"image:{name}"] = out / "images" / name
        atomic_write_bytes(written[f"image:{name}"], data)
    if "redcap" in formats:
        written["redcap_dictionary"] = out / "redcap" / "data_dictionary.csv"
        atomic_write_bytes(written["redcap_dictionary"], dictionary_csv(dictionary))
        image_fields = _image_fields(key)
        for form in dict.fromkeys(dictionary["Form Name"]):
            path = out / "redcap" / "instruments" / f"{form}.zip"
            atomic_write_bytes(path, redcap_instrument_zip(dictionary, form, images, image_fields.get(form)))
            written[f"redcap_instrument:{form}"] = path
    if "limesurvey" in formats:
        written["limesurvey"] = out / "limesurvey" / f"{q.name}.txt"
        atomic_write_bytes(written["limesurvey"], limesurvey_tsv(q, key, images))
    if "booklet" in formats:
        written["booklet"] = out / "booklet" / f"{q.name}.html"
        atomic_write_bytes(written["booklet"], booklet_html(q, dictionary, images, key).encode("utf-8"))
        if pdf is not None:
            from gestalt_xai.export.browser import open_page

            check = open_page(written["booklet"], pdf=True, chromium=pdf)
            if not check.ok or check.pdf is None:
                raise RuntimeError(f"{written['booklet']}: the booklet does not render cleanly in Chromium: "
                                   + "; ".join(check.problems()[:5]))
            written["booklet_pdf"] = written["booklet"].with_suffix(".pdf")
            atomic_write_bytes(written["booklet_pdf"], check.pdf)
    elif pdf is not None:
        raise ValueError("a PDF is printed from the booklet: add 'booklet' to the formats")
    return written


def export_run_questionnaire(run: Run, q: QuestionnaireDef, out: str | Path,
                             forbidden: set[str] | frozenset[str] = frozenset(), key_dir: str = "private",
                             formats: tuple[str, ...] | list[str] = FORMATS,
                             pdf: str | None = None) -> dict[str, Path]:
    """Export ``q`` for a ``run`` into ``out``, and the analyst's key into the run's folder ``key_dir`` (default
    ``private/``; labels ``key:*`` of the result).

    Syndrome cases come from the aggregate stage's composites and composite faces; patient cases from the map store
    and the aligned crops (:mod:`~gestalt_xai.export.cases`). Cases carry the run's pseudonyms
    (:meth:`~gestalt_xai.runs.Run.pseudonyms`, kind ``syndrome`` or ``case``). After writing, the export is scanned
    (:func:`~gestalt_xai.export.privacy.scan_export`) for the shown cases' ids and ``forbidden`` (e.g.
    :func:`~gestalt_xai.export.privacy.forbidden_values` of the cohort's image and subject ids and paths); a finding
    raises before anything is reported done.
    """
    from gestalt_xai.export.blinding import blinding_key, write_analyst_key
    from gestalt_xai.export.privacy import scan_export

    pm = run.pseudonyms()
    shown: list[str] = []  # raw ids of the cases, in the order shown
    if q.cases.unit == "syndrome":
        cases, kind, related = _syndrome_cases_of(run, q, pm, shown), "syndrome", set()
    else:
        cases, kind = _patient_cases_of(run, q, pm, shown), "case"
        meta = run.image_table().astype({"image_id": str}).set_index("image_id")
        # the shown patients' subject and syndrome ids are scanned for too (the key names image ids only)
        related = {str(meta.at[i, c]) for i in shown for c in ("subject_id", "syndrome_id")}
    key = blinding_key(q, [c.pseudonym for c in cases])
    written = export_questionnaire(q, cases, key, out, formats, pdf=pdf)
    findings = scan_export(out, set(forbidden) | set(shown) | related)
    if findings:
        raise RuntimeError(f"the questionnaire export in {out} names cohort data: {findings[:5]}")
    keys = write_analyst_key(run.dir(key_dir), key, pm.table(kind, shown), REGION_GROUPS)
    return written | {f"key:{k}": p for k, p in keys.items()}


def _syndrome_cases_of(run: Run, q: QuestionnaireDef, pm: object, shown: list[str]) -> list[Case]:
    from gestalt_xai.aggregate.stage import load_composites
    from gestalt_xai.data.images import load_image
    from gestalt_xai.errors import InputError
    from gestalt_xai.export.cases import syndrome_cases
    from gestalt_xai.viz import file_stem

    faces_table = run.path / "aggregate" / "faces.parquet"
    if not faces_table.exists():
        raise InputError(f"{faces_table} not found: run `gestalt-xai aggregate --run …` first")

    def face_of(group: str) -> object:
        shown.append(group)
        return load_image(run.path / "aggregate" / "faces" / f"{file_stem(group)}__all.png")

    return syndrome_cases(q, load_composites(run), pd.read_parquet(faces_table), face_of,
                          lambda g: pm.pseudonym("syndrome", g))  # type: ignore[attr-defined]


def _patient_cases_of(run: Run, q: QuestionnaireDef, pm: object, shown: list[str]) -> list[Case]:
    from gestalt_xai.export.cases import patient_cases
    from gestalt_xai.store import require_maps

    store, index = require_maps(run)
    images = run.image_table()
    ranks = run.ranks() if q.cases.only_correct else None

    def face_of(image_id: str) -> object:
        shown.append(image_id)
        return run.crops([image_id])[0]

    return patient_cases(q, index, images, store.load_many, face_of,
                         lambda i: pm.pseudonym("case", i), ranks)  # type: ignore[attr-defined]
