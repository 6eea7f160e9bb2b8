"""Safe image loading: formats, modes, orientation, guards, and metadata-free writing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gestalt_xai.data.images import encode_png, load_image, save_jpeg, save_png
from gestalt_xai.errors import InputError


def _gradient(h: int = 24, w: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 90)], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif"),
                                        ("WEBP", ".webp"), ("GIF", ".gif")])
def test_formats_load_as_rgb8(tmp_path: Path, fmt: str, suffix: str) -> None:
    rgb = _gradient()
    path = tmp_path / f"x{suffix}"
    Image.fromarray(rgb).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = load_image(path)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    tol = {"JPEG": 30, "GIF": 40}.get(fmt, 0)  # lossy formats / palette quantisation
    assert np.abs(out.astype(int) - rgb).mean() <= max(tol / 4, 0.5)


def test_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    out = load_image(tmp_path / "a.gif")
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50  # red, the first frame


def test_exif_orientation_applied(tmp_path: Path) -> None:
    rgb = _gradient(20, 40)  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "o.jpg")
    assert out.shape[:2] == (40, 20)  # displayed as portrait
    # the top-left of the displayed image is the original bottom-left (dark green channel = high y)
    expected = np.rot90(rgb, k=-1)
    assert np.abs(out.astype(int) - expected).mean() < 8


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_modes_converted(tmp_path: Path, mode: str) -> None:
    base = Image.fromarray(_gradient())
    if mode == "I;16":
        arr16 = (np.asarray(base.convert("L")).astype(np.uint16) * 257)
        img = Image.fromarray(arr16)
        assert img.mode.startswith("I;16")
    else:
        img = base.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16", "LA"):
        gray = np.asarray(base.convert("L"))
        assert np.abs(out[..., 0].astype(int) - gray).max() <= 1
        assert (out[..., 0] == out[..., 1]).all()


def test_transparency_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert (load_image(tmp_path / "t.png") == 255).all()


def test_bad_files_raise_input_error_naming_file(tmp_path: Path) -> None:
    cases = {
        "empty.jpg": b"",
        "text.jpg": b"this is not an image at all",
        "photo.heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
    }
    buf = io.BytesIO()
    Image.fromarray(_gradient(200, 200)).save(buf, format="JPEG")
    cases["truncated.jpg"] = buf.getvalue()[: len(buf.getvalue()) // 3]
    messages = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError) as info:
            load_image(tmp_path / name)
        assert name in str(info.value)
        messages[name] = str(info.value)
    assert "empty" in messages["empty.jpg"]
    assert "HEIC" in messages["photo.heic"]
    assert "truncated" in messages["truncated.jpg"]
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "album.jpg").mkdir()
    with pytest.raises(InputError, match="album.jpg: a folder, not an image file"):
        load_image(tmp_path / "album.jpg")


def test_damaged_tiff_pillow_fails_on_with_a_type_error(tmp_path: Path) -> None:
    """Found by scripts/fuzz.py: a TIFF whose strip offset tag is a fraction makes Pillow raise TypeError while
    decoding; it is an InputError naming the file like any other damaged image."""
    import struct

    buf = io.BytesIO()
    Image.fromarray(np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 50).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets: LONG → RATIONAL 7/3
            data += struct.pack("<II", 7, 3)
            struct.pack_into("<HHII", data, at, 273, 5, 1, len(data) - 8)
    with Image.open(io.BytesIO(bytes(data))) as img, pytest.raises(TypeError):
        img.load()
    (tmp_path / "strips.tif").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"strips.tif: damaged image \(TypeError"):
        load_image(tmp_path / "strips.tif")


def test_pixel_guard_refuses_before_decoding(tmp_path: Path) -> None:
    Image.new("L", (3000, 3000)).save(tmp_path / "big.png")  # tiny file, 9 Mpx
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)
    assert load_image(tmp_path / "big.png", max_pixels=10_000_000).shape == (3000, 3000, 3)


def test_written_images_have_no_metadata(tmp_path: Path) -> None:
    rgb = _gradient()
    save_png(tmp_path / "a.png", rgb)
    save_jpeg(tmp_path / "a.jpg", rgb, quality=90)
    for name in ("a.png", "a.jpg"):
        with Image.open(tmp_path / name) as img:
            assert len(img.getexif()) == 0
            assert not {k for k in img.info if k not in ("jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi")}
    data = (tmp_path / "a.png").read_bytes()
    for chunk in (b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"tIME"):
        assert chunk not in data
    assert b"Exif" not in (tmp_path / "a.jpg").read_bytes()
    assert np.array_equal(load_image(tmp_path / "a.png"), rgb)
    assert encode_png(rgb) == encode_png(rgb.copy())  # deterministic
