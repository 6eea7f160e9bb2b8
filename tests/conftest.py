"""Shared fixtures. Tests make their own data; nothing is downloaded and sockets are disabled (pytest-socket)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GESTALT_XAI_QUIET", "1")  # no progress bars in test logs

# facenet-pytorch and insightface import requests → urllib3, whose import probes IPv6 support by creating (not
# connecting) a socket. Import it before pytest-socket blocks sockets so that probe does not show as a violation;
# any real connection attempt in a test still fails.
import urllib3  # noqa: E402,F401
from hypothesis import HealthCheck, settings  # noqa: E402

# property-based tests (test_properties.py): the same examples on every run and machine (CI reproducibility), no
# example database written into the checkout, no per-example deadline (a shared CI core can be slow); each test sets
# its own max_examples so the file stays well under a minute
settings.register_profile("gestalt-xai", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# HYPOTHESIS_PROFILE=explore draws new examples on each run (with GX_PROPERTY_EXAMPLES=1000 to look harder)
settings.register_profile("explore", parent=settings.get_profile("gestalt-xai"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gestalt-xai"))


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium the browser tests drive (gestalt_xai.export.browser): required under CI, else skipped."""
    from gestalt_xai.export.browser import find_chromium

    path = find_chromium()
    if path is None and os.environ.get("CI"):
        pytest.fail("CI must run the browser test: `make test` installs chromium when run as root")
    if path is None:
        pytest.skip("chromium or playwright is not installed (`make test` installs Debian's chromium when run as "
                    "root; playwright is in the dev extra)")
    return path


@pytest.fixture(scope="session")
def example_photos() -> dict[str, Path]:
    """Real photos shipped inside installed packages (insightface, scikit-image) — alignment tests only."""
    from gestalt_xai.data.examples import example_photo_paths

    return example_photo_paths()


@pytest.fixture(scope="session")
def mtcnn():
    """One MTCNN detector for the session (weights ship inside facenet-pytorch)."""
    from gestalt_xai.faces.detect import MTCNNDetector

    return MTCNNDetector(threshold=0.95)


def _truth_landmark_table(run_path: Path, out: Path) -> Path:
    """The synthetic cohort's true 5-point landmarks as a GM-Arc ``face_coords.csv`` (the external-landmark path)."""
    import numpy as np
    import pandas as pd

    from gestalt_xai.data.synthetic.truth import load_truth

    truth = load_truth(run_path)
    rows = []
    for rec in truth.images.itertuples():
        lm = np.asarray(rec.landmarks5, np.float64).reshape(5, 2)
        row = {"img": f"{rec.image_id}.jpg", "bbox_x1": lm[:, 0].min(), "bbox_y1": lm[:, 1].min(),
               "bbox_x2": lm[:, 0].max(), "bbox_y2": lm[:, 1].max()}
        row.update({f"kp{i + 1}_{a}": lm[i, j] for i in range(5) for j, a in enumerate("xy")})
        rows.append(row)
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory):
    """A small synthetic cohort (4 syndromes + controls), aligned with its true landmarks.

    Detection itself is tested in test_align*.py and test_synthetic.py; here the external-landmark path keeps the
    shared fixture fast. Tests must not write into this run: copy it (``shutil.copytree``) first.
    """
    from gestalt_xai.data.synthetic.cohort import SynthConfig, synth_stage
    from gestalt_xai.faces.stage import AlignConfig, align_stage
    from gestalt_xai.runs import Run

    run = Run(tmp_path_factory.mktemp("synthetic_run"))
    synth_stage(run, SynthConfig(seed=0, n_syndromes=4, n_frequent=3, frequent_subjects=(8, 10), n_controls=8,
                                 images_per_subject=(1, 2), workers=1))
    table = _truth_landmark_table(run.path, run.path / "face_coords.csv")
    align_stage(run, AlignConfig(cohort=str(run.path / "cohort"), landmarks=str(table)))
    return run


@pytest.fixture(scope="session")
def trained_run(synthetic_run):
    """``synthetic_run`` with the demo's small model trained once for the session, and its embeddings."""
    from gestalt_xai.models.embed import EmbedConfig, embed_stage
    from gestalt_xai.models.train import train_small_model

    train_small_model(synthetic_run, epochs=6, threads=2)
    embed_stage(synthetic_run, EmbedConfig(tta=False, threads=2))
    return synthetic_run
