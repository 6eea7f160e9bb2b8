"""Headless Chromium for the toolkit's self-contained HTML (questionnaire booklet, reports): render checks, PDFs and
screenshots, driven by Playwright through a browser that is already installed.

``playwright install`` downloads its own browsers over the network, which the toolkit never does; instead
:func:`find_chromium` looks for a system Chromium (``$GESTALT_XAI_CHROMIUM``, then ``chromium``,
``chromium-browser``, ``google-chrome`` on ``PATH``; Debian's ``chromium`` package is what ``make test`` installs
when run as root) and Playwright launches it through its executable path. Playwright talks to the browser over pipes
(``--remote-debugging-pipe``), not a socket, and every request of the page other than ``file:`` and ``data:`` URLs
is aborted, so rendering a page opens no network connection.

Examples
--------
>>> from gestalt_xai.export.browser import find_chromium
>>> find_chromium() is None or isinstance(find_chromium(), str)
True
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from gestalt_xai.errors import ConfigError

__all__ = ["CHROMIUM_ENV", "PDF_DATE", "PageCheck", "find_chromium", "fixed_pdf_dates", "open_page",
           "require_chromium"]

#: environment variable naming the Chromium executable to use
CHROMIUM_ENV = "GESTALT_XAI_CHROMIUM"
_NAMES = ("chromium", "chromium-browser", "google-chrome")
#: the creation and modification date written into every PDF (as the ZIP exports' fixed 1980-01-01 timestamps)
PDF_DATE = b"D:19800101000000+00'00'"
_PDF_DATE = re.compile(rb"/(CreationDate|ModDate) \(D:\d{14}[+\-Z][^)]*\)")


def fixed_pdf_dates(pdf: bytes) -> bytes:
    """``pdf`` with its information dictionary's creation and modification dates set to :data:`PDF_DATE`.

    Chromium's PDFs (Skia) differ only in these two dates between two prints of one page; a date of the same
    length replaces each, so the cross-reference table's byte offsets stay valid (ISO 32000-1 §7.5.4) and two
    prints give the same bytes. A date of another length is left as it is.

    >>> fixed_pdf_dates(b"<</CreationDate (D:20261204174240+00'00')>>")
    b"<</CreationDate (D:19800101000000+00'00')>>"
    """

    def same_length(m: re.Match[bytes]) -> bytes:
        new = b"/" + m.group(1) + b" (" + PDF_DATE + b")"
        return new if len(new) == len(m.group(0)) else m.group(0)

    return _PDF_DATE.sub(same_length, pdf)


def find_chromium() -> str | None:
    """The Chromium executable to drive, or ``None`` when none is installed (or Playwright is missing)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given if Path(given).is_file() else None
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium(field_name: str) -> str:
    """:func:`find_chromium`, or a :class:`ConfigError` naming ``field_name`` (the option that asked for a PDF)."""
    path = find_chromium()
    if path is None:
        raise ConfigError(f"{field_name}: a PDF needs headless Chromium and Playwright: install Debian's `chromium` "
                          f"(`make browser` as root) and the dev extra, or set ${CHROMIUM_ENV}")
    return path


@dataclass
class PageCheck:
    """What loading one page showed.

    Attributes
    ----------
    errors: console errors, uncaught page errors and failed requests, in the order they happened.
    blocked: URLs the page asked for that are not ``file:``/``data:`` (aborted; a self-contained page has none).
    image_widths: ``naturalWidth`` of every ``<img>`` (0: not loaded).
    pdf: the page printed to PDF (A4) when asked for, its dates fixed (:func:`fixed_pdf_dates`).
    screenshot: a full-page PNG when asked for.
    """

    errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    image_widths: list[int] = field(default_factory=list)
    pdf: bytes | None = None
    screenshot: bytes | None = None

    @property
    def ok(self) -> bool:
        """No error, nothing blocked and every image loaded."""
        return not self.errors and not self.blocked and all(w > 0 for w in self.image_widths)

    def problems(self) -> list[str]:
        """One line per problem (empty when :attr:`ok`)."""
        return [*self.errors, *(f"blocked request {u}" for u in self.blocked),
                *(f"image {i} not loaded" for i, w in enumerate(self.image_widths) if w <= 0)]


def open_page(html: str | Path, *, pdf: bool = False, screenshot: bool = False, chromium: str | None = None,
              width: int = 1100) -> PageCheck:
    """Load the HTML file ``html`` in headless Chromium and report what happened (:class:`PageCheck`).

    ``pdf``: also print it (A4, backgrounds on); ``screenshot``: also take a full-page PNG at ``width`` CSS pixels.
    Raises :class:`RuntimeError` when no Chromium is found.
    """
    from playwright.sync_api import sync_playwright

    exe = chromium or find_chromium()
    if exe is None:
        raise RuntimeError("no Chromium found: install Debian's chromium (`make browser` as root) or set "
                           f"${CHROMIUM_ENV}")
    check = PageCheck()

    def route(r: object) -> None:
        url = r.request.url  # type: ignore[attr-defined]
        if url.startswith(("file:", "data:")):
            r.continue_()  # type: ignore[attr-defined]
        else:
            check.blocked.append(url)
            r.abort()  # type: ignore[attr-defined]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.route("**/*", route)
            page.on("console", lambda m: check.errors.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: check.errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: None if r.url in check.blocked
                    else check.errors.append(f"request failed: {r.url}"))
            page.goto(Path(html).resolve().as_uri())
            page.wait_for_load_state("load")
            check.image_widths = page.eval_on_selector_all(
                "img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            if screenshot:
                check.screenshot = page.screenshot(full_page=True, type="png")
            if pdf:
                check.pdf = fixed_pdf_dates(page.pdf(
                    format="A4", print_background=True,
                    margin={"top": "12mm", "bottom": "12mm", "left": "10mm", "right": "10mm"}))
        finally:
            browser.close()
    return check
