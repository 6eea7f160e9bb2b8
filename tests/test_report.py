"""The per-patient reports (gestalt_xai.export.report, the report stage): what a page shows, that it renders in
headless Chromium with its face and maps drawn, that nothing on it names the cohort, that gallery photos need
consent, that markup in a name stays text, and that the stage is deterministic, resumable and fails per photo."""

from __future__ import annotations

import dataclasses
import io
import re
import shutil

import numpy as np
import pandas as pd
import pytest

import gestalt_xai.export.report_stage  # noqa: F401  (registers the stage: the entry point may not be installed)
from gestalt_xai.attribution.explain import ExplainConfig, explain_stage
from gestalt_xai.data.cohort import save_run_cohort
from gestalt_xai.export.privacy import forbidden_values, scan_export
from gestalt_xai.export.report import CONSENT_COLUMN, correct_match_distances, distance_percentile, showable
from gestalt_xai.export.report_stage import report_stage
from gestalt_xai.matching import MatchConfig, match_stage
from gestalt_xai.runs import Run

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def explained(trained_run, tmp_path_factory) -> Run:
    """A copy of ``trained_run`` with one test subject undiagnosed, matched, and explained as the demo explains:
    three test photos towards their diagnosis and their first suggestion, the undiagnosed one towards its top-2 and
    their contrast. No assess, no aggregate (optional inputs)."""
    run = Run(shutil.copytree(trained_run.path, tmp_path_factory.mktemp("report") / "run"))
    cohort = run.cohort()
    images = cohort.images.copy()
    tests = sorted(run.image_table().query("test")["subject_id"])
    images.loc[images["subject_id"] == tests[0], "syndrome_id"] = ""
    save_run_cohort(run, dataclasses.replace(cohort, images=images))  # a label "" is stored as undiagnosed
    match_stage(run, MatchConfig(tta=False))
    base = {"methods": ["gradcam", "saliency"], "overlay": 0, "threads": 2}
    some = sorted(run.image_table().query("test")["image_id"])[:3]  # the others' pages say "not computed"
    explain_stage(run, ExplainConfig(**base, syndromes="label", images=some))
    explain_stage(run, ExplainConfig(**base, syndromes="topk:1", images=some), instance="explain#2")
    explain_stage(run, ExplainConfig(**base, syndromes="topk:2", images="undiagnosed"), instance="explain#3")
    explain_stage(run, ExplainConfig(**base, target="contrast", syndromes="topk:2", images="undiagnosed"),
                  instance="explain#4")
    return run


def _copy(run: Run, tmp_path, name: str = "run") -> Run:
    return Run(shutil.copytree(run.path, tmp_path / name))


@pytest.fixture(scope="module")
def reported(explained, tmp_path_factory) -> Run:
    run = Run(shutil.copytree(explained.path, tmp_path_factory.mktemp("reported") / "run"))
    report_stage(run, {})
    return run


def _pages(run: Run) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((run.path / "reports").glob("C-*.html"))}


def _page_of(run: Run, image_id: str) -> str:
    return (run.path / "reports" / f"{run.pseudonyms().pseudonym('case', image_id)}.html").read_text("utf-8")


# ------------------------------------------------------------------------------------------------ numbers
def test_percentile_among_correct_match_distances_on_a_hand_made_table():
    # photo a found its syndrome X at 0.1, b found Y at 0.3, c found X at 0.5; d is undiagnosed, e's syndrome Z is
    # not in the gallery: neither gives a reference distance
    s = pd.DataFrame({"image_id": list("aabbccdde"), "rank": [1, 2] * 4 + [1],
                      "syndrome_id": ["X", "Y", "X", "Y", "Y", "X", "X", "Y", "X"],
                      "distance": [0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.05, 0.06, 0.7]})
    ref = correct_match_distances(s, {"a": "X", "b": "Y", "c": "X", "d": "UNKNOWN", "e": "Z"})
    assert ref.tolist() == [0.1, 0.3, 0.5]
    assert [distance_percentile(d, ref) for d in (0.05, 0.1, 0.2, 0.3, 0.45, 0.5, 0.9)] == \
        pytest.approx([0.0, 100 / 3, 100 / 3, 200 / 3, 200 / 3, 100.0, 100.0])
    assert np.isnan(distance_percentile(0.2, np.array([])))


def test_consent_column_defaults_to_not_showable():
    t = pd.DataFrame({"image_id": ["a", "b", "c", "d"], CONSENT_COLUMN: [True, False, None, "yes"]})
    assert showable(t) == {"a": True, "b": False, "c": False, "d": False}
    assert showable(t.drop(columns=CONSENT_COLUMN)) == dict.fromkeys("abcd", False)


# ------------------------------------------------------------------------------------------------ content
def test_every_patient_gets_a_page_with_its_ranking_maps_and_not_computed_sections(reported):
    run = reported
    table = run.image_table()
    undiagnosed = sorted(table.loc[table["undiagnosed"], "image_id"])
    test = sorted(table.loc[table["test"], "image_id"])
    pages = _pages(run)
    assert len(pages) == len(test) + len(undiagnosed) and undiagnosed
    pm = run.pseudonyms()
    assert set(pages) == {f"{pm.pseudonym('case', i)}.html" for i in test + undiagnosed}
    # the undiagnosed photo's ranking is the match stage's suggestion list, and its contrast maps are shown
    suggestions = pd.read_parquet(run.path / "matching" / "suggestions.parquet")
    names = dict(zip(run.cohort().syndromes["syndrome_id"], run.cohort().syndromes["syndrome_name"], strict=True))
    page = _page_of(run, undiagnosed[0])
    listed = re.findall(r'<td class="num">(\d+)</td><td>([^<]*) <span class="note">\(([^)]*)\)', page)
    top = suggestions[suggestions["image_id"] == undiagnosed[0]].sort_values("rank")
    assert [s for _, _, s in listed] == top["syndrome_id"].head(len(listed)).tolist()
    assert "(contrast target)" in page and "undiagnosed</strong>" in page
    first, second = top["syndrome_id"].iloc[0], top["syndrome_id"].iloc[1]
    assert f"Towards {names[first]} (suggestion 1" in page and f"Towards {names[second]} (suggestion 2" in page
    # a test photo: maps towards its first suggestion and its diagnosis; optional inputs absent → "not computed"
    page = _page_of(run, test[0])
    assert "suggestion 1" in page and "the patient&#39;s diagnosis" in page
    assert "consensus of 2 method(s)" in page and 'id="regions"' in page
    assert "not computed: the run has no assessment" in page
    page = _page_of(run, test[-1])  # not explained: its map sections and region table say so
    assert "not computed: no maps towards this syndrome" in page and "not computed: no map to score" in page
    index = (run.path / "reports" / "index.html").read_text("utf-8")
    assert all(f'href="{name}"' in index for name in pages)
    assert "not computed: the run has no composite" in index


def test_no_page_names_the_cohort(reported):
    images = reported.cohort().images
    forbidden = forbidden_values(pd.concat([images["image_id"], images["subject_id"]]), images["path"])
    assert scan_export(reported.path / "reports", forbidden) == []


def test_gallery_photos_are_shown_only_with_consent(explained, tmp_path):
    run = _copy(explained, tmp_path)
    cohort = run.cohort()
    gallery = sorted(run.image_table().query("gallery")["image_id"])
    allowed = set(gallery[::2])
    images = cohort.images.assign(**{CONSENT_COLUMN: [True if i in allowed else None if k % 3 else False
                                                      for k, i in enumerate(cohort.images["image_id"])]})
    save_run_cohort(run, dataclasses.replace(cohort, images=images))
    report_stage(run, {"nearest": 4})
    pm = run.pseudonyms()
    of = {pm.pseudonym("case", i): i for i in gallery}
    shown, hidden = set(), set()
    for page in _pages(run).values():
        for fig in re.findall(r'<figure class="neighbour">(.*?)</figure>', page, flags=re.S):
            pseudonym = re.search(r"\d+\. (C-[A-Z2-7]+)<br>", fig).group(1)
            (shown if "<img " in fig else hidden).add(of[pseudonym])
    assert shown and hidden and shown <= allowed and not hidden & allowed


# ------------------------------------------------------------------------------------------------ browser
def _inspect(path, chromium: str) -> dict:
    """Open a page in Chromium as a reader would: its text, script elements, dialogs, and the boxes of its face
    and first map image (CSS pixels of a full-page screenshot at the same width)."""
    from playwright.sync_api import sync_playwright

    dialogs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(("file:", "data:")) else r.abort())
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(path.resolve().as_uri())
            page.wait_for_load_state("load")
            box = "e => { const r = e.getBoundingClientRect(); return [r.x + scrollX, r.y + scrollY, r.width, " \
                  "r.height]; }"
            boxes = {k: page.eval_on_selector(sel, box) for k, sel in (("face", "#face img"), ("map", "figure.map img"))
                     if page.query_selector(sel) is not None}
            return {"text": page.inner_text("body"), "scripts": page.eval_on_selector_all("script", "e => e.length"),
                    "dialogs": dialogs, **boxes}
        finally:
            browser.close()


def _crop(shot: np.ndarray, box: list[float]) -> np.ndarray:
    x, y, w, h = (int(round(v)) for v in box)
    return shot[y + 2:y + h - 2, x + 2:x + w - 2, :3].astype(np.float64)


def test_a_report_renders_in_chromium_with_its_face_and_map_drawn(reported, chromium):
    from PIL import Image

    from gestalt_xai.export.browser import open_page

    table = reported.image_table()
    image_id = sorted(table.loc[table["test"], "image_id"])[0]
    path = reported.path / "reports" / f"{reported.pseudonyms().pseudonym('case', image_id)}.html"
    check = open_page(path, screenshot=True, chromium=chromium)
    assert check.ok, check.problems()
    assert len(check.image_widths) >= 5 and all(w > 0 for w in check.image_widths)
    assert open_page(reported.path / "reports" / "index.html", chromium=chromium).ok
    shot = np.asarray(Image.open(io.BytesIO(check.screenshot)).convert("RGB"))
    seen = _inspect(path, chromium)
    face, map_ = _crop(shot, seen["face"]), _crop(shot, seen["map"])
    # the face: a drawn photo (not blank, not one flat colour) in colour (skin is not gray)
    assert face.std() > 20 and face.mean() < 245
    chroma = face.max(axis=2) - face.min(axis=2)
    assert np.median(chroma) > 10
    # the map: drawn over a gray face, so its colourful pixels come from the colour map: the first map is Grad-CAM
    # (signed, RdBu_r): strongly red or blue pixels, each with the red/blue balance of the colour map
    m = map_
    strong = (m.max(axis=2) - m.min(axis=2)) > 40
    assert strong.mean() > 0.02
    rb = m[strong][:, 0] - m[strong][:, 2]
    assert (np.abs(rb) > 30).mean() > 0.9  # red-dominant or blue-dominant, never a gray or green cast


def test_markup_in_a_syndrome_name_shows_as_text(explained, tmp_path, chromium):
    run = _copy(explained, tmp_path)
    cohort = run.cohort()
    syndromes = cohort.syndromes.copy()
    syndromes["syndrome_name"] = syndromes["syndrome_name"].astype(str) + " " + SCRIPT
    save_run_cohort(run, dataclasses.replace(cohort, syndromes=syndromes))
    report_stage(run, {})
    image_id = sorted(run.image_table().query("test")["image_id"])[0]
    page = run.path / "reports" / f"{run.pseudonyms().pseudonym('case', image_id)}.html"
    for path in (page, run.path / "reports" / "index.html"):
        html = path.read_text("utf-8")
        assert SCRIPT not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    seen = _inspect(page, chromium)
    assert SCRIPT in seen["text"] and seen["scripts"] == 0 and seen["dialogs"] == []


# ------------------------------------------------------------------------------------------------ stage
def test_same_run_same_bytes_and_a_rerun_reuses_unchanged_pages(reported, tmp_path):
    run = _copy(reported, tmp_path)
    before = {p.name: p.read_bytes() for p in (run.path / "reports").glob("*.html")}
    result = report_stage(run, {})
    assert result.extra["n_reused"] == len(before) - 1 and result.extra["n_written"] == 0
    shutil.rmtree(run.path / "reports")
    result = report_stage(run, {})
    assert result.extra["n_written"] == len(before) - 1
    assert {p.name: p.read_bytes() for p in (run.path / "reports").glob("*.html")} == before


def test_a_broken_map_is_one_error_row_and_the_other_pages_are_written(explained, tmp_path):
    run = _copy(explained, tmp_path)
    store = run.map_store()
    index = store.index().copy()
    victim = sorted(run.image_table().query("test")["image_id"])[1]
    index.loc[index["image_id"] == victim, "chunk"] = "w9-999999"  # its maps point at a chunk that is not there
    for fragment in (run.path / "maps" / "index").glob("*.parquet"):
        fragment.unlink()
    index.to_parquet(run.path / "maps" / "index.parquet", index=False)
    result = report_stage(run, {})
    errors = run.errors().query("stage == 'report'")
    assert errors["item_id"].tolist() == [victim] and result.errors == 1
    pages = _pages(run)
    assert len(pages) == result.items - 1
    assert f"{run.pseudonyms().pseudonym('case', victim)}.html" not in pages


def test_pdf_always_prints_each_page(explained, tmp_path, chromium):
    run = _copy(explained, tmp_path)
    result = report_stage(run, {"patients": "undiagnosed", "pdf": "always"})
    pdfs = sorted((run.path / "reports").glob("C-*.pdf"))
    assert len(pdfs) == result.items >= 1 and all(p.read_bytes().startswith(b"%PDF") for p in pdfs)
    assert [p.with_suffix(".html").name for p in pdfs] == sorted(_pages(run))
