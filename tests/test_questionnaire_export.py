"""Questionnaire export: case selection, images, REDCap instrument ZIPs, LimeSurvey TSV, HTML booklet."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gestalt_xai.export.blinding import blinding_key
from gestalt_xai.export.cases import select_syndromes, syndrome_cases
from gestalt_xai.export.questionnaire import LIMESURVEY_COLUMNS, ZIP_DATE, export_questionnaire
from gestalt_xai.export.questionnaire_def import load_questionnaire
from gestalt_xai.export.redcap import COLUMNS, validate_data_dictionary
from gestalt_xai.pseudonyms import PseudonymMap, derived_secret

csv.field_size_limit(2**24)  # the LimeSurvey text of an image question holds it as a data URI
ROOT = Path(__file__).resolve().parents[1]
METHODS = ["gradcam", "lrp", "occlusion", "saliency"]
#: syndrome id → subjects: the "largest" rule must pick the largest eligible ones
SIZES = {"OMIM_162200": 40, "OMIM_194050": 30, "ORPHA_2322": 25, "OMIM_180849": 12, "OMIM_300000": 6,
         "OMIM_999001": 3}


def _tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(7)
    rows, faces = [], []
    for syn, n in SIZES.items():
        faces.append({"group": syn, "stratum": "all", "n_subjects": n, "n_images": n, "rendered": n >= 5,
                      "min_subjects": 5})
        for method in METHODS:
            if syn == "ORPHA_2322" and method == "saliency":
                continue  # incomplete: not eligible
            m = rng.normal(size=112 * 112).astype(np.float32)
            rows.append({"group": syn, "stratum": "all", "model_id": "gm", "method": method, "layer": "",
                         "target_group": "centroid:own", "normalisation": "max-abs", "n_subjects": n,
                         "n_images": n, "mean": m})
    return pd.DataFrame(rows), pd.DataFrame(faces)


def _face(syn: str) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, syn)))
    return rng.integers(0, 255, size=(112, 112, 3), dtype=np.uint8)


def _export(tmp: Path, seed: int = 0, n: int = 3) -> tuple[dict[str, Path], pd.DataFrame, object]:
    q = load_questionnaire(ROOT / "questionnaires" / "default.yaml")
    q = q.model_copy(update={"seed": seed, "cases": q.cases.model_copy(update={"n": n})})
    comp, faces = _tables()
    pm = PseudonymMap(derived_secret(3), "test")
    cases = syndrome_cases(q, comp, faces, _face, lambda s: pm.pseudonym("syndrome", s))
    key = blinding_key(q, [c.pseudonym for c in cases])
    return export_questionnaire(q, cases, key, tmp), key, q


def test_selection_follows_the_rule_and_skips_ineligible_syndromes() -> None:
    q = load_questionnaire(ROOT / "questionnaires" / "default.yaml")
    comp, faces = _tables()
    assert select_syndromes(q, comp, faces) == ["OMIM_162200", "OMIM_194050", "OMIM_180849", "OMIM_300000"]
    few = q.model_copy(update={"cases": q.cases.model_copy(update={"n": 2})})
    assert select_syndromes(few, comp, faces) == ["OMIM_162200", "OMIM_194050"]
    rnd = q.model_copy(update={"cases": q.cases.model_copy(update={"n": 2, "select": "random"})})
    picks = {tuple(select_syndromes(rnd.model_copy(update={"seed": s}), comp, faces)) for s in range(8)}
    assert len(picks) > 1 and all(set(p) <= {"OMIM_162200", "OMIM_194050", "OMIM_180849", "OMIM_300000"}
                                  for p in picks)


def test_images_are_plain_pngs_named_by_pseudonym(tmp_path) -> None:
    from PIL import Image

    written, key, _ = _export(tmp_path)
    images = sorted(p for k, p in written.items() if k.startswith("image:"))
    assert len(images) == 3 * (1 + 3)
    for p in images:
        assert p.name.split("_")[0] in set(key["pseudonym"])
        with Image.open(p) as im:
            assert im.format == "PNG" and not im.info.keys() - {"dpi"}
            assert im.size[0] >= 112
    # the face is the composite face itself, re-encoded losslessly
    first = key["pseudonym"].iloc[0]
    with Image.open(tmp_path / "images" / f"{first}_face.png") as im:
        faces = {tuple(_face(s).ravel()[:50]) for s in SIZES}
        assert tuple(np.asarray(im.convert("RGB")).ravel()[:50]) in faces


def test_instrument_zips_match_the_layout_and_are_byte_identical(tmp_path) -> None:
    a, key, q = _export(tmp_path / "a")
    b, _, _ = _export(tmp_path / "b")
    c, key_c, _ = _export(tmp_path / "c", seed=5)
    zips = {k: p for k, p in a.items() if k.startswith("redcap_instrument:")}
    assert set(zips) == {f"redcap_instrument:{f}" for f in ["gxai_eval_rater", "case_01", "case_02", "case_03",
                                                             "gxai_eval_scs"]}
    for label, path in a.items():
        assert path.read_bytes() == b[label].read_bytes(), label
    assert a["limesurvey"].read_bytes() != c["limesurvey"].read_bytes()
    assert not key.equals(key_c)
    with zipfile.ZipFile(zips["redcap_instrument:case_01"]) as z:
        names = z.namelist()
        assert names[:0] == [] and {"OriginID.txt", "instrument.csv"} <= set(names)
        assert all(i.date_time == ZIP_DATE for i in z.infolist())
        raw = z.read("instrument.csv")
        assert raw.startswith(b"\xef\xbb\xbf")
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
        assert rows[0] == COLUMNS and {r[1] for r in rows[1:]} == {"case_01"}
        fields = {r[0] for r in rows[1:]}
        attachments = [n for n in names if n.startswith("attachments/")]
        assert len(attachments) == 4
        for n in attachments:
            _, field, file = n.split("/")
            assert field in fields and file.endswith(".png")
            assert z.read(n).startswith(b"\x89PNG")
            assert (tmp_path / "a" / "images" / file).read_bytes() == z.read(n)
    assert validate_data_dictionary(a["redcap_dictionary"].read_bytes()) == []
    # the record id belongs to the project, not to an uploaded instrument; the dictionary keeps it first
    with zipfile.ZipFile(zips["redcap_instrument:gxai_eval_rater"]) as z:
        rater = list(csv.reader(io.StringIO(z.read("instrument.csv").decode("utf-8-sig"))))
    assert "record_id" not in {r[0] for r in rater} and len(rater) > 2
    assert a["redcap_dictionary"].read_text(encoding="utf-8-sig").splitlines()[1].startswith('"record_id"')


def test_limesurvey_structure(tmp_path) -> None:
    written, key, q = _export(tmp_path)
    raw = written["limesurvey"].read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig")), delimiter="\t"))
    assert list(rows[0].keys()) == LIMESURVEY_COLUMNS
    classes = [r["class"] for r in rows]
    # settings first, then groups with their questions; subquestions/answers only right after a question
    assert classes[:5] == ["S", "S", "S", "SL", "SL"] and classes[5] == "G"
    last = None
    for r in rows[5:]:
        if r["class"] in {"SQ", "A"}:
            assert last in {"Q", "SQ", "A"}
        last = r["class"]
    groups = [r["name"] for r in rows if r["class"] == "G"]
    assert groups == ["About you", "Case 1", "Case 2", "Case 3", "System Causability Scale"]
    qs = [r for r in rows if r["class"] == "Q"]
    codes = [r["name"] for r in qs]
    assert len(set(codes)) == len(codes) and all(c.isalnum() and c[0].isalpha() for c in codes)
    assert {r["type/scale"] for r in qs} <= {"L", "N", "X", "F", "M", "S", "T"}
    # each Likert array: three statements, five answers; the preference: A/B/no preference
    lik = next(i for i, r in enumerate(rows) if r["name"] == "c01lika")
    assert [r["class"] for r in rows[lik + 1: lik + 9]] == ["SQ"] * 3 + ["A"] * 5
    pref = next(i for i, r in enumerate(rows) if r["name"] == "c01pref")
    assert [r["text"] for r in rows[pref + 1: pref + 4]] == ["Map A", "Map B", "No preference"]
    scs = next(i for i, r in enumerate(rows) if r["name"] == "scs")
    assert [r["class"] for r in rows[scs + 1: scs + 16]] == ["SQ"] * 10 + ["A"] * 5
    images = [r for r in qs if r["type/scale"] == "X"]
    assert len(images) == 3 * 4 and all('src="data:image/png;base64,' in r["text"] for r in images)
    assert all(r["mandatory"] in {"Y", "N"} for r in qs)


def test_booklet_is_self_contained(tmp_path) -> None:
    written, key, q = _export(tmp_path)
    html = written["booklet"].read_text(encoding="utf-8")
    assert html.count('<img src="data:image/png;base64,') == 3 * 4
    assert "http://" not in html and "https://" not in html and "src=\"images/" not in html
    for label in ("Map A", "Map B", "Map C", "System Causability Scale", q.scs.statements[0]):
        assert label in html


def _export_with_pdf(tmp: Path, chromium: str) -> dict[str, Path]:
    q = load_questionnaire(ROOT / "questionnaires" / "default.yaml")
    q = q.model_copy(update={"cases": q.cases.model_copy(update={"n": 3})})
    comp, faces = _tables()
    pm = PseudonymMap(derived_secret(3), "test")
    cases = syndrome_cases(q, comp, faces, _face, lambda s: pm.pseudonym("syndrome", s))
    return export_questionnaire(q, cases, blinding_key(q, [c.pseudonym for c in cases]), tmp, pdf=chromium)


def test_booklet_renders_in_chromium_with_every_image_and_prints_to_pdf(tmp_path, chromium) -> None:
    from gestalt_xai.export.browser import open_page

    written = _export_with_pdf(tmp_path, chromium)
    check = open_page(written["booklet"], screenshot=True, chromium=chromium)
    assert len(check.image_widths) == 12 and all(w > 0 for w in check.image_widths), check.image_widths
    assert check.errors == [] and check.blocked == []
    pdf = written["booklet_pdf"].read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page") - pdf.count(b"/Type /Pages") >= 3
    assert b"/CreationDate (D:19800101000000+00'00')" in pdf
    assert _export_with_pdf(tmp_path / "again", chromium)["booklet_pdf"].read_bytes() == pdf, "same seed, same PDF"
    # a broken image and an outside request are caught, not ignored
    html = written["booklet"].read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace('<img src="data:image/png;base64,', '<img src="data:image/png;base64,AAAA', 1)
                      .replace("</body>", '<img src="https://example.org/x.png"></body>'), encoding="utf-8")
    bad = open_page(broken, chromium=chromium)
    assert not bad.ok and sum(w == 0 for w in bad.image_widths) == 2 and bad.blocked == ["https://example.org/x.png"]


def test_pdf_needs_the_booklet(tmp_path) -> None:
    q = load_questionnaire(ROOT / "questionnaires" / "default.yaml")
    comp, faces = _tables()
    pm = PseudonymMap(derived_secret(3), "test")
    cases = syndrome_cases(q, comp, faces, _face, lambda s: pm.pseudonym("syndrome", s))
    with pytest.raises(ValueError, match="booklet"):
        export_questionnaire(q, cases, blinding_key(q, [c.pseudonym for c in cases]), tmp_path,
                             formats=["redcap"], pdf="/usr/bin/chromium")


def _cohort() -> pd.DataFrame:
    """The cohort behind the composites: what no exported file may name."""
    rows = []
    for syn, n in SIZES.items():
        for k in range(n):
            rows.append({"image_id": f"img_{syn[-4:]}_{k:03d}", "subject_id": f"subj{syn[-4:]}{k:03d}",
                         "path": f"/data/cohort/{syn}/patient_{syn[-4:]}_{k:03d}.jpg", "syndrome_id": syn})
    return pd.DataFrame(rows)


def test_privacy_scan_finds_nothing_in_an_export(tmp_path) -> None:
    from gestalt_xai.export.privacy import forbidden_values, scan_export

    _export(tmp_path)
    cohort = _cohort()
    forbidden = forbidden_values([*cohort["image_id"], *cohort["subject_id"], *cohort["syndrome_id"]],
                                 cohort["path"])
    assert "OMIM_162200" in forbidden and "patient_2200_000.jpg" in forbidden
    assert scan_export(tmp_path, forbidden) == []


def test_privacy_scan_catches_each_kind_of_leak(tmp_path) -> None:
    import base64

    from PIL import Image, PngImagePlugin

    from gestalt_xai.export.privacy import forbidden_values, scan_bytes, scan_export
    from gestalt_xai.export.questionnaire import deterministic_zip

    forbidden = forbidden_values(["OMIM_162200", "s07"], ["/data/cohort/patient_7.jpg"])
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "harmless")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG", pnginfo=info)
    tagged = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    clean = buf.getvalue()
    assert scan_bytes(clean, forbidden, "x.png") == []
    assert scan_bytes(tagged, forbidden, "x.png") == ["x.png: PNG metadata chunk tEXt"]
    assert scan_bytes(b"case of omim_162200, ok", forbidden, "t.csv") == ["t.csv: contains 'omim_162200'"]
    assert scan_bytes(b"see /data/cohort/patient_7.jpg", forbidden, "t")  # the path (and its name) as text
    assert scan_bytes(b"Rater s07\t3", forbidden, "t") == ["t: contains 's07'"]
    assert scan_bytes(b"class07 s070 subject", forbidden, "t") == []  # tokens, not substrings, for short ids
    uri = b'<img src="data:image/png;base64,' + base64.b64encode(tagged) + b'">'
    assert scan_bytes(uri, forbidden, "b.html") == ["b.html:data-uri[0]: PNG metadata chunk tEXt"]
    z = deterministic_zip({"instrument.csv": b"a,OMIM_162200\n", "attachments/f/patient_7.png": clean})
    found = scan_bytes(z, forbidden, "i.zip")
    assert "i.zip:instrument.csv: contains 'omim_162200'" in found
    assert any("attachments/f/patient_7.png: its name contains 'patient_7'" in f for f in found)
    (tmp_path / "OMIM_162200_face.png").write_bytes(clean)
    assert scan_export(tmp_path, forbidden) == ["OMIM_162200_face.png: its name contains 'OMIM_162200'"]


def test_export_from_an_aggregated_run_keeps_the_key_private(tmp_path) -> None:
    from gestalt_xai.data.images import save_png
    from gestalt_xai.export.questionnaire import export_run_questionnaire
    from gestalt_xai.runs import Run, write_parquet

    run = Run(tmp_path / "run")
    comp, faces = _tables()
    write_parquet(comp, run.dir("aggregate") / "composites.parquet")
    write_parquet(faces, run.path / "aggregate" / "faces.parquet")
    for syn in faces.loc[faces["rendered"], "group"]:
        save_png(run.dir("aggregate/faces") / f"{syn}__all.png", _face(syn))
    q = load_questionnaire(ROOT / "questionnaires" / "default.yaml")
    written = export_run_questionnaire(run, q, tmp_path / "export")
    cases_key = pd.read_csv(written["key:cases_key"])
    assert sorted(cases_key["raw_id"]) == ["OMIM_162200", "OMIM_180849", "OMIM_194050", "OMIM_300000"]
    pm = run.pseudonyms()
    assert all(pm.pseudonym("syndrome", r) == p for r, p in zip(cases_key["raw_id"], cases_key["pseudonym"],
                                                                         strict=True))
    assert all(written[k].is_relative_to(run.path / "private") for k in written if k.startswith("key:"))
    assert not any(p.is_relative_to(run.path / "private") for k, p in written.items() if not k.startswith("key:"))
    assert {p.name.split("_")[0] for p in (tmp_path / "export" / "images").iterdir()} == set(cases_key["pseudonym"])


def test_booklet_escapes_every_text(tmp_path) -> None:
    """A definition's texts are the study team's, but they reach a browser: markup in them shows as text."""
    q = load_questionnaire(ROOT / "questionnaires" / "default.yaml")
    evil = "<script>alert(1)</script> & <b>bold</b>"
    q = q.model_copy(update={"title": evil, "introduction": evil, "cases": q.cases.model_copy(update={"n": 2})})
    comp, faces = _tables()
    pm = PseudonymMap(derived_secret(3), "test")
    cases = syndrome_cases(q, comp, faces, _face, lambda s: pm.pseudonym("syndrome", s))
    written = export_questionnaire(q, cases, blinding_key(q, [c.pseudonym for c in cases]), tmp_path,
                                   formats=["booklet"])
    html = written["booklet"].read_text(encoding="utf-8")
    assert "<script>" not in html and "<b>bold" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html


def test_privacy_scan_reads_a_pdfs_own_text_and_streams() -> None:
    import zlib

    from gestalt_xai.export.privacy import forbidden_values, scan_bytes

    forbidden = forbidden_values(["OMIM_162200"], [])

    def pdf(title: str, stream: bytes, kind: bytes = b"") -> bytes:
        body = zlib.compress(stream)
        return (b"%PDF-1.4\n1 0 obj\n<< /Title (" + title.encode() + b") >>\nendobj\n2 0 obj\n<< /Length "
                + str(len(body)).encode() + kind + b" /Filter /FlateDecode >>\nstream\n" + body
                + b"\nendstream\nendobj\n%%EOF\n")

    assert scan_bytes(pdf("Questionnaire", b"BT /F1 12 Tf (Case 1) Tj ET"), forbidden, "b.pdf") == []
    assert scan_bytes(pdf("OMIM_162200", b"BT ET"), forbidden, "b.pdf") == ["b.pdf: contains 'omim_162200'"]
    # a link target inside an object stream, XMP metadata
    assert scan_bytes(pdf("Q", b"<< /URI (file:///OMIM_162200/x) >>", b" /Type /ObjStm"), forbidden, "b.pdf")
    assert scan_bytes(pdf("Q", b"<dc:title>OMIM_162200</dc:title>", b" /Type /Metadata"), forbidden, "b.pdf")
    # content, image and font streams are glyph codes and binary data, not text: never tokenised (no chance
    # findings of numeric ids among glyph codes and lengths)
    numeric = forbidden_values(["0003", "1234"], [])
    assert scan_bytes(pdf("Q", b"<0003> Tj /Length 1234", b" /Length1 1234"), numeric, "b.pdf") == []
    # base64 is not text either: a data URI is decoded and scanned as the image it holds
    import base64

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (3, 0, 3)).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    runs = [t for t in uri.replace("+", " ").replace("/", " ").split() if t.isalnum()]
    assert scan_bytes(f"<img src='{uri}'>".encode(), forbidden_values(runs[-2:], []), "x.html") == []
