"""Safe image loading and metadata-free image writing.

:func:`load_image` is the single way the toolkit reads a photo: it applies the EXIF orientation, converts every
supported mode (grayscale, RGBA/LA/palette with transparency composited over white, CMYK, 16-bit) to 8-bit RGB,
reads only the first frame of animations, and refuses decompression bombs by pixel count *before* decoding. Every
failure raises :class:`~gestalt_xai.errors.InputError` naming the file, so a stage can turn it into one error row.

Everything the toolkit writes is PNG (or JPEG for synthetic "raw photos") without EXIF or text chunks: patient photos
often carry camera, date and GPS metadata, which must never travel into exports.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gestalt_xai.errors import InputError
from gestalt_xai.runs import atomic_write_bytes

__all__ = ["DEFAULT_MAX_PIXELS", "SUPPORTED_FORMATS", "load_image", "encode_jpeg", "encode_png", "save_png",
           "save_jpeg"]

#: refuse photos with more pixels than this (a 50-megapixel camera photo still passes)
DEFAULT_MAX_PIXELS = 50_000_000
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "GIF"})

# magic numbers of formats people do upload but we do not read, to say what they are
_KNOWN_UNSUPPORTED = {
    b"ftypheic": "HEIC", b"ftypheix": "HEIC", b"ftypmif1": "HEIF", b"ftypavif": "AVIF", b"ftyphevc": "HEIC",
}


def _sniff_unsupported(head: bytes) -> str | None:
    return next((name for magic, name in _KNOWN_UNSUPPORTED.items() if magic in head[:32]), None)


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode we accept to an HxWx3 uint8 RGB array."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data (or 32-bit integer containers of 16-bit data): rescale the full 16-bit range to 8 bits
        scale = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        gray = np.clip(np.rint(arr * (255.0 / scale)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    rgb = img.convert("RGB")  # L, 1, CMYK, YCbCr, RGBX, RGBA (composited)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a photo as an ``H×W×3`` uint8 RGB array with its EXIF orientation applied.

    Parameters
    ----------
    path:
        JPEG, PNG, BMP, TIFF, WebP or GIF (first frame) file.
    max_pixels:
        Refuse images with more pixels (checked from the header, before decoding).

    Raises
    ------
    InputError
        The file is missing, empty, truncated, damaged, not an image, of an unsupported format (e.g. HEIC) or too
        large; the message names the file. No other exception escapes, whatever the bytes (``tests/test_properties.py``
        and ``scripts/fuzz.py`` check this).

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> p = Path(tempfile.mkdtemp()) / "x.png"
    >>> save_png(p, np.zeros((4, 5, 3), np.uint8))
    >>> load_image(p).shape
    (4, 5, 3)
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'a folder, not an image file' if path.is_dir() else 'file not found'}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:  # permissions, a file that vanished
        raise InputError(f"{path}: cannot read the file: {exc}") from None
    if size == 0:
        raise InputError(f"{path}: empty file")
    if (kind := _sniff_unsupported(head)) is not None:
        raise InputError(f"{path}: {kind} images are not supported; convert the photo to JPEG or PNG")
    try:
        with warnings.catch_warnings():
            # we apply our own, stricter pixel limit below; PIL's warning would only add noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format not in SUPPORTED_FORMATS:
                    raise InputError(f"{path}: {img.format} images are not supported "
                                     f"(supported: {', '.join(sorted(SUPPORTED_FORMATS))})")
                w, h = img.size
                if w * h > max_pixels:
                    raise InputError(f"{path}: image has {w}×{h} = {w * h:,} pixels, more than the limit of "
                                     f"{max_pixels:,} (possible decompression bomb); raise max_pixels if it is genuine")
                if w == 0 or h == 0:
                    raise InputError(f"{path}: image has zero size")
                img.seek(0)  # first frame of animated GIF/WebP/TIFF stacks
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb8(img)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: damaged or truncated image: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders fail on damaged data with many more types
        # (TypeError from TIFF strip maps, struct.error, IndexError, ...): all mean the file is damaged
        raise InputError(f"{path}: damaged image ({type(exc).__name__}: {exc})") from None


def _as_bgr(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        raise InputError(f"expected a uint8 image, got dtype {arr.dtype}")
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"expected an H×W×3 RGB image, got shape {arr.shape}")
    return np.ascontiguousarray(arr[..., ::-1])


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an RGB (or grayscale) uint8 array as PNG bytes without any metadata chunk; deterministic."""
    ok, buf = cv2.imencode(".png", _as_bgr(rgb), [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:  # pragma: no cover - cv2 only fails on invalid arrays, rejected above
        raise InputError("PNG encoding failed")
    return buf.tobytes()


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    """Atomically write an RGB uint8 array as a metadata-free PNG."""
    atomic_write_bytes(path, encode_png(rgb))


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB uint8 array as JPEG bytes with a plain JFIF header (no EXIF, no comment); deterministic."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    ok, buf = cv2.imencode(".jpg", _as_bgr(rgb), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover
        raise InputError("JPEG encoding failed")
    return buf.tobytes()


def save_jpeg(path: str | Path, rgb: np.ndarray, quality: int = 90) -> None:
    """Atomically write an RGB uint8 array as a JPEG (:func:`encode_jpeg`)."""
    atomic_write_bytes(path, encode_jpeg(rgb, quality))
