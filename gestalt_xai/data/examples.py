"""Real example photos that ship inside installed packages — for trying the align stage, never as "patients".

insightface ships ``t1.jpg`` (a group photo of six people) and ``Tom_Hanks_54745.png`` (a face already aligned to
112×112); scikit-image ships the public-domain ``astronaut`` (512×512). No patient photo ships anywhere, and nothing
is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import Field

from gestalt_xai.config import StageConfig
from gestalt_xai.errors import InputError
from gestalt_xai.runs import Run
from gestalt_xai.stages import StageResult, stage

__all__ = ["ExamplePhotosConfig", "example_photo_paths", "example_photos_stage"]


def example_photo_paths() -> dict[str, Path]:
    """``name → path`` of the photos shipped inside insightface and scikit-image (as installed here)."""
    from importlib.util import find_spec

    # locate the packages without importing them (importing insightface pulls in requests/urllib3)
    def package_dir(name: str) -> Path:
        spec = find_spec(name)
        if spec is None or spec.origin is None:
            raise InputError(f"package {name} is not installed; it ships the example photos")
        return Path(spec.origin).parent

    ins = package_dir("insightface") / "data" / "images"
    ski = package_dir("skimage") / "data"
    paths = {"insightface_t1": ins / "t1.jpg", "insightface_tom_hanks_aligned": ins / "Tom_Hanks_54745.png",
             "skimage_astronaut": ski / "astronaut.png"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(f"example photos missing from the installed packages: {', '.join(missing)}")
    return paths


class ExamplePhotosConfig(StageConfig):
    """Options of the ``example_photos`` stage (none needed)."""

    folder: str = Field("photos", description="folder inside the run to copy the photos into")


@stage("example_photos", options=ExamplePhotosConfig, order=10,
       summary="copy the real example photos shipped inside installed packages (no patients)",
       writes=("photos",), example="gestalt-xai example_photos --run runs/examples")
def example_photos_stage(run: Run, cfg: ExamplePhotosConfig) -> StageResult:
    """Copy the example photos into ``<run>/<folder>/`` (file name = image id)."""
    out = run.dir(cfg.folder)
    for name, src in example_photo_paths().items():
        target = out / f"{name}{src.suffix}"
        if not target.exists() or target.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, target)
    n = len(list(out.iterdir()))
    return StageResult(items=n, outputs={"photos": out}, summary=[f"{n} example photos → {run.relative(out)}"])
