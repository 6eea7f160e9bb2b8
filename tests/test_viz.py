"""Figures (gestalt_xai/viz.py): the same inputs give the same bytes in any folder and any Python process, files carry
no metadata, every PNG has one resolution, and maps are transparent where they are undefined."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gestalt_xai import viz

REPO = Path(__file__).resolve().parents[1]

#: draws a region heatmap whose syndromes have several (adjacent) planted regions, and a composite grid, into argv[1]
DRAW = """
import sys
from pathlib import Path
import numpy as np
import pandas as pd
from gestalt_xai.aggregate.regions import FACE_REGIONS
from gestalt_xai.viz import composite_grid, region_heatmap

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
rows = []
for s in ("S01", "S02", "S03"):
    enr = rng.uniform(0.2, 3.0, len(FACE_REGIONS))
    for i, (r, e) in enumerate(zip(FACE_REGIONS, enr)):
        rows.append({"syndrome_id": s, "region": r, "enrichment": e, "n_subjects": 12,
                     "rank": int((-enr).argsort().argsort()[i]) + 1})
planted = {"S01": set(FACE_REGIONS[:5]), "S02": set(FACE_REGIONS[3:9]), "S03": set(FACE_REGIONS[8:])}
region_heatmap(pd.DataFrame(rows), out / "regions.png", "regions", planted=planted)
yy, xx = np.mgrid[0:112, 0:112]
face = np.clip(200 - 0.02 * ((xx - 56) ** 2 + (yy - 60) ** 2), 20, 230).astype(np.uint8)[..., None].repeat(3, -1)
cells = {(g, m): (rng.normal(size=(112, 112)), 12) for g in ("S01", "ALL") for m in ("hirescam", "saliency")}
composite_grid(cells, ["S01", "ALL"], ["hirescam", "saliency"], {"S01": face, "ALL": face},
               {"hirescam": True, "saliency": False}, out / "composites.png", "composites " + "x" * 90)
"""


def _draw_in_process(folder: Path, hash_seed: str) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run([sys.executable, "-c", DRAW, str(folder)], cwd=REPO, env=env, check=True, timeout=300)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_figures_are_byte_identical_across_folders_and_processes(tmp_path):
    # the order of a set of strings depends on the process' hash seed: planted-region boxes drawn in set order
    # made region figures of two runs differ
    a = _draw_in_process(tmp_path / "run-a" / "figures", "1")
    b = _draw_in_process(tmp_path / "elsewhere" / "b", "2")
    assert sorted(a) == ["composites.png", "composites.svg", "regions.png", "regions.svg"]
    for name in a:
        assert a[name] == b[name], name


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        out.append((data[i + 4:i + 8], data[i + 8:i + 8 + n]))
        i += 12 + n
    return out


def _png_dpi(data: bytes) -> float:
    phys = dict(_png_chunks(data))[b"pHYs"]
    per_metre, _, unit = struct.unpack(">IIB", phys)
    assert unit == 1
    return per_metre * 0.0254


def test_saved_files_carry_no_metadata_and_one_resolution(tmp_path):
    face = np.full((112, 112, 3), 128, np.uint8)
    m = np.random.default_rng(1).normal(size=(112, 112))
    overlay = viz.overlay_figure(face, {"a": m, "b": np.abs(m)}, path=tmp_path / "overlay.png")
    grid = viz.composite_grid({("S01", "a"): (m, 3)}, ["S01"], ["a"], {"S01": face}, {"a": True},
                              tmp_path / "grid.png", "grid")
    pngs = [overlay.read_bytes()] + [p.read_bytes() for p in grid if p.suffix == ".png"]
    assert len(pngs) == 2
    for data in pngs:
        kinds = {k for k, _ in _png_chunks(data)}
        assert not kinds & {b"tEXt", b"iTXt", b"zTXt", b"tIME"}, kinds
        assert _png_dpi(data) == pytest.approx(viz.DPI, abs=0.1)
    svg = next(p for p in grid if p.suffix == ".svg").read_text(encoding="utf-8")
    assert "<dc:date>" not in svg and "Matplotlib v" not in svg


def test_draw_map_is_transparent_where_the_map_is_undefined():
    plt = viz._plt()
    fig, ax = plt.subplots()
    m = np.ones((112, 112))
    m[:, :40] = np.nan  # outside the crop when drawn on the photo (viz.map_on_photo)
    viz.draw_map(ax, np.full((112, 112, 3), 100, np.uint8), m, signed=True, vmax=1.0)
    rgba = ax.get_images()[1].get_array()
    plt.close(fig)
    assert np.all(rgba[:, :40, 3] == 0) and np.all(rgba[:, 40:, 3] > 0.7)
