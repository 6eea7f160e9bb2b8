"""Privacy scan of an export: no file may name an image, a subject, a file or a path of the cohort.

Every file under the export folder is read as bytes and scanned by its kind:

* **PNG** (PNG specification, W3C 2003, §11.3): any ancillary text or metadata chunk (``tEXt``, ``zTXt``, ``iTXt``,
  ``eXIf``, ``tIME``) is a finding, whatever it says: exported images carry pixels only;
* **JPEG**: any APP1 (EXIF/XMP) or COM segment is a finding;
* **file and member names**: a forbidden value as a token (split at ``_`` too) or, from 6 characters on, anywhere;
* **ZIP**: each member is scanned the same way, recursively (``zip.zip:attachments/…``);
* **PDF** (ISO 32000-1): the file's own strings — the document information dictionary (title, author, subject,
  keywords …), link targets, outline titles, outside streams or inside object streams — and its XMP metadata. The
  page text of a PDF printed by the toolkit is the HTML it was printed from (scanned too); in a content stream it is
  written as glyph codes, which this scan does not map back to letters;
* **text** (anything else that decodes as UTF-8): token by token: the text is split into tokens at every character
  that is not a letter, digit, ``_``, ``-`` or ``.``, and a token equal (case-insensitively) to a forbidden id is a
  finding; forbidden values with a separator in them (paths, names with spaces) are also searched as substrings.
  ``data:`` URIs are decoded and scanned as the files they hold (the booklet's and LimeSurvey's inline images), and
  left out of the text's tokens (base64 is not text: its runs between ``+`` and ``/`` would match numeric ids by
  chance).
"""

from __future__ import annotations

import base64
import io
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

__all__ = ["forbidden_values", "scan_bytes", "scan_export"]

_PNG = b"\x89PNG\r\n\x1a\n"
_PNG_METADATA = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}
_TOKEN_SPLIT = re.compile(r"[^\w.\-]+")
_DATA_URI = re.compile(r"data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)")
_PDF_STREAM = re.compile(rb"<<((?:(?!stream).){0,2000}?)>>\s*stream\r?\n", re.S)
_PDF_STRING = re.compile(rb"\((?:\\.|[^\\)])*\)", re.S)


def forbidden_values(ids: Iterable[object], paths: Iterable[object] = ()) -> set[str]:
    """What no export may contain: the ``ids`` (image and subject ids, syndrome ids of the cases) and, for each of
    ``paths``, the path, its file name and its stem.

    >>> sorted(forbidden_values(["s01"], ["/data/x/img 7.jpg"]))
    ['/data/x/img 7.jpg', 'img 7', 'img 7.jpg', 's01']
    """
    out = {str(i) for i in ids if str(i)}
    for p in paths:
        path = Path(str(p))
        out |= {str(p), path.name, path.stem}
    return {v for v in out if v.strip()}


def _png_findings(data: bytes, where: str) -> list[str]:
    found, pos = [], len(_PNG)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind in _PNG_METADATA:
            found.append(f"{where}: PNG metadata chunk {kind.decode('latin-1')}")
        pos += 12 + length
    return found


def _jpeg_findings(data: bytes, where: str) -> list[str]:
    found, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xDA:  # start of scan: no more header segments
            break
        if marker in (0xE1, 0xFE):
            found.append(f"{where}: JPEG {'EXIF/XMP' if marker == 0xE1 else 'comment'} segment")
        pos += 2 + length
    return found


def _text_findings(text: str, forbidden: set[str], where: str) -> list[str]:
    lower = {f.lower() for f in forbidden}
    uris = list(_DATA_URI.finditer(text))
    text_only = _DATA_URI.sub(" ", text) if uris else text
    tokens = {t.lower() for t in _TOKEN_SPLIT.split(text_only) if t}
    found = [f"{where}: contains {t!r}" for t in sorted(tokens & lower)]
    low = text_only.lower()
    found += [f"{where}: contains {f!r}" for f in sorted(lower - tokens) if _TOKEN_SPLIT.search(f) and f in low]
    for k, m in enumerate(uris):
        found += scan_bytes(base64.b64decode(m.group(1)), forbidden, f"{where}:data-uri[{k}]")
    return found


def _pdf_findings(data: bytes, forbidden: set[str], where: str) -> list[str]:
    """A PDF's strings outside its streams (information dictionary, link targets, outline titles) and its XMP
    metadata streams, scanned as text (module docstring). Numbers, names and other streams are structure, not text:
    scanning them would report chance matches of numeric ids (object lengths, glyph codes)."""
    texts, pos = [], 0
    for m in _PDF_STREAM.finditer(data):
        end = data.find(b"endstream", m.end())
        if end < 0:
            break
        texts += [t.decode("latin-1") for t in _PDF_STRING.findall(data[pos:m.start()] + b"<<" + m.group(1))]
        pos = end
        if b"/Metadata" in m.group(1) or b"/ObjStm" in m.group(1):
            body = data[m.end():end]
            try:
                body = zlib.decompress(body) if b"/FlateDecode" in m.group(1) else body
            except zlib.error:
                pass
            if b"/Metadata" in m.group(1):  # XMP: XML text
                texts.append(body.decode("latin-1"))
            else:  # an object stream: objects whose strings count like those outside streams
                texts += [t.decode("latin-1") for t in _PDF_STRING.findall(body)]
    texts += [t.decode("latin-1") for t in _PDF_STRING.findall(data[pos:])]
    return _text_findings("\n".join(texts), forbidden, where)


def _name_findings(name: str, forbidden: set[str], where: str) -> list[str]:
    """A file or member name: a token equal to a forbidden value, or a forbidden value of ≥ 6 characters anywhere
    in it (``img_0001_face.png``); shorter ids only as whole tokens, as they occur by chance inside pseudonyms."""
    tokens = {t.lower() for t in re.split(r"[^\w\-]+|_", name) if t} | {t.lower() for t in _TOKEN_SPLIT.split(name)}
    return [f"{where}: its name contains {f!r}" for f in sorted(forbidden)
            if f.lower() in tokens or (len(f) >= 6 and f.lower() in name.lower())]


def scan_bytes(data: bytes, forbidden: set[str], where: str) -> list[str]:
    """The findings in one file's bytes (module docstring); ``where`` names the file in each finding."""
    if data.startswith(_PNG):
        return _png_findings(data, where)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_findings(data, where)
    if data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
        found = []
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in z.namelist():
                found += _name_findings(name, forbidden, f"{where}:{name}")
                found += scan_bytes(z.read(name), forbidden, f"{where}:{name}")
        return found
    if data.startswith(b"%PDF-"):
        return _pdf_findings(data, forbidden, where)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [f"{where}: binary file of unknown kind (cannot be checked)"]
    return _text_findings(text, forbidden, where)


def scan_export(folder: str | Path, forbidden: set[str]) -> list[str]:
    """The findings in every file under ``folder`` (file names and relative paths included); empty: clean."""
    folder = Path(folder)
    found: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        found += _name_findings(rel, forbidden, rel)
        found += scan_bytes(path.read_bytes(), forbidden, rel)
    return found
